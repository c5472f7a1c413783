"""The fusion step: join text and image vectors by id, train the fusion MLP, write 128-d codes."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..config import PipelineParams
from ..outputs import FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, FUSION_EXCLUSIONS, FUSION_WEIGHTS
from ..step import step_run
from ..storage import atomic_npy, sha256_file, write_parquet_atomic
from ..tracking import ExperimentTracker
from .inputs import SCAN_ROWS, FusionInputs, gather, load_fusion_inputs
from .model import NORM_WEIGHT, OBJECTIVE, TAU, FusionMLP, save_fusion_model
from .training import WARMUP_SHARE, check_init, torch_threads, train_fusion_model

logger = logging.getLogger(__name__)

EXCLUSION_REASON = "non-finite or zero image vector"


@torch.no_grad()
def _write_fused(model: FusionMLP, inputs: FusionInputs, dest: Path) -> None:
    with atomic_npy(dest, (inputs.count, model.output_dim)) as fused:
        for start in range(0, inputs.count, SCAN_ROWS):
            stop = min(start + SCAN_ROWS, inputs.count)
            z, _ = model(*gather(inputs, np.arange(start, stop)))
            fused[start:stop] = z.numpy()


def fuse_item_embeddings(
    text_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    params: PipelineParams = PipelineParams(),
    *,
    run_id: str = "",
    tracker: ExperimentTracker | None = None,
    artifact_uri: str = "",
    input_uris: tuple[str, str] | None = None,
    num_threads: int | None = None,
    init: str = "pca",
) -> dict[str, Any]:
    """Fuse every item's text and image vectors into one ``fusion_output_dim`` code.

    Writes into ``output_dir``, each atomically: ``fused.npy`` [N, output_dim] float32
    (L2-normalised, the text step's item order), ``fused_items.parquet`` (``id``, ``has_image``),
    ``fusion_model.safetensors`` (reload with :func:`~.model.load_fusion_model`),
    ``fusion_exclusions.parquet`` (``id``, ``reason``: image vectors that could not be used) and
    ``fusion_config.json`` (written last). Logs an experiment run ``fuse-modal-<run id>``.

    Args:
        text_dir: The text step's output directory (txt.npy, txt_items.parquet, txt_meta.json).
        image_dir: The image step's output directory (img.npy, img_items.parquet, img_meta.json).
        output_dir: Directory for the outputs (created).
        params: Pipeline parameters; this step reads the ``fusion_*`` settings and ``seed``.
        run_id: Identifier of the pipeline run (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        artifact_uri: The output's durable URI for the experiment run; default ``output_dir``.
        input_uris: Where the text and image inputs came from (the artifacts' URIs, recorded in
            the config); default the two directories.
        num_threads: torch CPU threads (None: 1 below SINGLE_THREAD_BELOW_ITEMS items, else
            torch's current setting). Outputs are byte-identical for the same inputs, seed and
            thread count.
        init: 'pca' (start from the linear PCA projection) or 'random'.

    Returns:
        The metadata written to ``fusion_config.json``.

    Raises:
        FusionInputError: the inputs cannot be fused (raised before any training).
    """
    check_init(init)
    started = time.perf_counter()
    inputs = load_fusion_inputs(text_dir, image_dir)
    load_time = time.perf_counter() - started
    text_uri, image_uri = input_uris or (str(text_dir), str(image_dir))
    with step_run("fuse-modal", output_dir, run_id=run_id, tracker=tracker,
                  artifact="fused_embeddings", artifact_uri=artifact_uri,
                  params={"output_dim": params.fusion_output_dim,
                          "hidden_dim": params.fusion_hidden_dim, "epochs": params.fusion_epochs,
                          "lr": params.fusion_lr, "batch_size": params.fusion_batch_size,
                          "seed": params.seed, "objective": OBJECTIVE, "init": init,
                          "text_uri": text_uri, "image_uri": image_uri}) as run, \
            torch_threads(num_threads, inputs.count) as threads:
        t0 = time.perf_counter()
        model, history = train_fusion_model(inputs, params, init)
        train_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        _write_fused(model, inputs, run.out / FUSED_ARRAY)
        write_parquet_atomic(run.out / FUSED_ITEMS, pa.table(
            {"id": inputs.ids, "has_image": pa.array(inputs.image_row >= 0)}))
        write_parquet_atomic(run.out / FUSION_EXCLUSIONS, pa.table(
            {"id": pa.array(inputs.excluded_ids, type=inputs.ids.type),
             "reason": pa.array([EXCLUSION_REASON] * len(inputs.excluded_ids), type=pa.string())}))
        save_fusion_model(model, run.out / FUSION_WEIGHTS,
                          {"run_id": run.run_id, "seed": params.seed})
        write_time = time.perf_counter() - t0
        final = history[-1]
        meta = run.finish(FUSION_CONFIG, {
            "text_dim": model.text_dim,
            "img_dim": model.img_dim,
            "hidden_dim": params.fusion_hidden_dim,
            "output_dim": params.fusion_output_dim,
            "count": inputs.count,
            "items_with_images": inputs.items_with_images,
            "items_without_images": inputs.count - inputs.items_with_images,
            "image_vectors_excluded": len(inputs.excluded_ids),
            "image_failures": inputs.image_failures,
            "text_run_id": inputs.text_meta.get("run_id"),
            "image_run_id": inputs.image_meta.get("run_id"),
            "epochs": params.fusion_epochs,
            "lr": params.fusion_lr,
            "batch_size": params.fusion_batch_size,
            "seed": params.seed,
            "init": init,
            "objective": OBJECTIVE,
            "objective_params": {"tau": TAU, "norm_weight": NORM_WEIGHT,
                                 "warmup_share": WARMUP_SHARE, "schedule": "warmup-cosine"},
            "final_loss": final["loss"],
            "final_sim_loss": final["sim_loss"],
            "final_norm_loss": final["norm_loss"],
            "loss_history": history,
            "normalized": True,
            "torch_threads": threads,
            "load_time_sec": load_time,
            "train_time_sec": train_time,
            "write_time_sec": write_time,
            "weights_file": FUSION_WEIGHTS,
            "weights_sha256": sha256_file(run.out / FUSION_WEIGHTS),
            "text_uri": text_uri,
            "image_uri": image_uri,
        }, metrics={"count": inputs.count, "items_with_images": inputs.items_with_images,
                    "final_loss": final["loss"], "train_time_sec": train_time},
            versions=("torch", "numpy", "safetensors"))
    logger.info("fused %d items (%d with images) in %.1fs (training %.1fs) -> %s", inputs.count,
                inputs.items_with_images, meta["wall_time_sec"], train_time, run.out)
    return meta
