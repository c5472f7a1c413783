"""The kNN graph step: every item's nearest items in the text space and in the fused space,
built in full or updated from the previous run's graphs (``previous_uri``)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..config import PipelineParams
from ..incremental import PreviousGroup, open_previous
from ..modality import mix_metrics, mix_summary, mix_warning, photo_share
from ..outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_FUSED_STATE,
    KNN_ITEMS,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    KNN_TEXT_STATE,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from ..step import StepKind
from ..storage import atomic_npy, write_parquet_atomic
from ..tracking import ExperimentTracker
from .graph import METHOD_EXACT, METHOD_IVF, KnnGraph, build_knn_graph, default_device
from .incremental import (
    RESERVE,
    PreviousGraph,
    match_rows,
    plan_reason,
    plan_update,
    previous_mismatch,
    rows_by_id,
    top_overlap,
    update_knn_graph,
)
from .memory import check_memory
from .state import SpaceState, content_digests, row_digests
from .vectors import KnnInputError, check_vectors, unit_rows

logger = logging.getLogger(__name__)

# space -> (input array, its id file, neighbour file, score file, state file)
SPACES = {
    "text": (TXT_ARRAY, TXT_ITEMS, KNN_TEXT, KNN_TEXT_SCORES, KNN_TEXT_STATE),
    "fused": (FUSED_ARRAY, FUSED_ITEMS, KNN_FUSED, KNN_FUSED_SCORES, KNN_FUSED_STATE),
}
DRIFT_TOP = 20              # night-over-night drift: overlap of the first 20 neighbours


def _space_metrics(meta: dict[str, Any]) -> dict[str, float]:
    """Per space: recall@k and @j, search times, whether the graph is exact, the rows
    recomputed and reused, the night-over-night drift (with a previous set); the modality mix."""
    metrics: dict[str, float] = {}
    for space, info in meta["spaces"].items():
        metrics.update({f"{space}_recall_at_{j}": r for j, r in info["recall_at"].items()})
        metrics.update({f"{space}_recall_at_k": info["recall_at_k"],
                        f"{space}_time_sec": info["build_time_sec"] + info["query_time_sec"],
                        f"{space}_build_time_sec": info["build_time_sec"],
                        f"{space}_query_time_sec": info["query_time_sec"],
                        f"{space}_exact": float(info["method"] == METHOD_EXACT),
                        f"{space}_recomputed_count": info["recomputed_count"],
                        f"{space}_reused_count": info["reused_count"]})
        drift = info.get("drift") or {}
        if drift.get("mean_overlap") is not None:
            metrics[f"{space}_drift_top{drift['top']}_overlap"] = drift["mean_overlap"]
    metrics.update(mix_metrics(meta["modality_mix"]))
    return metrics


KNN_STEP = StepKind("knn-graph", artifact="knn_graphs", meta_file=KNN_META,
                    metric_keys=("count", "k"),
                    logged_params={"k": "k", "exact_max_items": "exact_max_items",
                                   "recall_queries": "recall_queries", "seed": "seed",
                                   "device": "device", "previous_uri": "previous_uri"},
                    versions=("numpy", "torch", "faiss-cpu"), nested_metrics=_space_metrics)


def _open_space(folder: Path, array_file: str, ids_file: str) -> tuple[np.ndarray, pa.Table]:
    """The memory-mapped array of a step's output and its id table, checked to have as many
    rows."""
    for name in (array_file, ids_file):
        if not (folder / name).is_file():
            raise KnnInputError(f"{folder / name} not found")
    vectors = np.load(folder / array_file, mmap_mode="r")
    table = pq.read_table(folder / ids_file)
    if vectors.ndim != 2 or len(vectors) != table.num_rows:
        raise KnnInputError(f"{folder / array_file} has shape {vectors.shape} but "
                            f"{folder / ids_file} lists {table.num_rows} ids")
    return vectors, table


def _has_image(fused_items: pa.Table) -> np.ndarray:
    """[N] bool: which items the fusion step fused with an image (all False if not recorded)."""
    if "has_image" not in fused_items.column_names:
        return np.zeros(fused_items.num_rows, dtype=bool)
    return fused_items.column("has_image").to_numpy(zero_copy_only=False).astype(bool)


class _Labels:
    """Item ids by row for error messages, without a Python list of 10M strings."""

    def __init__(self, ids: pa.Array):
        self._ids = ids

    def __getitem__(self, row: int):
        return self._ids[row].as_py()

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(frozen=True)
class PreviousKnn:
    """The previous run's graphs of both spaces (verified), for an incremental update."""

    uri: str
    ids: pa.Array                   # the ids of its rows
    content: np.ndarray             # their content digests (state.content_digests)
    spaces: dict[str, PreviousGraph]
    meta: dict[str, Any]

    @classmethod
    def load(cls, group: PreviousGroup) -> PreviousKnn:
        items = group.table(KNN_ITEMS)
        spaces = {}
        for space, (_, _, ids_file, scores_file, state_file) in SPACES.items():
            info = group.meta["spaces"][space]
            spaces[space] = PreviousGraph(
                neighbours=group.array(ids_file), scores=group.array(scores_file),
                state=SpaceState.load(group.dir / state_file), method=info["method"],
                recall_at_k=info.get("recall_at_k"), index_params=info.get("index_params", {}),
                run_id=group.meta.get("run_id"))
        return cls(uri=group.uri, ids=items.column("id").combine_chunks(),
                   content=items.column("content_digest").to_numpy(), spaces=spaces,
                   meta=group.meta)


