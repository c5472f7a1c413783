"""The text step: title + description of every item through the text encoder, into ``txt.npy``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import PipelineParams
from ..incremental import (
    KeyIndex,
    PreviousGroup,
    PreviousSetError,
    content_keys,
    fingerprint,
)
from ..items import ItemColumns, batch_texts, id_type, iter_batches, validate_items
from ..outputs import TXT_ARRAY, TXT_ITEMS, TXT_META
from ..progress import Progress
from ..step import StepKind
from ..storage import atomic_npy, write_parquet_atomic
from ..tracking import ExperimentTracker
from ..worker import WorkerSetup
from .encoders import APPROXIMATE_BACKENDS, TextEncoder, load_text_encoder
from .quality import check_backend_on_sample

logger = logging.getLogger(__name__)

READ_BATCH_ROWS = 4096  # rows per streamed record batch; bounds memory independently of N


def _gate_on_catalogue(items_uri: str, columns: ItemColumns, params: PipelineParams,
                       encoder: TextEncoder) -> dict[str, Any]:
    """Check an approximate backend against the exact model on this catalogue's first texts,
    before encoding anything (a failure names the numbers and the exact alternative)."""
    first = next(iter_batches(items_uri, [columns.title, columns.description], READ_BATCH_ROWS))
    reference = load_text_encoder(params.text_model, batch_size=params.text_batch_size,
                                  device=encoder.device, backend="torch")
    gate = check_backend_on_sample(batch_texts(first, columns), encoder, reference)
    logger.info("text_backend %s passes the quality gate on %d texts: %s", encoder.backend,
                gate["sample"], gate)
    return gate


def encoder_fingerprint(encoder: TextEncoder) -> str:
    """What makes this encoder's vectors what they are: part of every text row's key."""
    return fingerprint({
        "kind": "text", "weights": encoder.resolved.weights_sha256 or encoder.resolved.location,
        "backend": encoder.backend, "fast_model_sha256": getattr(encoder, "model_sha256", None),
        "max_seq_length": encoder.max_seq_length, "dtype": encoder.dtype,
        "device": encoder.device.split(":")[0], "normalized": True})


def _reusable(previous: PreviousGroup | None, encoder_fp: str, dim: int
              ) -> tuple[KeyIndex, PreviousGroup] | None:
    """The previous set's key index (built once per opened set) and its group, if its vectors
    come from this very encoder."""
    if previous is None:
        return None
    if previous.meta.get("encoder_fingerprint") != encoder_fp:
        logger.warning("previous text outputs at %s were made by another text encoder (%s, "
                       "backend %s): everything is encoded again, nothing is reused",
                       previous.uri, previous.meta.get("encoder_name"),
                       previous.meta.get("text_backend"))
        return None
    shape = previous.shape(TXT_ARRAY)
    if shape[1:] != (dim,):
        raise PreviousSetError(f"previous text vectors at {previous.uri} are {list(shape)}, "
                               f"expected [N, {dim}]")
    if previous.cached(_UNTRUSTED, lambda: [False])[0]:
        return None
    return previous.cached("text-keys", lambda: KeyIndex(
        previous.table(TXT_ITEMS, ["key"]).column("key"))), previous


# Reused rows whose text is encoded again and compared (seeded; at most this many per opened
# previous set, i.e. per worker: the check is about the set, and a worker's many small shards
# must not each pay it): a row that another item's vector took (rows swapped, records
# rewritten to match) fails the comparison.
REUSE_CHECK_ROWS = 16
REUSE_MIN_COSINE = {True: 0.999, False: 0.99}  # exact backend / an approximation (int8, fp16)
_UNTRUSTED = "text-reuse-untrusted"  # [True] on an opened previous group that failed the check


def _check_reused(done: _Encoded, array: np.ndarray, encoder: TextEncoder, exact: bool,
                  previous: PreviousGroup, seed: int) -> None:
    """Encode a seeded sample of the reused rows again (until the worker has checked
    :data:`REUSE_CHECK_ROWS` of this set's rows); when one is not what this encoder makes of its
    text, encode every reused row again (nothing is reused from that set by this worker any
    more) and say so."""
    checked = previous.cached("text-reuse-checked", lambda: [0])  # rows, over the worker
    budget = min(REUSE_CHECK_ROWS - checked[0], len(done.reused_at))
    if budget <= 0:
        return
    checked[0] += budget
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(done.reused_at), size=budget, replace=False)
    rows = np.array(done.reused_at, dtype=np.int64)[picked]
    fresh = encoder.encode([done.reused_texts[i] for i in picked])
    cosines = np.einsum("ij,ij->i", fresh.astype(np.float64), array[rows].astype(np.float64))
    bad = np.flatnonzero(cosines < REUSE_MIN_COSINE[exact])
    if not bad.size:
        return
    previous.cached(_UNTRUSTED, lambda: [False])[0] = True  # a flag the worker's shards share
    logger.warning("previous text vectors at %s are not what this encoder makes of their texts "
                   "at %d of %d sampled reused rows (rows %s, cosines %s): the set's rows do not "
                   "belong to its items (moved, or the file replaced with its records); nothing "
                   "is reused from it, every row is encoded again", previous.uri, bad.size,
                   len(rows), rows[bad][:3].tolist(), np.round(cosines[bad][:3], 4).tolist())
    t0 = time.perf_counter()
    every = np.array(done.reused_at, dtype=np.int64)
    array[every] = encoder.encode(done.reused_texts)
    done.encode_time += time.perf_counter() - t0
    done.reused = 0


TEXT_STEP = StepKind(
    "embed-text", artifact="text_embeddings", meta_file=TXT_META,
    metric_keys=("count", "reused_count", "encoded_count", "encode_time_sec",
                 "throughput_items_per_sec", "fanout_shards", "shard_wall_time_max_sec"),
    logged_params={"model_name": "encoder_name", "batch_size": "batch_size",
                   "text_backend": "text_backend", "items_uri": "items_uri",
                   "previous_uri": "previous_uri"},
    versions=("torch", "sentence-transformers", "transformers", "onnxruntime", "numpy"),
    # an approximate backend's quality gate on this catalogue
    nested_metrics=lambda meta: {f"gate_{key}": value for key, value
                                 in (meta.get("quality_gate") or {}).items() if key != "passed"})


def text_settings(params: PipelineParams, items_uri: str,
                  rows: tuple[int, int] | None = None) -> dict[str, Any]:
    """What the text step is asked to do, by the names its meta file records them under (the
    backend asked for; the meta file records the one that ran)."""
    return {"encoder_name": params.text_model, "text_backend": params.text_backend,
            "batch_size": params.text_batch_size, "items_uri": items_uri,
            "id_column": params.id_column, "rows": list(rows) if rows is not None else None,
            "previous_uri": params.previous_uri}


@dataclass
class _Encoded:
    """What encoding the rows found and did."""

    ids: list[pa.Array] = field(default_factory=list)
    keys: list[pa.Array] = field(default_factory=list)
    rows: int = 0
    empty: int = 0
    null_title: int = 0
    null_description: int = 0
    reused: int = 0
    encode_time: float = 0.0
    reused_at: list[int] = field(default_factory=list)     # rows taken from the previous set
    reused_texts: list[str] = field(default_factory=list)  # and their texts


def _encode_rows(items_uri: str, columns: ItemColumns, rows: tuple[int, int] | None,
                 array: np.ndarray, encoder: TextEncoder, encoder_fp: str,
                 reusable: tuple[KeyIndex, PreviousGroup] | None,
                 progress: Progress) -> _Encoded:
    """Fill ``array`` with every row's vector, in input order: the previous set's vector when
    the row's key is there (byte-identical copies), the encoder's otherwise."""
    done = _Encoded()
    for batch in iter_batches(items_uri, [columns.id, columns.title, columns.description],
                              READ_BATCH_ROWS, rows=rows):
        texts = batch_texts(batch, columns)
        done.null_title += batch.column(columns.title).null_count
        done.null_description += batch.column(columns.description).null_count
        done.empty += sum(1 for t in texts if not t)
        batch_keys = content_keys(encoder_fp, texts)
        previous_rows = (reusable[0].rows(batch_keys) if reusable
                         else np.full(len(texts), -1, dtype=np.int64))
        hit = np.flatnonzero(previous_rows >= 0)
        if hit.size:
            array[done.rows + hit] = reusable[1].rows(TXT_ARRAY, previous_rows[hit])
            done.reused += hit.size
            done.reused_at += (done.rows + hit).tolist()
            done.reused_texts += [texts[i] for i in hit]
        todo = np.flatnonzero(previous_rows < 0)
        if todo.size:
            t0 = time.perf_counter()
            array[done.rows + todo] = encoder.encode([texts[i] for i in todo])
            done.encode_time += time.perf_counter() - t0
        done.ids.append(batch.column(columns.id))
        done.keys.append(batch_keys)
        done.rows += len(texts)
        progress.update(len(texts))
    return done


def _encoder_meta(encoder: TextEncoder, exact: bool, gate: dict[str, Any] | None
                  ) -> dict[str, Any]:
    """What the meta file records of the encoder that ran."""
    return {
        "encoder_location": encoder.resolved.location,
        "text_backend": encoder.backend,
        # exact: the model's own vectors (cosine >= 0.9999 to plain sentence-transformers);
        # otherwise an opt-in approximation and the gate it passed on this catalogue
        "exact": exact,
        "quality_gate": gate,
        # sha256 of the ONNX model the onnx backends run (None for torch backends)
        "fast_model_sha256": getattr(encoder, "model_sha256", None),
        "weights_sha256": encoder.resolved.weights_sha256,
        "embed_dim": encoder.dim,
        "max_seq_length": encoder.max_seq_length,
        "normalized": True,
        "device": encoder.device,
        "dtype": encoder.dtype,
        # incremental runs: keys are sha256(encoder_fingerprint, text) in txt_items.parquet
        "encoder_fingerprint": encoder_fingerprint(encoder),
    }


def embed_items_text(
    items_uri: str,
    output_dir: str | os.PathLike,
    params: PipelineParams = PipelineParams(),
    *,
    run_id: str = "",
    tracker: ExperimentTracker | None = None,
    artifact_uri: str = "",
    rows: tuple[int, int] | None = None,
    device: str | None = None,
    encoder: TextEncoder | None = None,
    setup: WorkerSetup | None = None,
) -> dict[str, Any]:
    """Embed every item's title + description and write the text step's outputs.

    Writes ``txt.npy`` [N, dim] float32 (L2-normalised, input row order), ``txt_items.parquet``
    (ids in the same order) and ``txt_meta.json`` (written last) into ``output_dir``, each
    atomically. Logs an experiment run ``embed-text-<run id>``.

    Args:
        items_uri: Parquet file or folder (local or gs://).
        output_dir: Directory for the three files (created).
        params: Pipeline parameters; this step reads the ``*_column`` names, ``text_model``,
            ``text_batch_size``, ``text_backend`` and ``previous_uri`` (reuse the vectors of
            rows whose key, the text and the encoder, is in that set; the outputs are those of
            a full run).
        run_id: Identifier of the pipeline run (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        artifact_uri: The output's durable URI for the experiment run (the gs:// artifact on
            Vertex, where ``output_dir`` is a local staging directory); default ``output_dir``.
        rows: Only these rows ``[start, stop)`` of the table (one shard of a fan-out,
            :mod:`item_embeddings.fanout`); default all.
        device: Where the encoder runs ('cuda', 'cpu'); default CUDA when available.
        encoder: An already-loaded encoder (tests, benchmarks); loaded from the parameters if
            None.
        setup: What a fan-out worker made for an earlier shard and keeps for the next (the
            encoder, the opened previous set, the validated table); default: made for this call.

    Returns:
        The metadata written to ``txt_meta.json``.

    Raises:
        ItemsError: the items table is unusable (raised before the model loads).
        PreviousSetError: ``previous_uri`` is set but that set is missing or damaged.
    """
    with contextlib.ExitStack() as stack:
        setup = setup or stack.enter_context(WorkerSetup())
        return _embed_rows(items_uri, output_dir, params, setup, run_id=run_id, tracker=tracker,
                           artifact_uri=artifact_uri, rows=rows, device=device,
                           encoder=encoder)


def _embed_rows(items_uri: str, output_dir: str | os.PathLike, params: PipelineParams,
                setup: WorkerSetup, *, run_id: str, tracker: ExperimentTracker | None,
                artifact_uri: str, rows: tuple[int, int] | None, device: str | None,
                encoder: TextEncoder | None) -> dict[str, Any]:
    """:func:`embed_items_text` with the worker's ``setup``."""
    columns = ItemColumns.from_params(params)
    summary = setup.once(("validated", items_uri, columns), lambda: validate_items(
        items_uri, columns))  # before any model loads
    ids_type = id_type(summary.schema.field(columns.id).type)
    start, stop = summary.row_range(rows)
    n = stop - start
    settings = text_settings(params, items_uri, None if rows is None else (start, stop))
    previous = setup.previous(params.previous_uri, "text") if params.previous_uri else None
    with TEXT_STEP.run(output_dir, settings, run_id=run_id, tracker=tracker,
                       artifact_uri=artifact_uri) as run:
        encoder = encoder or setup.once(
            ("text-encoder", params.text_model, params.text_batch_size, params.text_backend,
             device), lambda: load_text_encoder(params.text_model,
                                                batch_size=params.text_batch_size,
                                                device=device, backend=params.text_backend))
        exact = encoder.backend not in APPROXIMATE_BACKENDS
        gate = None if exact else setup.once(("text-gate", items_uri, encoder), lambda: (
            _gate_on_catalogue(items_uri, columns, params, encoder)))
        described = _encoder_meta(encoder, exact, gate)
        reusable = _reusable(previous, described["encoder_fingerprint"], encoder.dim)
        with atomic_npy(run.out / TXT_ARRAY, (n, encoder.dim)) as array, \
                Progress(n, "embed-text") as progress:
            done = _encode_rows(items_uri, columns, rows, array, encoder,
                                described["encoder_fingerprint"], reusable, progress)
            if done.rows != n:
                raise RuntimeError(f"read {done.rows} rows from {items_uri}, expected {n}")
            if reusable:
                _check_reused(done, array, encoder, exact, previous, seed=start)
        # an empty shard still writes the table's id type: the shards' files must concatenate
        write_parquet_atomic(run.out / TXT_ITEMS, pa.table(
            {"id": pa.concat_arrays([pa.array([], ids_type)]
                                    + [i.cast(ids_type) for i in done.ids]),
             "key": pa.concat_arrays([pa.array([], pa.string())] + done.keys)}))
        encoded = n - done.reused
        meta = run.finish_step({
            **settings, **described, "count": n, "empty_text_count": done.empty,
            "null_title_count": done.null_title,
            "null_description_count": done.null_description,
            "throughput_items_per_sec": encoded / done.encode_time if done.encode_time else 0.0,
            "encode_time_sec": done.encode_time, "reused_count": done.reused,
            "encoded_count": encoded})
    logger.info("embedded %d items in %.1fs (%.1f items/s) -> %s", n, done.encode_time,
                meta["throughput_items_per_sec"], run.out)
    return meta
