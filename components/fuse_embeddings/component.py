"""The fusion component."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output


def fuse_embeddings(
    text_embeddings: Input[Dataset],
    image_embeddings: Input[Dataset],
    fused_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    fusion_hidden_dim: int = 256,
    fusion_output_dim: int = 128,
    fusion_epochs: int = 5,
    fusion_lr: float = 1e-3,
    fusion_batch_size: int = 512,
    seed: int = 0,
    experiment: str = "recsys-dev",
    tracking_backend: str = "auto",
    tracking_dir: str = "",
    project: str = "",
    location: str = "",
):
    """Fuses each item's text and image embeddings into one L2-normalised vector.

    Joins the two inputs by item id (items without an image get a zero image vector and a
    has-image bit), trains an MLP concat(text, image) -> hidden -> output to keep both
    modalities' neighbourhoods, and writes a directory with `fused.npy` ([N, 128] float32, the
    text step's item order), `fused_items.parquet`, `fusion_model.safetensors` (to fuse later
    items with the same model), `fusion_exclusions.parquet` and `fusion_config.json`. Logs an
    experiment run `fuse-modal-<run id>`.

    Args:
        text_embeddings: Text step output (txt.npy, txt_items.parquet, txt_meta.json).
        image_embeddings: Image step output (img.npy, img_items.parquet, img_meta.json).
        fused_embeddings: Output directory with the fused vectors, ids, weights and config.
        metrics: Count, items with images, final loss and training time.
        fusion_hidden_dim: Hidden width of the fusion MLP.
        fusion_output_dim: Dimension of the fused embedding.
        fusion_epochs: Training epochs (full passes over all items).
        fusion_lr: Adam learning rate.
        fusion_batch_size: Items per training minibatch (2 to 8192).
        seed: Random seed; same inputs, seed and CPU thread count give identical outputs.
        experiment: Vertex AI Experiments experiment name.
        tracking_backend: 'vertex', 'local', 'none' or 'auto'.
        tracking_dir: Root of the local experiment store (local runs).
        project: Google Cloud project (the pipeline passes the runtime placeholder).
        location: Google Cloud region (the pipeline passes the runtime placeholder).
    """
    from item_embeddings.fusion import fuse_item_embeddings
    from item_embeddings.outputs import META_FILES
    from item_embeddings.progress import setup_logging
    from item_embeddings.storage import local_input_dir, staged_output_dir
    from item_embeddings.tracking import (make_tracker, run_id_from_output_uri,
                                          write_metrics_artifact)

    setup_logging()
    # Training reads random rows: on Vertex the inputs are copied off gcsfuse first.
    with local_input_dir(text_embeddings.path) as text_dir, \
            local_input_dir(image_embeddings.path) as image_dir, \
            staged_output_dir(fused_embeddings.path, META_FILES) as out_dir:
        meta = fuse_item_embeddings(
            text_dir,
            image_dir,
            out_dir,
            hidden_dim=fusion_hidden_dim,
            output_dim=fusion_output_dim,
            epochs=fusion_epochs,
            lr=fusion_lr,
            batch_size=fusion_batch_size,
            seed=seed,
            run_id=run_id_from_output_uri(fused_embeddings.uri),
            tracker=make_tracker(tracking_backend, experiment=experiment, project=project,
                                 location=location, tracking_dir=tracking_dir),
        )
    fused_embeddings.metadata.update(
        {k: meta[k] for k in ("count", "output_dim", "items_with_images", "objective")})
    write_metrics_artifact(metrics, "fusion", {
        k: meta[k] for k in ("count", "items_with_images", "image_vectors_excluded", "final_loss",
                             "train_time_sec", "wall_time_sec")})


def make_component(base_image: str):
    """The component, to run in ``base_image`` (the project's image: no pip install at start)."""
    return dsl.component(fuse_embeddings, base_image=base_image, install_kfp_package=False)
