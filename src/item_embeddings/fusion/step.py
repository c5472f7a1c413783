"""The fusion step: join text and image vectors by id, then train the fusion MLP (``train``) or
apply the previous set's (``apply``), and write the fused codes."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..config import PipelineParams
from ..incremental import KeyIndex, PreviousGroup, VerifiedSet, open_previous
from ..modality import mix_metrics, mix_warning, modality_mix, sample_neighbours
from ..outputs import FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, FUSION_EXCLUSIONS, FUSION_WEIGHTS
from ..step import StepKind
from ..storage import atomic_npy, atomic_path, sha256_file, write_parquet_atomic
from ..tracking import ExperimentTracker
from .inputs import (
    SCAN_ROWS,
    FusionInputError,
    FusionInputs,
    fused_row_keys,
    gather,
    load_fusion_inputs,
)
from .model import NORM_WEIGHT, OBJECTIVE, FusionMLP, load_fusion_model, save_fusion_model
from .targets import TAU
from .training import (
    WARMUP_SHARE,
    check_init,
    evaluation_sample,
    torch_threads,
    train_fusion_model,
)

logger = logging.getLogger(__name__)

EXCLUSION_REASON = "non-finite or zero image vector"
MIX_K = 10              # neighbours per item of the modality mix (the top-10)
MIX_ITEMS = 4096        # items of the evaluation sample the modality mix is measured on

FUSION_STEP = StepKind(
    "fuse-modal", artifact="fused_embeddings", meta_file=FUSION_CONFIG,
    metric_keys=("count", "items_with_images", "image_vectors_excluded", "reused_count",
                 "computed_count", "final_loss", "best_epoch", "epochs_trained", "train_time_sec",
                 "wall_time_sec"),
    logged_params={name: name for name in (
        "fusion_mode", "output_dim", "hidden_dim", "epochs", "min_steps", "lr", "batch_size",
        "seed", "objective", "init", "text_uri", "image_uri", "previous_uri")},
    versions=("torch", "numpy", "safetensors"),
    nested_metrics=lambda meta: mix_metrics(meta["modality_mix"]))
# the settings only training reads (applying takes the previous model as it is)
TRAINING_SETTINGS = ("epochs", "min_steps", "lr", "batch_size", "seed", "init")


@torch.no_grad()
def _write_fused(model: FusionMLP, inputs: FusionInputs, dest: Path,
                 reuse: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """Write every item's code; ``reuse`` = (previous row per item or -1, previous codes) copies
    the rows the same weights already fused, byte for byte. Returns how many were copied."""
    rows = reuse[0] if reuse else np.full(inputs.count, -1, dtype=np.int64)
    with atomic_npy(dest, (inputs.count, model.output_dim)) as fused:
        for start in range(0, inputs.count, SCAN_ROWS):
            stop = min(start + SCAN_ROWS, inputs.count)
            chunk = rows[start:stop]
            copied = np.flatnonzero(chunk >= 0)
            if copied.size:
                fused[start + copied] = reuse[1][chunk[copied]]
            todo = np.flatnonzero(chunk < 0)
            if todo.size:
                z, _ = model(*gather(inputs, start + todo))
                fused[start + todo] = z.numpy()
    return int((rows >= 0).sum())


def _sample_mix(inputs: FusionInputs, fused_path: Path, seed: int) -> dict[str, Any]:
    """The modality mix of the text and fused spaces on the first MIX_ITEMS of the evaluation
    sample (every item up to that many): each sampled item's top-MIX_K neighbours among them."""
    rows = np.sort(evaluation_sample(inputs.count, seed)[:MIX_ITEMS])
    fused = np.load(fused_path, mmap_mode="r")
    mix = modality_mix({"text": sample_neighbours(inputs.text[rows], MIX_K),
                        "fused": sample_neighbours(fused[rows], MIX_K)},
                       inputs.image_row[rows] >= 0)
    warning = mix_warning(mix)
    if warning:
        logger.warning("fusion: %s", warning)
    return mix


def _previous_model(previous: PreviousGroup, inputs: FusionInputs) -> FusionMLP:
    """The previous set's fusion model, if it fits these inputs; else a clear error."""
    model = load_fusion_model(previous.dir / FUSION_WEIGHTS)
    dims = (inputs.text.shape[1], inputs.image.shape[1])
    if (model.text_dim, model.img_dim) != dims:
        raise FusionInputError(f"fusion_mode 'apply': the fusion model at {previous.uri} takes "
                               f"text/image vectors of {model.text_dim}/{model.img_dim} "
                               f"dimensions, these inputs have {dims[0]}/{dims[1]}")
    for side, meta in (("text", inputs.text_meta), ("image", inputs.image_meta)):
        trained_on = model.metadata.get(f"{side}_encoder_fingerprint")
        if trained_on != meta.get("encoder_fingerprint"):
            raise FusionInputError(
                f"fusion_mode 'apply': the fusion model at {previous.uri} was trained on "
                f"{side} vectors of another {side} encoder (fingerprint {trained_on}, these "
                f"are {meta.get('encoder_fingerprint')}); retrain with fusion_mode 'train'")
    return model


