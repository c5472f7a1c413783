"""The pipeline's first task: the inputs' fingerprint, the previous set verified once, the plan."""

from typing import NamedTuple

from kfp.dsl import Dataset, Input

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def fingerprint_inputs(
    items: Input[Dataset],
    shards: int,
    max_parallel_shards: int,
    id_column: str,
    title_column: str,
    description_column: str,
    image_url_column: str,
    max_items: int,
    previous_uri: str,
    text_machine_type: str,
    text_accelerator: str,
    image_machine_type: str,
    fusion_machine_type: str,
    knn_machine_type: str,
) -> NamedTuple("Plan", [("fingerprint", str), ("workers", list), ("image_workers", list),
                         ("previous_set", dict)]):
    """Fingerprints the inputs, verifies the previous output set once for the whole run, and
    cuts the items into `shards` contiguous row ranges for the workers; first refuses machines
    Vertex cannot give (a GPU on a machine type it does not attach to, a GPU machine type
    without its GPUs).

    The fingerprint hashes the items table's contents (local files whole; gs:// objects by
    their CRC32C) and what the previous output set records about its files. Vertex AI's cache
    key holds parameters and artifact ids, not the contents behind a URI, so a scheduled run
    over an unchanged `items_uri` whose file changed would otherwise be served the previous
    run's embeddings. This task is never cached; its outputs are inputs of every step that reads
    the items or the previous set, so changed contents mean a cache miss there.

    When `previous_uri` is a publish prefix, this task resolves its pointer once and the
    fingerprint names the set it found (`<sha256>:<set folder>`): every step of the run reads
    that set, even if another run publishes a newer one meanwhile. It hashes every file of that
    set once (against the sizes and sha256 its meta files record; a manifest must agree) and
    checks its groups against each other on a sample of rows (kNN scores are the cosines of the
    rows they link, fused codes the fusion model's output); the steps are handed what it
    verified and read only the rows they need. A `previous_uri` that is not there, empty, a
    file or damaged fails this task, before any model loads.

    The plan gives each shard its share of the catalogue-wide image cap (the first `max_items`
    image URLs in input order), hands the shards with rows to at most `max_parallel_shards`
    text workers, and the shards with images to embed to at most `max_parallel_shards` image
    workers, dealt by their image rows: a machine starts only where there is work.

    The machine parameters are checked here because a UI rerun skips the CLI's checks and each
    custom job sees only its own machine: a mismatched pair would otherwise fail only when its
    job is created, after the other steps ran.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.

    Returns:
        fingerprint: The fingerprint (hex sha256, and the pinned previous set).
        workers: The text loop's items: one dict per worker with its shards (the merges check
            them all), the fingerprint (part of every worker's cache key) and the verified set.
        image_workers: The image loop's items, alike.
        previous_set: What was verified of the previous set ({} without one).
    """
    import collections

    from item_embeddings.components.shared import pipeline_params
    from item_embeddings.config import check_machines
    from item_embeddings.fanout import plan_shards
    from item_embeddings.incremental import inputs_fingerprint, pinned_previous, verify_previous_set
    from item_embeddings.items import items_fingerprint
    from item_embeddings.progress import setup_logging

    setup_logging()
    params = pipeline_params(locals())
    check_machines(params)
    fingerprint = inputs_fingerprint(items_fingerprint(items.uri), previous_uri)
    verified = verify_previous_set(pinned_previous(fingerprint) or previous_uri)
    plan = plan_shards(items.uri, params)
    previous = verified.as_dict() if verified else {}
    # Carried in the loop items rather than as task outputs into the loops: kfp.local resolves
    # another task's output inside a ParallelFor body to the loop item.
    carried = {"inputs_fingerprint": fingerprint, "previous": previous}
    return collections.namedtuple("Plan", "fingerprint workers image_workers previous_set")(
        fingerprint, [{**w, **carried} for w in plan.workers],
        [{**w, **carried} for w in plan.image_workers], previous)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(fingerprint_inputs, base_image)
