"""The kNN graph step: every item's nearest items in the text space and in the fused space."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..config import PipelineParams
from ..modality import mix_metrics, mix_summary, mix_warning, photo_share
from ..outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from ..step import StepKind
from ..storage import atomic_npy
from ..tracking import ExperimentTracker
from .graph import (
    METHOD_EXACT,
    KnnGraph,
    KnnInputError,
    build_knn_graph,
    check_vectors,
    default_device,
)

logger = logging.getLogger(__name__)

# space -> (input array, its id file, neighbour file, score file)
SPACES = {
    "text": (TXT_ARRAY, TXT_ITEMS, KNN_TEXT, KNN_TEXT_SCORES),
    "fused": (FUSED_ARRAY, FUSED_ITEMS, KNN_FUSED, KNN_FUSED_SCORES),
}


def _space_metrics(meta: dict[str, Any]) -> dict[str, float]:
    """Per space: recall@k and @j, search times, whether the graph is exact; the modality mix."""
    metrics: dict[str, float] = {}
    for space, info in meta["spaces"].items():
        metrics.update({f"{space}_recall_at_{j}": r for j, r in info["recall_at"].items()})
        metrics.update({f"{space}_recall_at_k": info["recall_at_k"],
                        f"{space}_time_sec": info["build_time_sec"] + info["query_time_sec"],
                        f"{space}_build_time_sec": info["build_time_sec"],
                        f"{space}_query_time_sec": info["query_time_sec"],
                        f"{space}_exact": float(info["method"] == METHOD_EXACT)})
    metrics.update(mix_metrics(meta["modality_mix"]))
    return metrics


KNN_STEP = StepKind("knn-graph", artifact="knn_graphs", meta_file=KNN_META,
                    metric_keys=("count", "k"),
                    logged_params={"k": "k", "exact_max_items": "exact_max_items",
                                   "recall_queries": "recall_queries", "seed": "seed",
                                   "device": "device"},
                    versions=("numpy", "torch", "faiss-cpu"), nested_metrics=_space_metrics)


def _open_space(folder: Path, array_file: str, ids_file: str) -> tuple[np.ndarray, list]:
    """The memory-mapped array of a step's output and its ids, checked to have as many rows."""
    for name in (array_file, ids_file):
        if not (folder / name).is_file():
            raise KnnInputError(f"{folder / name} not found")
    vectors = np.load(folder / array_file, mmap_mode="r")
    ids = pq.read_table(folder / ids_file, columns=["id"]).column("id").to_pylist()
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise KnnInputError(f"{folder / array_file} has shape {vectors.shape} but "
                            f"{folder / ids_file} lists {len(ids)} ids")
    return vectors, ids


def _has_image(fused_items: Path) -> np.ndarray:
    """[N] bool: which items the fusion step fused with an image (all False if not recorded)."""
    table = pq.read_table(fused_items)
    if "has_image" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return table.column("has_image").to_numpy(zero_copy_only=False).astype(bool)


def _run_id(meta_file: Path) -> str | None:
    """The run id in an input step's meta file (None when the file is absent)."""
    return json.loads(meta_file.read_text()).get("run_id") if meta_file.is_file() else None


def _write_graph(graph: KnnGraph, out: Path, ids_file: str, scores_file: str) -> None:
    for dest, array in ((out / ids_file, graph.neighbours), (out / scores_file, graph.scores)):
        with atomic_npy(dest, array.shape, dtype=array.dtype) as target:
            target[:] = array


def _space_meta(graph: KnnGraph, dim: int) -> dict[str, Any]:
    return {"dim": dim, "method": graph.method, "index_params": graph.index_params,
            "build_time_sec": graph.build_time_sec, "query_time_sec": graph.query_time_sec,
            "recall_at_k": graph.recall_at_k,
            "recall_at": {str(j): r for j, r in graph.recall_by_prefix.items()},
            "recall_queries": graph.recall_queries,
            "recall_time_sec": graph.recall_time_sec, "device": graph.device}


