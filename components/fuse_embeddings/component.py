"""The fusion component: the workers' shards merged into the text and image outputs, then fused."""

from kfp.dsl import Dataset, Input, Metrics, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def fuse_embeddings(
    text_shards: Input[list[Dataset]],
    image_shards: Input[list[Dataset]],
    text_embeddings: Output[Dataset],
    image_embeddings: Output[Dataset],
    fused_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    workers: list,
    image_workers: list,
    previous_set: dict,
    text_model: str,
    text_backend: str,
    text_batch_size: int,
    image_model: str,
    max_items: int,
    fusion_hidden_dim: int,
    fusion_output_dim: int,
    fusion_epochs: int,
    fusion_min_steps: int,
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
    """Merges the workers' shards into the text and image steps' outputs, then fuses each
    item's text and image embeddings into one L2-normalised vector.

    The merges concatenate every shard's outputs in shard order into `txt.npy` ([N, 384]
    float32, input row order), `txt_items.parquet`, `txt_meta.json`, and `img.npy` ([M, 512]
    float32), `img_items.parquet` (rows renumbered), `img_failures.parquet`, `img_meta.json`:
    the files one step over the whole catalogue writes; a missing, duplicated or unplanned shard
    is refused. They run here, not as tasks of their own, so no machine starts just to move
    files. Each logs its step's experiment run (`embed-text-<run id>`, `embed-image-<run id>`).

    Fusion joins the two by item id (items without an image get a zero image vector and a
    has-image bit), trains an MLP concat(text, image) -> hidden -> output to keep both
    modalities' neighbourhoods (or applies the previous set's, `fusion_mode` 'apply'), and writes
    `fused.npy` ([N, 128] float32, the text step's item order), `fused_items.parquet`,
    `fusion_model.safetensors`, `fusion_exclusions.parquet` and `fusion_config.json`. Logs an
    experiment run `fuse-modal-<run id>`.

    Args:
        text_shards: The text workers' outputs (collected from their loop).
        image_shards: The image workers' outputs (collected from their loop).
        text_embeddings: Output directory with txt.npy, txt_items.parquet and txt_meta.json.
        image_embeddings: Output directory with img.npy, img_items.parquet,
            img_failures.parquet and img_meta.json.
        fused_embeddings: Output directory with the fused vectors, ids, weights and config.
        metrics: The text, image and fusion steps' metrics (prefixed text_, image_, fusion_),
            with the modality mix (photo share of the text and fused neighbours by group).
    """
    from item_embeddings.components.shared import component_step, merge_worker_shards
    from item_embeddings.fusion import fuse_item_embeddings
    from item_embeddings.fusion.step import FUSION_STEP
    from item_embeddings.incremental import VerifiedSet

    # Each output is written on local disk and placed on its artifact (gcsfuse on Vertex) at
    # the end: fusion reads the merged files where the merges wrote them.
    inputs = locals()
    with component_step(inputs, text_embeddings, metrics, "text") as text, \
            component_step(inputs, image_embeddings, metrics, "image") as image, \
            component_step(inputs, fused_embeddings, metrics, "fusion") as step:
        merge_worker_shards(text, text_shards, workers, image, image_shards, image_workers)
        meta = fuse_item_embeddings(text.out_dir, image.out_dir, step.out_dir, step.params,
                                    run_id=step.run_id, tracker=step.tracker,
                                    artifact_uri=step.artifact_uri,
                                    input_uris=(text_embeddings.uri, image_embeddings.uri),
                                    verified=VerifiedSet.from_dict(previous_set))
        step.report(meta, FUSION_STEP,
                    metadata=("count", "output_dim", "items_with_images", "objective"))


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(fuse_embeddings, base_image)