def _meta(meta_file: Path) -> dict[str, Any]:
    """An input step's meta file ({} when the file is absent)."""
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def _content(fused_items: pa.Table) -> np.ndarray:
    """Each item's content digest, from the keys fusion records (0s without them)."""
    if {"text_key", "image_key"} <= set(fused_items.column_names):
        return content_digests(fused_items.column("text_key"), fused_items.column("image_key"))
    return np.zeros(fused_items.num_rows, dtype=np.uint64)


def _why_full(space: str, params: PipelineParams, group: PreviousGroup | None,
              fusion: dict[str, Any]) -> str | None:
    """Why a space is built in full before looking at its rows (None: it may be updated)."""
    if not params.previous_uri:
        return None                 # a full run, nothing to say
    if group is None:
        return (f"the previous set {params.previous_uri} has no kNN graphs with an update state "
                "(none, or made by an earlier version)")
    before, now = group.meta.get("fusion_weights_sha256"), fusion.get("weights_sha256")
    if space == "fused" and before and now and before != now:
        return (f"the fusion model is not the previous run's (fusion_mode="
                f"{fusion.get('fusion_mode')}: retrained), so every fused vector is new")
    return None


def _drift(graph: KnnGraph, previous: PreviousKnn, space: str, prev_row: np.ndarray,
           content: np.ndarray) -> dict[str, Any]:
    """Night-over-night drift: for the items whose content is unchanged (same id, same text and
    image keys), the overlap of their first DRIFT_TOP neighbours with the previous run's."""
    top = min(DRIFT_TOP, graph.neighbours.shape[1])
    has = prev_row >= 0
    unchanged = np.flatnonzero(has & (content != 0)
                               & (content == previous.content[np.where(has, prev_row, 0)]))
    overlap = top_overlap(graph.neighbours, previous.spaces[space].neighbours, prev_row,
                          unchanged, top)
    return {"items": len(unchanged), "top": top,
            "mean_overlap": float(overlap.mean()) if len(overlap) else None,
            "identical_share": float((overlap == 1).mean()) if len(overlap) else None,
            "p10_overlap": float(np.quantile(overlap, 0.1)) if len(overlap) else None,
            "previous_run_id": previous.meta.get("run_id")}


def _write_graph(graph: KnnGraph, out: Path, ids_file: str, scores_file: str) -> None:
    for dest, array in ((out / ids_file, graph.neighbours), (out / scores_file, graph.scores)):
        with atomic_npy(dest, array.shape, dtype=array.dtype) as target:
            target[:] = array


def _space_meta(graph: KnnGraph, dim: int, rebuild_reason: str | None) -> dict[str, Any]:
    return {"dim": dim, "method": graph.method, "index_params": graph.index_params,
            "build_time_sec": graph.build_time_sec, "query_time_sec": graph.query_time_sec,
            "recall_at_k": graph.recall_at_k,
            "recall_at": {str(j): r for j, r in graph.recall_by_prefix.items()},
            "recall_queries": graph.recall_queries,
            "recall_time_sec": graph.recall_time_sec, "device": graph.device,
            "update": "incremental" if graph.incremental is not None else "full",
            "rebuild_reason": rebuild_reason, "incremental": graph.incremental,
            "recomputed_count": len(graph.neighbours) - graph.reused_count,
            "reused_count": graph.reused_count}