def _reusable_rows(previous: PreviousGroup, inputs: FusionInputs) -> tuple[np.ndarray, np.ndarray]:
    """Per item the previous fused row with the same text and image keys (-1 if none)."""
    keys = inputs.row_keys()
    table = previous.table(FUSED_ITEMS)
    if keys is None or "text_key" not in table.column_names:
        return np.full(inputs.count, -1, dtype=np.int64), previous.array(FUSED_ARRAY)
    previous_keys = fused_row_keys(table.column("text_key").combine_chunks(),
                                   table.column("image_key").combine_chunks())
    return KeyIndex(previous_keys).rows(keys), previous.array(FUSED_ARRAY)


def fusion_settings(params: PipelineParams, init: str, text_uri: str, image_uri: str
                    ) -> dict[str, Any]:
    """What the fusion step is asked to do, by the names its meta file records them under."""
    return {"fusion_mode": params.fusion_mode, "output_dim": params.fusion_output_dim,
            "hidden_dim": params.fusion_hidden_dim, "epochs": params.fusion_epochs,
            "min_steps": params.fusion_min_steps, "lr": params.fusion_lr,
            "batch_size": params.fusion_batch_size, "seed": params.seed,
            "objective": OBJECTIVE, "init": init, "text_uri": text_uri, "image_uri": image_uri,
            "previous_uri": params.previous_uri}


def _applied(previous: PreviousGroup, inputs: FusionInputs) -> tuple[FusionMLP, dict[str, Any]]:
    """The previous set's model, and what the meta file records of where it came from."""
    model = _previous_model(previous, inputs)
    return model, {"applied_from": previous.uri, "trained_by_run": model.metadata.get("run_id")}


def _trained(inputs: FusionInputs, params: PipelineParams, settings: dict[str, Any]
             ) -> tuple[FusionMLP, dict[str, Any]]:
    """A model trained on ``inputs`` (its best epoch, the start included), and what the meta
    file records of the training."""
    trained = train_fusion_model(inputs, params, settings["init"])
    return trained.model, {
        **{key: settings[key] for key in TRAINING_SETTINGS},
        # more than ``epochs`` where the catalogue is too small for ``min_steps`` steps in those
        "epochs_trained": len(trained.history),
        "objective_params": {"tau": TAU, "norm_weight": NORM_WEIGHT,
                             "warmup_share": WARMUP_SHARE, "schedule": "warmup-cosine"},
        "imputation": trained.imputation.summary(),
        # the objective on a fixed sample: at the start, after each epoch, and of the kept
        # weights (the best epoch; 0 = the start)
        "initial_eval_loss": trained.initial_eval_loss,
        "best_epoch": trained.best_epoch,
        "final_loss": trained.eval_loss,
        "loss_history": trained.history,
    }


def _write_outputs(model: FusionMLP, inputs: FusionInputs, out: Path, run_id: str,
                   params: PipelineParams, previous: PreviousGroup | None) -> dict[str, Any]:
    """Write the fused codes, their ids and keys, the exclusions and the weights (with
    ``previous``, the codes of unchanged items and the weights are copied from that set).
    Returns what the meta file records of them: the codes copied and computed, the time the
    writes took, the weights file and its sha256."""
    started = time.perf_counter()
    reused = _write_fused(model, inputs, out / FUSED_ARRAY,
                          _reusable_rows(previous, inputs) if previous else None)
    no_keys = pa.nulls(inputs.count, pa.string())
    write_parquet_atomic(out / FUSED_ITEMS, pa.table(
        {"id": inputs.ids, "has_image": pa.array(inputs.image_row >= 0),
         "text_key": no_keys if inputs.text_keys is None else inputs.text_keys,
         "image_key": no_keys if inputs.image_keys is None else inputs.image_keys}))
    write_parquet_atomic(out / FUSION_EXCLUSIONS, pa.table(
        {"id": pa.array(inputs.excluded_ids, type=inputs.ids.type),
         "reason": pa.array([EXCLUSION_REASON] * len(inputs.excluded_ids), type=pa.string())}))
    if previous:  # the very same weights file, byte for byte
        with atomic_path(out / FUSION_WEIGHTS) as tmp:
            shutil.copyfile(previous.dir / FUSION_WEIGHTS, tmp)
    else:
        save_fusion_model(model, out / FUSION_WEIGHTS, {
            "run_id": run_id, "seed": params.seed,
            "text_encoder_fingerprint": inputs.text_meta.get("encoder_fingerprint"),
            "image_encoder_fingerprint": inputs.image_meta.get("encoder_fingerprint")})
    return {"reused_count": reused, "computed_count": inputs.count - reused,
            "write_time_sec": time.perf_counter() - started, "weights_file": FUSION_WEIGHTS,
            "weights_sha256": sha256_file(out / FUSION_WEIGHTS)}


