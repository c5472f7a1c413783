"""The image-embedding component."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output


def embed_images(
    items: Input[Dataset],
    image_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    id_column: str = "asin",
    image_url_column: str = "image_url",
    image_model: str = "ViT-B-32",
    image_pretrained: str = "openai",
    image_batch_size: int = 32,
    max_items: int = 150000,
    download_concurrency: int = 64,
    download_timeout_s: float = 5.0,
    download_retries: int = 2,
    max_image_bytes: int = 10000000,
    allow_private_hosts: bool = False,
    shard_size: int = 10000,
    checkpoint_uri: str = "",
    image_user_agent: str = "",
    experiment: str = "recsys-dev",
    tracking_backend: str = "auto",
    tracking_dir: str = "",
    project: str = "",
    location: str = "",
):
    """Downloads each item's image (guarded, concurrent) and embeds it with open_clip ViT-B/32.

    Writes a directory with `img.npy` ([M, 512] float32, L2-normalised), `img_items.parquet`
    (id, url, row in img.npy), `img_failures.parquet` (id, url, reason, detail, http_status,
    attempts) and `img_meta.json`, and logs an experiment run `embed-image-<run id>`. Finished
    shards are kept durably, so a task restarted after a Spot preemption resumes where it stopped.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.
        image_embeddings: Output directory with img.npy, img_items.parquet,
            img_failures.parquet and img_meta.json.
        metrics: Counts, failures and throughput of the image step.
        id_column: Column with the unique item id.
        image_url_column: Column with the image URL (http/https).
        image_model: open_clip model name, or a model config .json file (local or gs://).
        image_pretrained: open_clip pretrained tag, local checkpoint file, gs:// checkpoint,
            or 'none'.
        image_batch_size: Images per encoder batch.
        max_items: Cap on items whose image is downloaded and encoded (0 = no cap).
        download_concurrency: Image downloads in flight at once.
        download_timeout_s: Total time allowed per image download attempt (s).
        download_retries: Retries after a timeout, connection error, 5xx or 429 (with backoff).
        max_image_bytes: Largest image body accepted (bytes).
        allow_private_hosts: Allow image hosts on private/loopback addresses (tests, private CDNs).
        shard_size: Items per durable shard (resume unit after preemption).
        checkpoint_uri: Where finished shards are kept (local or gs://); empty = inside the output.
        image_user_agent: User-Agent header of image downloads; empty = the project's default.
        experiment: Vertex AI Experiments experiment name.
        tracking_backend: 'vertex', 'local', 'none' or 'auto'.
        tracking_dir: Root of the local experiment store (local runs).
        project: Google Cloud project (the pipeline passes the runtime placeholder).
        location: Google Cloud region (the pipeline passes the runtime placeholder).
    """
    from item_embeddings.image import embed_items_images
    from item_embeddings.items import ItemColumns
    from item_embeddings.outputs import META_FILES
    from item_embeddings.progress import setup_logging
    from item_embeddings.storage import staged_output_dir
    from item_embeddings.tracking import (make_tracker, run_id_from_output_uri,
                                          write_metrics_artifact)

    setup_logging()
    extra = {"user_agent": image_user_agent} if image_user_agent else {}
    # Shards stay in the task's durable output (or checkpoint_uri): a retried task finds them.
    checkpoint = checkpoint_uri or f"{image_embeddings.path}/img_shards"
    with staged_output_dir(image_embeddings.path, META_FILES) as out_dir:
        meta = embed_items_images(
            items.uri,
            out_dir,
            columns=ItemColumns(id=id_column, image_url=image_url_column),
            image_model=image_model,
            image_pretrained=image_pretrained,
            batch_size=image_batch_size,
            max_items=max_items,
            download_concurrency=download_concurrency,
            download_timeout_s=download_timeout_s,
            download_retries=download_retries,
            max_image_bytes=max_image_bytes,
            allow_private_hosts=allow_private_hosts,
            shard_size=shard_size,
            checkpoint_uri=checkpoint,
            # Same output URI on every retry of the task, so the same run id and checkpoints.
            run_id=run_id_from_output_uri(image_embeddings.uri),
            **extra,
            tracker=make_tracker(tracking_backend, experiment=experiment, project=project,
                                 location=location, tracking_dir=tracking_dir),
        )
    image_embeddings.metadata.update({k: meta[k] for k in ("count", "embed_dim", "encoder_name")})
    write_metrics_artifact(metrics, "image", {
        k: meta[k] for k in ("count", "failed_count", "attempted_count", "no_url_count",
                             "throughput_items_per_sec", "encode_time_sec")})


def make_component(base_image: str):
    """The component, to run in ``base_image`` (the project's image: no pip install at start)."""
    return dsl.component(embed_images, base_image=base_image, install_kfp_package=False)