def _space_graph(space: str, vectors: np.ndarray, digests: np.ndarray, k: int,
                 previous: PreviousKnn | None, prev_row: np.ndarray, why_full: str | None,
                 params: PipelineParams, device: torch.device,
                 scratch: Path) -> tuple[KnnGraph, str | None]:
    """The graph of one space: updated from ``previous`` when it can be and is cheaper, else
    built in full. Returns it and why it was built in full (None: updated, or no previous)."""
    what = f"{space} vectors"
    n, dim = vectors.shape
    reserve = max(0, min(RESERVE, n - 1 - k))
    method = METHOD_EXACT if n <= params.knn_exact_max_items else METHOD_IVF
    reason = why_full
    if reason is None and previous is not None:
        prev = previous.spaces[space]
        reason = previous_mismatch(prev, method, k, dim)
        if reason is None:
            plan = plan_update(prev, match_rows(prev_row, prev.state.digests, digests),
                               len(previous.ids) - int((prev_row >= 0).sum()), k, reserve)
            reason = plan_reason(plan, method)
            if reason is None:
                return update_knn_graph(unit_rows(vectors, k, what=what, scratch=scratch), k,
                                        prev, plan,
                                        recall_queries=params.knn_recall_queries,
                                        seed=params.seed, device=device, what=what), None
    if reason is not None:
        logger.info("%s: kNN graph built in full: %s", what, reason)
    return build_knn_graph(vectors, k, exact_max_items=params.knn_exact_max_items,
                           recall_queries=params.knn_recall_queries, seed=params.seed,
                           device=device, what=what, reserve=reserve, scratch=scratch), reason


def _open_inputs(dirs: dict[str, Path], params: PipelineParams
                 ) -> tuple[dict[str, tuple[np.ndarray, pa.Table]], pa.Array, int]:
    """Both spaces' vectors and id tables, checked; the item ids (the same in both, in the same
    order); the k this catalogue allows (``knn_k``, or N - 1 for a smaller one). Refuses, before
    any work, inputs the step cannot use and a machine with less memory than it needs."""
    knn_k = params.knn_k
    opened = {space: _open_space(dirs[space], array, ids)
              for space, (array, ids, *_) in SPACES.items()}
    ids = opened["text"][1].column("id").combine_chunks()
    if not opened["fused"][1].column("id").combine_chunks().equals(ids):
        raise KnnInputError(f"{dirs['fused'] / FUSED_ITEMS} does not list the ids of "
                            f"{dirs['text'] / TXT_ITEMS} in the same order")
    # k neighbours need k + 1 items (self is excluded): a smaller catalogue gets them all
    k = max(1, min(knn_k, len(ids) - 1))
    if k < knn_k:
        logger.warning("knn_k lowered to %d for %d items: a graph of k neighbours needs k + 1 "
                       "items (self excluded); knn_meta.json records k=%d, k_requested=%d",
                       k, len(ids), k, knn_k)
    for space, (vectors, _) in opened.items():
        check_vectors(vectors, k, what=f"{space} vectors", labels=_Labels(ids))
    check_memory(len(ids), tuple(v.shape[1] for v, _ in opened.values()), k,
                 RESERVE, ivf=len(ids) > params.knn_exact_max_items,
                 update=bool(params.previous_uri))
    return opened, ids, k


class _Previous(NamedTuple):
    """The previous set's kNN state, and where this run's rows were in it."""

    knn: PreviousKnn | None
    row: np.ndarray | None      # per row of this run, its row in the previous set (-1: new)
    content: np.ndarray         # this run's content digests (drift is over unchanged items)