def _inputs_meta(model: FusionMLP, inputs: FusionInputs) -> dict[str, Any]:
    """What the meta file records of the model's shape and of the inputs it fused."""
    return {
        "text_dim": model.text_dim, "img_dim": model.img_dim,
        "hidden_dim": model.hidden_dim, "output_dim": model.output_dim,
        "count": inputs.count, "items_with_images": inputs.items_with_images,
        "items_without_images": inputs.count - inputs.items_with_images,
        "image_vectors_excluded": len(inputs.excluded_ids),
        "image_failures": inputs.image_failures,
        "text_run_id": inputs.text_meta.get("run_id"),
        "image_run_id": inputs.image_meta.get("run_id"),
    }


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
    verified: VerifiedSet | None = None,
) -> dict[str, Any]:
    """Fuse every item's text and image vectors into one ``fusion_output_dim`` code.

    Writes into ``output_dir``, each atomically: ``fused.npy`` [N, output_dim] float32
    (L2-normalised, the text step's item order), ``fused_items.parquet`` (``id``, ``has_image``,
    ``text_key``, ``image_key``), ``fusion_model.safetensors`` (reload with
    :func:`~.model.load_fusion_model`), ``fusion_exclusions.parquet`` (``id``, ``reason``: image
    vectors that could not be used) and ``fusion_config.json`` (written last). Logs an
    experiment run ``fuse-modal-<run id>``.

    ``fusion_mode`` 'train' trains a model and keeps its best epoch (the start included);
    'apply' takes the model of the set at ``previous_uri`` and copies the codes of the items
    whose text and image keys are unchanged, so they stay identical across runs.

    Args:
        text_dir: The text step's output directory (txt.npy, txt_items.parquet, txt_meta.json).
        image_dir: The image step's output directory (img.npy, img_items.parquet, img_meta.json).
        output_dir: Directory for the outputs (created).
        params: Pipeline parameters; this step reads the ``fusion_*`` settings, ``seed`` and
            ``previous_uri``.
        run_id: Identifier of the pipeline run (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        artifact_uri: The output's durable URI for the experiment run; default ``output_dir``.
        input_uris: Where the text and image inputs came from (the artifacts' URIs, recorded in
            the config); default the two directories.
        num_threads: torch CPU threads (None: 1 below SINGLE_THREAD_BELOW_ITEMS items, else
            torch's current setting). Outputs are byte-identical for the same inputs, seed and
            thread count.
        init: 'pca' (start from the linear PCA projection) or 'random'.
        verified: What the run's first task verified of the previous set (its files are then
            only checked to be unchanged, not hashed again).

    Returns:
        The metadata written to ``fusion_config.json``.

    Raises:
        FusionInputError: the inputs cannot be fused, or (apply) the previous model does not
            fit them (raised before any output is written).
        PreviousSetError: (apply) the previous set is missing or damaged.
    """
    check_init(init)
    apply = params.fusion_mode == "apply"
    started = time.perf_counter()
    inputs = load_fusion_inputs(text_dir, image_dir)
    load_time = time.perf_counter() - started
    settings = fusion_settings(params, init, *(input_uris or (str(text_dir), str(image_dir))))
    with open_previous(params.previous_uri if apply else "", "fusion",
                       verified=verified) as previous, \
            FUSION_STEP.run(output_dir, settings, run_id=run_id, tracker=tracker,
                            artifact_uri=artifact_uri) as run, \
            torch_threads(num_threads, inputs.count) as threads:
        t0 = time.perf_counter()
        model, training = (_applied(previous, inputs) if apply
                           else _trained(inputs, params, settings))
        train_time = time.perf_counter() - t0
        written = _write_outputs(model, inputs, run.out, run.run_id, params, previous)
        meta = run.finish_step({
            **{key: settings[key] for key in ("fusion_mode", "objective", "text_uri",
                                              "image_uri", "previous_uri")},
            **training, **_inputs_meta(model, inputs), **written, "normalized": True,
            "torch_threads": threads, "load_time_sec": load_time, "train_time_sec": train_time,
            "modality_mix": _sample_mix(inputs, run.out / FUSED_ARRAY, params.seed)})
    logger.info("fused %d items (%d with images, %d codes reused) in %.1fs (%s %.1fs) -> %s",
                inputs.count, inputs.items_with_images, meta["reused_count"], meta["wall_time_sec"],
                "applying" if apply else "training", train_time, run.out)
    return meta
