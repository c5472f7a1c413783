"""The image-embedding component: one fan-out worker of the image step."""

from kfp.dsl import Dataset, Input, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def embed_images(
    items: Input[Dataset],
    image_shards: Output[Dataset],
    worker: dict,
    id_column: str,
    image_url_column: str,
    image_model: str,
    image_pretrained: str,
    image_batch_size: int,
    image_decode: str,
    max_items: int,
    download_concurrency: int,
    download_timeout_s: float,
    download_retries: int,
    max_image_bytes: int,
    allow_private_hosts: bool,
    shard_size: int,
    checkpoint_uri: str,
    image_user_agent: str,
    download_rate_per_host: float,
    host_failure_limit: int,
    respect_opt_out: bool,
    respect_robots_txt: bool,
    previous_uri: str,
    image_revalidate: bool,
    retry_failed_images: bool,
    log_shard_runs: bool,
    require_gpu: bool,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
):
    """Downloads the images of this worker's shards (guarded, concurrent, polite per host) and
    embeds them with open_clip ViT-B/32.

    For each shard (a row range of the items and its share of the `max_items` cap, from the
    plan) writes a folder `shard-NNNNN` with `img.npy` ([M, 512] float32, L2-normalised),
    `img_items.parquet`, `img_failures.parquet` and `img_meta.json`; the fusion step merges
    them. The encoder is loaded and the previous set opened once for all the worker's shards.
    Finished chunks of `shard_size` images are kept durably, so a task restarted after a Spot
    preemption resumes where it stopped; on a GPU machine the task fails at once if torch cannot
    use the GPU.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.
        image_shards: Output directory with one folder per shard (and the checkpoints).
    """
    import dataclasses

    from item_embeddings.components.shared import component_step, run_worker
    from item_embeddings.image import SHARDS_DIR, embed_items_images
    from item_embeddings.outputs import IMG_META
    from item_embeddings.runtime import require_cuda

    with component_step(locals(), image_shards, stage=False) as step:
        device = require_cuda("the image step") if require_gpu else None
        # Checkpoints stay in the task's durable output (or checkpoint_uri), not in a local
        # staging directory: a task retried after a preemption finds them.
        params = dataclasses.replace(
            step.params, checkpoint_uri=checkpoint_uri or f"{image_shards.path}/{SHARDS_DIR}")

        def run_shard(shard, out_dir, **each):
            embed_items_images(items.uri, out_dir, params, rows=shard.rows,
                               quota=shard.image_quota, url_rows=shard.url_rows,
                               device=device, **each)

        run_worker(step, worker, image_shards, IMG_META, run_shard)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(embed_images, base_image)
