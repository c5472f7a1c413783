"""The text-embedding component."""

from kfp.dsl import Dataset, Input, Metrics, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def embed_text(
    items: Input[Dataset],
    text_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    id_column: str,
    title_column: str,
    description_column: str,
    text_model: str,
    text_batch_size: int,
    text_backend: str,
    previous_uri: str,
    inputs_fingerprint: str,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
):
    """Embeds each item's title and description with a sentence-transformers model.

    Writes a directory with `txt.npy` ([N, 384] float32, L2-normalised, input row order),
    `txt_items.parquet` (ids in the same order) and `txt_meta.json`, and logs an experiment
    run `embed-text-<run id>`.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.
        text_embeddings: Output directory with txt.npy, txt_items.parquet and txt_meta.json.
        metrics: Count, throughput and encode time.
    """
    from item_embeddings.components.shared import component_step
    from item_embeddings.text import embed_items_text

    with component_step(locals(), text_embeddings, metrics, "text") as step:
        meta = embed_items_text(items.uri, step.out_dir, step.params, run_id=step.run_id,
                                tracker=step.tracker, artifact_uri=step.artifact_uri)
        step.report(meta, metadata=("count", "embed_dim", "encoder_name", "text_backend"),
                    metrics=("count", "throughput_items_per_sec", "encode_time_sec"))


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(embed_text, base_image)
