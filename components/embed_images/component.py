"""The image-embedding component."""

from kfp.dsl import Dataset, Input, Metrics, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def embed_images(
    items: Input[Dataset],
    image_embeddings: Output[Dataset],
    metrics: Output[Metrics],
    id_column: str,
    image_url_column: str,
    image_model: str,
    image_pretrained: str,
    image_batch_size: int,
    max_items: int,
    download_concurrency: int,
    download_timeout_s: float,
    download_retries: int,
    max_image_bytes: int,
    allow_private_hosts: bool,
    shard_size: int,
    checkpoint_uri: str,
    image_user_agent: str,
    previous_uri: str,
    image_revalidate: bool,
    retry_failed_images: bool,
    require_gpu: bool,
    inputs_fingerprint: str,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
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
    """
    import dataclasses

    from item_embeddings.components.shared import component_step
    from item_embeddings.image import SHARDS_DIR, embed_items_images
    from item_embeddings.runtime import require_cuda

    with component_step(locals(), image_embeddings, metrics, "image") as step:
        device = require_cuda("the image step") if require_gpu else None
        # Shards stay in the task's durable output (or checkpoint_uri), not in the local
        # staging directory: a task retried after a preemption finds them.
        params = dataclasses.replace(
            step.params,
            checkpoint_uri=checkpoint_uri or f"{image_embeddings.path}/{SHARDS_DIR}")
        meta = embed_items_images(items.uri, step.out_dir, params, run_id=step.run_id,
                                  tracker=step.tracker, artifact_uri=step.artifact_uri,
                                  device=device)
        step.report(meta, metadata=("count", "embed_dim", "encoder_name"),
                    metrics=("count", "failed_count", "attempted_count", "no_url_count",
                             "throughput_items_per_sec", "encode_time_sec"))


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(embed_images, base_image)
