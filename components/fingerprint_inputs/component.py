"""The inputs-fingerprint component: a content hash that keys the caches of the steps reading
the items (and the previous output set)."""

from kfp.dsl import Dataset, Input

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def fingerprint_inputs(
    items: Input[Dataset],
    previous_uri: str,
    text_machine_type: str,
    text_accelerator: str,
    image_machine_type: str,
    fusion_machine_type: str,
    knn_machine_type: str,
) -> str:
    """Hashes the items table's contents (local files whole; gs:// objects by their CRC32C) and
    what the previous output set records about its files; first refuses machines Vertex cannot
    give (a GPU on a machine type it does not attach to, a GPU machine type without its GPUs).

    Vertex AI's cache key holds parameters and artifact ids, not the contents behind a URI, so
    a scheduled run over an unchanged `items_uri` whose file changed would otherwise be served
    the previous run's embeddings. This task is never cached; its output is an input of every
    step that reads the items or the previous set, so changed contents mean a cache miss there.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.

    When `previous_uri` is a publish prefix, this task resolves its pointer once and the
    fingerprint names the set it found (`<sha256>:<set folder>`): every step of the run reads
    that set, even if another run publishes a newer one meanwhile. A `previous_uri` that is not
    there, empty or a file fails this task, before any model loads.

    The machine parameters are checked here because a UI rerun skips the CLI's checks and each
    custom job sees only its own machine: a mismatched pair would otherwise fail only when its
    job is created, after the other steps ran.

    Returns:
        The fingerprint (hex sha256, and the pinned previous set).
    """
    from item_embeddings.config import PipelineParams, check_machines
    from item_embeddings.incremental import inputs_fingerprint
    from item_embeddings.items import items_fingerprint
    from item_embeddings.progress import setup_logging

    setup_logging()
    check_machines(PipelineParams(
        text_machine_type=text_machine_type, text_accelerator=text_accelerator,
        image_machine_type=image_machine_type, fusion_machine_type=fusion_machine_type,
        knn_machine_type=knn_machine_type))
    return inputs_fingerprint(items_fingerprint(items.uri), previous_uri)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(fingerprint_inputs, base_image)