def build_knn_graphs(
    text_dir: str | os.PathLike,
    fused_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    params: PipelineParams = PipelineParams(),
    *,
    run_id: str = "",
    tracker: ExperimentTracker | None = None,
    artifact_uri: str = "",
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Write the ``knn_k`` nearest other items of every item, in the text and fused spaces.

    Writes into ``output_dir``, each atomically: ``knn_text.npy`` / ``knn_fused.npy`` (int32
    ``[N, k]`` row indices in ``txt_items.parquet`` order, most similar first),
    ``knn_text_scores.npy`` / ``knn_fused_scores.npy`` (float32 ``[N, k]`` cosine similarities)
    and ``knn_meta.json`` (written last: method, index parameters, times and measured recall of
    each space, and the ``modality_mix``: the photo share of each space's neighbours for items
    with and without a photo, ``modality.py``). Logs an experiment run ``knn-graph-<run id>``
    with ``text_recall_at_k``, ``fused_recall_at_k`` and the ``photo_share_*`` values among its
    metrics.

    Args:
        text_dir: The text step's output directory (txt.npy, txt_items.parquet).
        fused_dir: The fusion step's output directory (fused.npy, fused_items.parquet).
        output_dir: Directory for the outputs (created).
        params: Pipeline parameters; this step reads ``knn_k``, ``knn_exact_max_items``,
            ``knn_recall_queries`` and ``seed``.
        run_id: Identifier of the pipeline run (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        artifact_uri: The output's durable URI for the experiment run; default ``output_dir``.
        device: torch device of exact search (default: the GPU when there is one).

    Returns:
        The metadata written to ``knn_meta.json``.

    Raises:
        KnnInputError: missing files, row counts that differ from the id files, fused ids
            that are not the text ids in the same order, fewer than 2 items, or NaN/Inf/zero
            vectors (all raised before the experiment run starts). A ``knn_k`` not below the
            item count N is lowered to N - 1 (a warning; ``knn_meta.json`` records ``k`` and
            ``k_requested``).
    """
    dirs = {"text": Path(text_dir), "fused": Path(fused_dir)}
    opened = {space: _open_space(dirs[space], array, ids)
              for space, (array, ids, _, _) in SPACES.items()}
    ids = opened["text"][1]
    has_image = _has_image(dirs["fused"] / FUSED_ITEMS)
    if opened["fused"][1] != ids:
        raise KnnInputError(f"{dirs['fused'] / FUSED_ITEMS} does not list the ids of "
                            f"{dirs['text'] / TXT_ITEMS} in the same order")
    # k neighbours need k + 1 items (self is excluded): a smaller catalogue gets them all
    k = max(1, min(params.knn_k, len(ids) - 1))
    if k < params.knn_k:
        logger.warning("knn_k lowered to %d for %d items: a graph of k neighbours needs k + 1 "
                       "items (self excluded); knn_meta.json records k=%d, k_requested=%d",
                       k, len(ids), k, params.knn_k)
    for space, (vectors, _) in opened.items():
        check_vectors(vectors, k, what=f"{space} vectors", labels=ids)
    device = device or default_device()
    settings = {"k": k, "exact_max_items": params.knn_exact_max_items,
                "recall_queries": params.knn_recall_queries, "seed": params.seed,
                "device": str(device)}
    with KNN_STEP.run(output_dir, settings, run_id=run_id, tracker=tracker,
                      artifact_uri=artifact_uri) as run:
        spaces: dict[str, dict[str, Any]] = {}
        shares: dict[str, dict[str, float | None]] = {}
        for space, (_, _, ids_file, scores_file) in SPACES.items():
            vectors = opened[space][0]
            graph = build_knn_graph(vectors, k,
                                    exact_max_items=params.knn_exact_max_items,
                                    recall_queries=params.knn_recall_queries, seed=params.seed,
                                    device=device, what=f"{space} vectors", labels=ids)
            _write_graph(graph, run.out, ids_file, scores_file)
            shares[space] = photo_share(graph.neighbours, has_image)
            spaces[space] = _space_meta(graph, vectors.shape[1])
        mix = mix_summary(shares, has_image, np.arange(len(ids)), k)
        if mix_warning(mix):
            logger.warning("kNN graphs: %s", mix_warning(mix))
        meta = run.finish_step({
            "k": k,
            "k_requested": params.knn_k,
            "count": len(ids),
            "spaces": spaces,
            "exact_max_items": params.knn_exact_max_items,
            "seed": params.seed,
            "text_run_id": _run_id(dirs["text"] / TXT_META),
            "fusion_run_id": _run_id(dirs["fused"] / FUSION_CONFIG),
            "text_dir": str(text_dir),
            "fused_dir": str(fused_dir),
            "modality_mix": mix,
        })
    logger.info("kNN graphs of %d items (k=%d) in %.1fs: recall@k text %.4f, fused %.4f -> %s",
                len(ids), k, meta["wall_time_sec"], spaces["text"]["recall_at_k"],
                spaces["fused"]["recall_at_k"], run.out)
    return meta
