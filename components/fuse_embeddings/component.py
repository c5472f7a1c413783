"""The fusion component."""

from kfp.dsl import Dataset, Input, Metrics, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def fuse_embeddings(
    text_embeddings: Input[Dataset],
    image_embeddings: Input[Dataset],
    fused_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    fusion_hidden_dim: int,
    fusion_output_dim: int,
    fusion_epochs: int,
    fusion_lr: float,
    fusion_batch_size: int,
    seed: int,
    fusion_mode: str,
    previous_uri: str,
    inputs_fingerprint: str,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
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
        metrics: Count, items with images, final loss, training time and the modality mix
            (photo share of the text and fused neighbours by group).
    """
    from item_embeddings.components.shared import component_step
    from item_embeddings.fusion import fuse_item_embeddings
    from item_embeddings.fusion.step import FUSION_STEP
    from item_embeddings.storage import local_input_dir

    # Training reads random rows: on Vertex the inputs are copied off gcsfuse first.
    with component_step(locals(), fused_embeddings, metrics, "fusion") as step, \
            local_input_dir(text_embeddings.path) as text_dir, \
            local_input_dir(image_embeddings.path) as image_dir:
        meta = fuse_item_embeddings(text_dir, image_dir, step.out_dir, step.params,
                                    run_id=step.run_id, tracker=step.tracker,
                                    artifact_uri=step.artifact_uri,
                                    input_uris=(text_embeddings.uri, image_embeddings.uri))
        step.report(meta, FUSION_STEP,
                    metadata=("count", "output_dim", "items_with_images", "objective"))


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(fuse_embeddings, base_image)
