"""The image merge component: the workers' shards assembled into the image step's outputs."""


from kfp.dsl import Dataset, Input, Metrics, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def merge_images(
    image_shards: Input[list[Dataset]],
    image_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    workers: list,
    image_model: str,
    max_items: int,
    previous_uri: str,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
):
    """Concatenates every shard's image outputs, in shard order, into `img.npy` ([M, 512]
    float32), `img_items.parquet` (rows renumbered), `img_failures.parquet` and
    `img_meta.json` (totals, failures by reason): the files one image step over the whole
    catalogue writes. Refuses a missing, duplicated or unplanned shard.

    Args:
        image_shards: The image workers' outputs (collected from the loop).
        image_embeddings: Output directory with img.npy, img_items.parquet,
            img_failures.parquet and img_meta.json.
        metrics: Counts of embedded, failed, reused and revalidated images.
    """
    from item_embeddings.components.shared import component_step
    from item_embeddings.fanout import ShardPlan, merge_image_shards
    from item_embeddings.image.step import IMAGE_STEP

    with component_step(locals(), image_embeddings, metrics, "image") as step:
        meta = merge_image_shards([p.path for p in image_shards], ShardPlan.from_workers(workers),
                                  step.out_dir, step.params, run_id=step.run_id,
                                  tracker=step.tracker, artifact_uri=step.artifact_uri)
        step.report(meta, IMAGE_STEP, metadata=("count", "embed_dim", "encoder_name"))


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(merge_images, base_image)
