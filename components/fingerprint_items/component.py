"""The items-fingerprint component: a content hash that keys the caches of the steps reading items."""

from kfp.dsl import Dataset, Input

from item_embeddings.components.shared import as_component


def fingerprint_items(items: Input[Dataset]) -> str:
    """Hashes the items table's contents (local files whole; gs:// objects by their CRC32C).

    Vertex AI's cache key holds parameters and artifact ids, not the contents behind a URI, so
    a scheduled run over an unchanged `items_uri` whose file changed would otherwise be served
    the previous run's embeddings. This task is never cached; its output is an input of every
    step that reads the items, so changed contents mean a cache miss there.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.

    Returns:
        The fingerprint (hex sha256).
    """
    from item_embeddings.items import items_fingerprint
    from item_embeddings.progress import setup_logging

    setup_logging()
    return items_fingerprint(items.uri)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(fingerprint_items, base_image)
