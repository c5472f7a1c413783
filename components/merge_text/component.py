"""The text merge component: the workers' shards assembled into the text step's outputs."""


from kfp.dsl import Dataset, Input, Metrics, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def merge_text(
    text_shards: Input[list[Dataset]],
    text_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    workers: list,
    text_model: str,
    text_backend: str,
    text_batch_size: int,
    previous_uri: str,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
):
    """Concatenates every shard's text outputs, in shard order, into `txt.npy` ([N, 384]
    float32, input row order), `txt_items.parquet` and `txt_meta.json`: the files one text step
    over the whole catalogue writes. Refuses a missing, duplicated or unplanned shard.

    Args:
        text_shards: The text workers' outputs (collected from the loop).
        text_embeddings: Output directory with txt.npy, txt_items.parquet and txt_meta.json.
        metrics: Count, reused and encoded rows, encode time and throughput.
    """
    from item_embeddings.components.shared import component_step
    from item_embeddings.fanout import ShardPlan, merge_text_shards
    from item_embeddings.text.step import TEXT_STEP

    with component_step(locals(), text_embeddings, metrics, "text") as step:
        meta = merge_text_shards([p.path for p in text_shards], ShardPlan.from_workers(workers),
                                 step.out_dir, step.params, run_id=step.run_id,
                                 tracker=step.tracker, artifact_uri=step.artifact_uri)
        step.report(meta, TEXT_STEP,
                    metadata=("count", "embed_dim", "encoder_name", "text_backend"))


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(merge_text, base_image)
