"""The planning component: the items cut into shards, handed to the workers."""

from kfp.dsl import Dataset, Input

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def plan_shards(
    items: Input[Dataset],
    shards: int,
    max_parallel_shards: int,
    id_column: str,
    image_url_column: str,
    max_items: int,
    inputs_fingerprint: str,
) -> list:
    """Cuts the items into `shards` contiguous row ranges and gives them to at most
    `max_parallel_shards` workers; gives each shard its share of the catalogue-wide image cap
    (the first `max_items` image URLs in input order), so the shards select the images one run
    would.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.

    Returns:
        The loop's items: one dict per worker with its shards (the merges check them all) and
        the inputs' fingerprint, which so becomes part of every worker's cache key.
    """
    from item_embeddings.config import PipelineParams
    from item_embeddings.fanout import plan_shards as plan
    from item_embeddings.progress import setup_logging

    setup_logging()
    workers = plan(items.uri, PipelineParams(
        shards=shards, max_parallel_shards=max_parallel_shards, id_column=id_column,
        image_url_column=image_url_column, max_items=max_items)).workers
    # Carried in the loop item rather than as a task output into the loop: kfp.local resolves
    # another task's output inside a ParallelFor body to the loop item.
    return [{**worker, "inputs_fingerprint": inputs_fingerprint} for worker in workers]


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(plan_shards, base_image)
