"""The text-embedding component."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output


def embed_text(
    items: Input[Dataset],
    text_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    id_column: str = "asin",
    title_column: str = "title",
    description_column: str = "description",
    text_model: str = "sentence-transformers/all-MiniLM-L6-v2",
    text_batch_size: int = 128,
    text_backend: str = "auto",
    experiment: str = "recsys-dev",
    tracking_backend: str = "auto",
    tracking_dir: str = "",
    project: str = "",
    location: str = "",
):
    """Embeds each item's title and description with a sentence-transformers model.

    Writes a directory with `txt.npy` ([N, 384] float32, L2-normalised, input row order),
    `txt_items.parquet` (ids in the same order) and `txt_meta.json`, and logs an experiment
    run `embed-text-<run id>`.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.
        text_embeddings: Output directory with txt.npy, txt_items.parquet and txt_meta.json.
        metrics: Count, throughput and encode time.
        id_column: Column with the unique item id.
        title_column: Column with the item title.
        description_column: Column with the description (string or list of strings).
        text_model: sentence-transformers model: hub id, local directory or gs:// directory.
        text_batch_size: Texts per encoder batch.
        text_backend: 'auto' (fastest that passes the quality gate: torch-fp16 on a GPU,
            onnx-int8 on CPU), 'torch' (fp32 sentence-transformers, exact), 'torch-fp16'
            (CUDA), 'onnx' (fp32 ONNX Runtime) or 'onnx-int8' (int8 ONNX Runtime).
        experiment: Vertex AI Experiments experiment name.
        tracking_backend: 'vertex', 'local', 'none' or 'auto'.
        tracking_dir: Root of the local experiment store (local runs).
        project: Google Cloud project (the pipeline passes the runtime placeholder).
        location: Google Cloud region (the pipeline passes the runtime placeholder).
    """
    from item_embeddings.items import ItemColumns
    from item_embeddings.outputs import META_FILES
    from item_embeddings.progress import setup_logging
    from item_embeddings.storage import staged_output_dir
    from item_embeddings.text import embed_items_text
    from item_embeddings.tracking import (make_tracker, run_id_from_output_uri,
                                          write_metrics_artifact)

    setup_logging()
    with staged_output_dir(text_embeddings.path, META_FILES) as out_dir:
        meta = embed_items_text(
            items.uri,
            out_dir,
            columns=ItemColumns(id=id_column, title=title_column, description=description_column),
            text_model=text_model,
            batch_size=text_batch_size,
            text_backend=text_backend,
            run_id=run_id_from_output_uri(text_embeddings.uri),
            tracker=make_tracker(tracking_backend, experiment=experiment, project=project,
                                 location=location, tracking_dir=tracking_dir),
        )
    text_embeddings.metadata.update(
        {k: meta[k] for k in ("count", "embed_dim", "encoder_name", "text_backend")})
    write_metrics_artifact(metrics, "text", {
        k: meta[k] for k in ("count", "throughput_items_per_sec", "encode_time_sec")})


def make_component(base_image: str):
    """The component, to run in ``base_image`` (the project's image: no pip install at start)."""
    return dsl.component(embed_text, base_image=base_image, install_kfp_package=False)
