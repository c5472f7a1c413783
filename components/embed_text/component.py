"""The text-embedding component: one fan-out worker of the text step."""

from kfp.dsl import Dataset, Input, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def embed_text(
    items: Input[Dataset],
    text_shards: Output[Dataset],
    worker: dict,
    id_column: str,
    title_column: str,
    description_column: str,
    text_model: str,
    text_batch_size: int,
    text_backend: str,
    text_accelerator: str,
    previous_uri: str,
    log_shard_runs: bool,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
):
    """Embeds the title and description of the items of this worker's shards.

    For each shard (a row range of the items, from the plan) writes a folder `shard-NNNNN`
    with `txt.npy` ([rows, 384] float32, L2-normalised, input row order), `txt_items.parquet`
    and `txt_meta.json`; the fusion step merges them. The encoder is loaded and the previous
    set opened once for all the worker's shards; a retried task keeps the shards an earlier
    attempt finished. On a GPU machine (`text_accelerator` set) the task fails at once if torch
    cannot use the GPU.

    Args:
        items: The items table (parquet file or folder, local or gs://), from the importer.
        text_shards: Output directory with one folder per shard.
    """
    from item_embeddings.components.shared import component_step, run_worker
    from item_embeddings.outputs import TXT_META
    from item_embeddings.runtime import require_cuda
    from item_embeddings.text import embed_items_text

    with component_step(locals(), text_shards, stage=False) as step:
        device = require_cuda("the text step") if text_accelerator else None

        def run_shard(shard, out_dir, **each):
            embed_items_text(items.uri, out_dir, step.params, rows=shard.rows, device=device,
                             **each)

        run_worker(step, worker, text_shards, TXT_META, run_shard)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(embed_text, base_image)