def _write_space(space: str, vectors: np.ndarray, k: int, why_full: str | None,
                 params: PipelineParams, previous: _Previous, device: torch.device,
                 scratch: Path, out: Path, has_image: np.ndarray
                 ) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Build (or update) one space's graph and write its files and state: returns its
    ``knn_meta.json`` entry and the photo share of its neighbours by group."""
    _, _, ids_file, scores_file, state_file = SPACES[space]
    digests = row_digests(vectors)
    graph, reason = _space_graph(space, vectors, digests, k, previous.knn, previous.row,
                                 why_full, params, device, scratch)
    _write_graph(graph, out, ids_file, scores_file)
    SpaceState(digests=digests, reserve_neighbours=graph.reserve_neighbours,
               reserve_scores=graph.reserve_scores, ivf=graph.ivf).save(out / state_file)
    meta = _space_meta(graph, vectors.shape[1], reason)
    if previous.knn is not None:
        meta["drift"] = _drift(graph, previous.knn, space, previous.row, previous.content)
    return meta, photo_share(graph.neighbours, has_image)


def _graph_mix(shares: dict[str, dict[str, float | None]], has_image: np.ndarray, k: int
               ) -> dict[str, Any]:
    """The modality mix of both graphs over every item, from the photo share of each space's
    neighbours by group (``shares``); a warning when it is off."""
    mix = mix_summary(shares, has_image, np.arange(len(has_image)), k)
    if warning := mix_warning(mix):
        logger.warning("kNN graphs: %s", warning)
    return mix


def _provenance(params: PipelineParams, text_dir: str | os.PathLike,
                fused_dir: str | os.PathLike, fusion: dict[str, Any]) -> dict[str, Any]:
    """What ``knn_meta.json`` records of the settings and the inputs the graphs came from."""
    return {"exact_max_items": params.knn_exact_max_items, "seed": params.seed,
            "reserve": RESERVE, "previous_uri": params.previous_uri,
            "text_run_id": _meta(Path(text_dir) / TXT_META).get("run_id"),
            "fusion_run_id": fusion.get("run_id"),
            "fusion_weights_sha256": fusion.get("weights_sha256"),
            "text_dir": str(text_dir), "fused_dir": str(fused_dir)}


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

    Writes into ``output_dir``, each atomically (docs/outputs.md): ``knn_text.npy`` /
    ``knn_fused.npy`` (int32 ``[N, k]`` rows of ``txt_items.parquet``, most similar first), their
    ``*_scores.npy`` (float32 cosines), what the next run's update starts from
    (``knn_items.parquet``, ``knn_*_state.npz``) and, last, ``knn_meta.json`` (per space method,
    times, recall, recomputed/reused counts, drift; the ``modality_mix``). Logs an experiment
    run ``knn-graph-<run id>``.

    With ``previous_uri``, each space's graph is updated from the previous set's (docs/knn.md,
    *Incremental update*) unless that set has none, the space's vectors or settings changed
    too much, or a full rebuild is cheaper; ``knn_meta.json`` says which and why.

    Args:
        text_dir: The text step's output directory (txt.npy, txt_items.parquet).
        fused_dir: The fusion step's output directory (fused.npy, fused_items.parquet,
            fusion_config.json).
        output_dir: Directory for the outputs (created).
        params: Pipeline parameters; this step reads ``knn_k``, ``knn_exact_max_items``,
            ``knn_recall_queries``, ``seed`` and ``previous_uri``.
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
        PreviousSetError: the previous set's kNN files do not match what it recorded.
        KnnMemoryError: the machine has less memory than the step needs for these items
            (:mod:`.memory`), raised before any work.
    """
    dirs = {"text": Path(text_dir), "fused": Path(fused_dir)}
    opened, ids, k = _open_inputs(dirs, params)
    has_image = _has_image(opened["fused"][1])
    fusion = _meta(dirs["fused"] / FUSION_CONFIG)
    content = _content(opened["fused"][1])
    device = device or default_device()
    settings = {"k": k, "exact_max_items": params.knn_exact_max_items,
                "recall_queries": params.knn_recall_queries, "seed": params.seed,
                "device": str(device), "previous_uri": params.previous_uri}
    with open_previous(params.previous_uri, "knn", optional=True) as group, \
            KNN_STEP.run(output_dir, settings, run_id=run_id, tracker=tracker,
                         artifact_uri=artifact_uri) as run, \
            tempfile.TemporaryDirectory(prefix="item-embeddings-knn-") as scratch:
        previous = PreviousKnn.load(group) if group is not None else None
        prev_row = rows_by_id(previous.ids, ids) if previous is not None else None
        spaces: dict[str, dict[str, Any]] = {}
        shares: dict[str, dict[str, float | None]] = {}
        for space in SPACES:  # one graph in memory at a time
            spaces[space], shares[space] = _write_space(
                space, opened[space][0], k, _why_full(space, params, group, fusion), params,
                _Previous(previous, prev_row, content), device, Path(scratch), run.out,
                has_image)
        write_parquet_atomic(run.out / KNN_ITEMS, pa.table({"id": ids, "content_digest": content}))
        meta = run.finish_step({"k": k, "k_requested": params.knn_k, "count": len(ids),
                                "spaces": spaces, "modality_mix": _graph_mix(shares, has_image, k),
                                **_provenance(params, text_dir, fused_dir, fusion)})
    logger.info("kNN graphs of %d items (k=%d) in %.1fs: recall@k text %.4f, fused %.4f -> %s",
                len(ids), k, meta["wall_time_sec"], spaces["text"]["recall_at_k"],
                spaces["fused"]["recall_at_k"], run.out)
    return meta
