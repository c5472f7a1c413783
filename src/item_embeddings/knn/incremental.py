"""Incremental kNN graphs: update the previous run's graph instead of searching every row again.

A row of this run is *unchanged* when the previous graph has a row of the same id whose vector
had the same bytes (:func:`.state.row_digests`); the others are *changed* (new items, and items
whose vector differs). The previous graph lists, after the ``k`` neighbours of each row, its
next ``reserve`` ones (:attr:`~.graph.KnnGraph.reserve_neighbours`). The update:

1. takes every unchanged row's previous list (``k`` + reserve) over, renumbered to this run's
   rows, and drops the members that were deleted or changed. What is left is still the row's
   best among the unchanged rows, so a row that lost members is completed from its reserve;
2. searches against all rows the changed rows, and the unchanged rows whose reserve ran out
   (fewer than ``k`` left): *search the changed set against all items*;
3. finds, for every other unchanged row, the changed rows that now enter its list (*all items
   against the changed set*) and merges them in.

On the exact path each step is exact, so the result equals a full rebuild (same order and ties
rule), as long as the unchanged rows kept their relative order (else the update rebuilds). On
the IVF path the index is rebuilt without training: the previous centroids and the list of each
unchanged row are kept, changed rows go to their nearest centroid, and step 2 searches with the
previous ``nprobe``. Step 3 scans, for each changed row, the members of its
``REVERSE_PROBE_FACTOR x nprobe`` nearest lists (a range search), and a changed row enters a
member's list when it scores at least the member's last kept score. Recall is measured as on
every run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..incremental import KeyIndex
from .graph import (
    DB_BLOCK,
    METHOD_EXACT,
    METHOD_IVF,
    QUERY_BLOCK,
    KnnGraph,
    _ivf_search,
    _lexi_order,
    exact_knn,
    measure_recall,
)
from .state import IvfState, SpaceState, fill_ivf, ivf_state, nearest_lists

logger = logging.getLogger(__name__)

RESERVE = 8                 # neighbours kept after the k listed ones (docs/knn.md: how chosen)
# Rebuild in full when the update's work share -- (rows searched + changed rows) / N -- is
# above this: measured crossovers in docs/knn.md ("When the update rebuilds").
REBUILD_WORK_SHARE = {METHOD_EXACT: 0.8, METHOD_IVF: 0.8}
RECALL_TARGET = 0.95        # an IVF graph measured below it is rebuilt, not updated
REVERSE_PROBE_FACTOR = 2    # step 3 scans twice the lists a search probes (docs/knn.md)
RANGE_CHUNK = 512           # changed rows per range search (bounded result memory)


@dataclass(frozen=True)
class PreviousGraph:
    """One space of the previous run's graph, its state and what its meta file says."""

    neighbours: np.ndarray          # int32 [P, k]
    scores: np.ndarray              # float32 [P, k]
    state: SpaceState
    method: str
    recall_at_k: float | None
    index_params: dict[str, Any]
    run_id: str | None


def rows_by_id(previous_ids: pa.Array, ids: pa.Array) -> np.ndarray:
    """int64 [N]: per row of this run, the previous row of the same id (-1: a new item; all
    -1 when the ids changed type, e.g. integers that became strings)."""
    if not previous_ids.type.equals(ids.type):
        return np.full(len(ids), -1, dtype=np.int64)
    return KeyIndex(previous_ids).rows(ids)


def match_rows(prev_row: np.ndarray, previous_digests: np.ndarray,
               digests: np.ndarray) -> np.ndarray:
    """int64 [N]: per row of this run, its previous row (:func:`rows_by_id`) if the vector
    there had the same digest; -1 for a new item or a changed vector."""
    same = prev_row >= 0
    same[same] = previous_digests[prev_row[same]] == digests[same]
    return np.where(same, prev_row, -1)


PLAN_CHUNK = 262144         # rows renumbered at a time (bounded temporaries at 10M rows)


@dataclass(frozen=True)
class Plan:
    """What an update does, known before any search."""

    prev_of_new: np.ndarray         # [N] previous row of each unchanged row, -1 = changed
    new_of_prev: np.ndarray         # int32 [P] this run's row of each previous row, -1 = gone
    changed: np.ndarray             # rows with a new vector
    kept: np.ndarray                # unchanged rows
    lists: np.ndarray               # int32 [len(kept), k + R]: previous lists renumbered to
    scores: np.ndarray              # this run's rows, lost members removed, -1 / -inf after
    counts: np.ndarray              # [len(kept)] members left
    searched: np.ndarray            # changed rows + kept rows with fewer than k left (sorted)
    deleted: int                    # previous rows whose id is gone
    monotone: bool                  # unchanged rows kept their relative order

    @property
    def work_share(self) -> float:
        """(rows searched against all + changed rows searched against by all) / N."""
        return (len(self.searched) + len(self.changed)) / len(self.prev_of_new)


def plan_update(previous: PreviousGraph, prev_of_new: np.ndarray, deleted: int, k: int,
                reserve: int) -> Plan:
    """The rows an update takes over, searches and merges (see the module doc).

    ``deleted``: previous rows whose id is not in this run (for the record).
    """
    width = k + reserve
    kept = np.flatnonzero(prev_of_new >= 0)
    changed = np.flatnonzero(prev_of_new < 0)
    new_of_prev = np.full(len(previous.neighbours), -1, dtype=np.int32)
    new_of_prev[prev_of_new[kept]] = kept
    lists = np.full((len(kept), width), -1, dtype=np.int32)
    scores = np.full((len(kept), width), -np.inf, dtype=np.float32)
    counts = np.empty(len(kept), dtype=np.int64)
    for start in range(0, len(kept), PLAN_CHUNK):
        old = prev_of_new[kept[start:start + PLAN_CHUNK]]
        ids = np.concatenate([previous.neighbours[old],
                              previous.state.reserve_neighbours[old]], axis=1)[:, :width]
        sc = np.concatenate([previous.scores[old],
                             previous.state.reserve_scores[old]], axis=1)[:, :width]
        mapped = np.where(ids >= 0, new_of_prev[np.maximum(ids, 0)], -1)
        valid = mapped >= 0
        whole = valid.all(axis=1)                     # most rows lost nothing: as they are
        lists[start + np.flatnonzero(whole), :mapped.shape[1]] = mapped[whole]
        scores[start + np.flatnonzero(whole), :mapped.shape[1]] = sc[whole]
        part = np.flatnonzero(~whole)                 # the others: the members left, moved to
        rows, cols = np.nonzero(valid[part])          # the front in their order
        place = (np.cumsum(valid[part], axis=1) - 1)[rows, cols]
        lists[start + part[rows], place] = mapped[part[rows], cols]
        scores[start + part[rows], place] = sc[part[rows], cols]
        counts[start:start + len(old)] = valid.sum(axis=1)
    return Plan(prev_of_new=prev_of_new, new_of_prev=new_of_prev, changed=changed, kept=kept,
                lists=lists, scores=scores, counts=counts,
                searched=np.union1d(changed, kept[counts < k]), deleted=deleted,
                monotone=bool((np.diff(prev_of_new[kept]) > 0).all()))


def previous_mismatch(previous: PreviousGraph, method: str, k: int, dim: int) -> str | None:
    """Why the previous graph cannot be updated into this one (None: it can)."""
    if previous.method != method:
        return (f"the graph is {method} now and was {previous.method} (the item count crossed "
                "knn_exact_max_items)")
    if previous.neighbours.shape[1] != k:
        return f"k is {k} now and was {previous.neighbours.shape[1]}"
    ivf = previous.state.ivf
    if method == METHOD_IVF and (ivf is None or ivf.centroids.shape[1] != dim):
        return "the previous IVF lists do not fit these vectors"
    if method == METHOD_IVF and previous.recall_at_k is not None \
            and previous.recall_at_k < RECALL_TARGET:
        return (f"the previous graph's measured recall@k {previous.recall_at_k:.4f} is below "
                f"{RECALL_TARGET}")
    return None


def plan_reason(plan: Plan, method: str) -> str | None:
    """Why this update should rather be a full rebuild (None: update)."""
    if method == METHOD_EXACT and not plan.monotone:
        return ("the unchanged items changed their relative order, so ties would be broken "
                "differently than by a full rebuild")
    threshold = REBUILD_WORK_SHARE[method]
    if plan.work_share > threshold:
        return (f"{len(plan.changed):,} new or changed rows and {len(plan.searched):,} rows to "
                f"search make a work share of {plan.work_share:.1%}, above {threshold:.0%}: "
                "a full rebuild is cheaper")
    return None


def _merge(ids: np.ndarray, scores: np.ndarray, rows: np.ndarray, keep: np.ndarray,
           cand_ids: np.ndarray, cand_scores: np.ndarray) -> None:
    """Merge candidates into the lists of ``rows`` (in place), keeping ``keep`` members each,
    ordered by score, then row."""
    width = ids.shape[1]
    merged_ids, merged_scores = _lexi_order(
        np.concatenate([ids[rows], cand_ids.astype(np.int32)], axis=1),
        np.concatenate([scores[rows], cand_scores.astype(np.float32)], axis=1))
    merged_ids, merged_scores = merged_ids[:, :width], merged_scores[:, :width]
    beyond = np.arange(width)[None, :] >= keep[:, None]
    merged_ids[beyond], merged_scores[beyond] = -1, -np.inf
    ids[rows], scores[rows] = merged_ids, merged_scores


def _ivf_index(x: np.ndarray, ivf: IvfState, plan: Plan):
    """An IVF index of all rows on the previous centroids: unchanged rows stay in their list,
    changed rows go to their nearest centroid (no training, no assignment of the others)."""
    import faiss

    nlist, dim = ivf.centroids.shape
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(np.ascontiguousarray(ivf.centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.referenced_objects = [quantizer]       # the index does not own its quantizer
    lists = np.empty(len(x), dtype=np.int64)
    lists[plan.kept] = ivf.lists[plan.prev_of_new[plan.kept]]
    if len(plan.changed):
        lists[plan.changed] = nearest_lists(index, x[plan.changed])
    fill_ivf(index, x, lists)
    index.nprobe = ivf.nprobe
    return index, ivf_state(index, lists)


def _reverse_pairs(index, x: np.ndarray, changed: np.ndarray, threshold: np.ndarray,
                   width: int, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, changed row, score) for each row that a changed row scores at least
    ``threshold[row]`` with (+inf: a row that takes no candidates), among the members of the
    changed row's ``REVERSE_PROBE_FACTOR x nprobe`` nearest lists; per row its best ``width``,
    grouped by row, best first."""
    nprobe = index.nprobe
    index.nprobe = min(index.nlist, REVERSE_PROBE_FACTOR * nprobe)
    radius = float(threshold[np.isfinite(threshold)].min()) - 1e-6
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    try:
        for start in range(0, len(changed), RANGE_CHUNK):
            queries = changed[start:start + RANGE_CHUNK]
            lims, scores, rows = index.range_search(x[queries], radius)
            by = np.repeat(queries, np.diff(lims.astype(np.int64)))
            hit = scores >= threshold[rows]
            found.append((rows[hit], by[hit], scores[hit]))
    finally:
        index.nprobe = nprobe
    rows, by, scores = (np.concatenate(part) for part in zip(*found))
    order = np.lexsort((by, -scores, rows))
    rows, by, scores = rows[order], by[order], scores[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = rank < width
    logger.info("%s: %d changed rows enter %d lists", desc, len(np.unique(by[keep])),
                len(starts))
    return rows[keep], by[keep], scores[keep]


def _as_lists(rows: np.ndarray, by: np.ndarray, scores: np.ndarray, width: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs grouped by row (as :func:`_reverse_pairs` returns them) -> (the rows, their
    candidates [R, width] padded with -1 / -inf, the candidates' scores)."""
    targets, starts = np.unique(rows, return_index=True)
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    where = np.repeat(np.arange(len(targets)), np.diff(np.r_[starts, len(rows)]))
    cand_ids = np.full((len(targets), width), -1, dtype=np.int64)
    cand_scores = np.full((len(targets), width), -np.inf, dtype=np.float32)
    cand_ids[where, rank], cand_scores[where, rank] = by, scores
    return targets, cand_ids, cand_scores


def _search(x: np.ndarray, rows: np.ndarray, width: int, index, device: torch.device,
            desc: str) -> tuple[np.ndarray, np.ndarray]:
    """``width`` nearest other rows of ``rows`` among all rows: exactly, or with ``index``."""
    if index is None:
        return exact_knn(x, width, queries=rows, device=device, desc=desc)
    ids, scores = _ivf_search(index, x, rows, width, desc=desc)
    unfilled = np.flatnonzero((ids < 0).any(axis=1))
    if len(unfilled):  # probed lists held too few rows (as on the full path)
        ids[unfilled], scores[unfilled] = exact_knn(x, width, queries=rows[unfilled],
                                                    device=device, desc=f"{desc} unfilled rows")
    return ids, scores


def _entering(x: np.ndarray, plan: Plan, merge: np.ndarray, width: int, index,
              device: torch.device, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the kept rows ``merge`` (positions in ``plan.kept``): which of them changed rows may
    enter, and those candidates (rows, [R, width] ids, scores)."""
    rows = plan.kept[merge]
    if not len(plan.changed) or not len(rows):
        return np.zeros(0, dtype=np.int64), np.zeros((0, width)), np.zeros((0, width))
    if index is None:  # every row against the changed rows, exactly; score blocks of the
        # usual size (QUERY_BLOCK x DB_BLOCK): few changed rows make tall blocks
        tall = max(QUERY_BLOCK, QUERY_BLOCK * DB_BLOCK // len(plan.changed))
        cand_ids, cand_scores = exact_knn(x, width, queries=rows, database=plan.changed,
                                          device=device, query_block=tall,
                                          desc=f"{desc} against changed rows")
        return merge, cand_ids, cand_scores
    threshold = np.full(len(x), np.inf, dtype=np.float32)
    threshold[rows] = plan.scores[merge, plan.counts[merge] - 1]   # the last member kept
    pair_rows, by, scores = _reverse_pairs(index, x, plan.changed, threshold, width, desc)
    targets, cand_ids, cand_scores = _as_lists(pair_rows, by, scores, width)
    position = np.full(len(x), -1, dtype=np.int64)
    position[plan.kept] = np.arange(len(plan.kept))
    return position[targets], cand_ids, cand_scores


def _kept_lists(previous: PreviousGraph, plan: Plan, graph: np.ndarray, merge: np.ndarray
                ) -> tuple[int, int]:
    """Of the kept rows ``merge`` (not searched): how many list exactly their previous ``k``
    (reused), and how many lost a member among them (completed from the reserve)."""
    reused = lost = 0
    for start in range(0, len(merge), PLAN_CHUNK):
        rows = plan.kept[merge[start:start + PLAN_CHUNK]]
        before = plan.new_of_prev[previous.neighbours[plan.prev_of_new[rows]]]
        reused += int((graph[rows] == before).all(axis=1).sum())
        lost += int((before < 0).any(axis=1).sum())
    return reused, lost


def update_knn_graph(x: np.ndarray, k: int, previous: PreviousGraph, plan: Plan, *,
                     recall_queries: int, seed: int, device: torch.device,
                     what: str) -> KnnGraph:
    """This run's graph from the previous one and ``plan`` (see the module doc).

    Args:
        x: This run's unit rows (:func:`~.vectors.unit_rows`).
        k: Neighbours per row (as the previous graph).
        previous: The previous graph of the same space.
        plan: :func:`plan_update` of this run's rows against ``previous``.
        recall_queries, seed, device, what: as :func:`~.graph.build_knn_graph`.
    """
    width = plan.lists.shape[1]
    started = time.perf_counter()
    index, ivf = (_ivf_index(x, previous.state.ivf, plan) if previous.method == METHOD_IVF
                  else (None, None))
    build_time = time.perf_counter() - started
    started = time.perf_counter()
    ids = np.full((len(x), width), -1, dtype=np.int32)
    scores = np.full((len(x), width), -np.inf, dtype=np.float32)
    ids[plan.kept], scores[plan.kept] = plan.lists, plan.scores
    if len(plan.searched):
        found_ids, found_scores = _lexi_order(*_search(x, plan.searched, width, index, device,
                                                       f"{what} rows to search"))
        ids[plan.searched], scores[plan.searched] = found_ids, found_scores
    search_time = time.perf_counter() - started
    merge = np.flatnonzero(plan.counts >= k)
    targets, cand_ids, cand_scores = _entering(x, plan, merge, width, index, device, what)
    _merge(ids, scores, plan.kept[targets], plan.counts[targets], cand_ids, cand_scores)
    if not plan.monotone:  # renumbered rows: restore the ties rule in the other lists too
        rest = plan.kept[np.setdiff1d(merge, targets)]
        ids[rest], scores[rest] = _lexi_order(ids[rest], scores[rest])
    query_time = time.perf_counter() - started
    graph_ids, graph_scores = ids[:, :k], scores[:, :k]
    recall = measure_recall(x, graph_ids, np.random.default_rng(seed), recall_queries,
                            device=device, what=what)
    reused, from_reserve = _kept_lists(previous, plan, graph_ids, merge)
    exhausted = len(plan.searched) - len(plan.changed)
    incremental = {
        "previous_run_id": previous.run_id, "changed_count": len(plan.changed),
        "deleted_count": plan.deleted, "searched_count": len(plan.searched),
        "reserve_exhausted_count": exhausted, "completed_from_reserve_count": from_reserve,
        "entered_count": len(merge) - reused - from_reserve, "reserve": width - k,
        "work_share": plan.work_share, "rebuild_work_share": REBUILD_WORK_SHARE[previous.method],
        "search_time_sec": search_time, "merge_time_sec": query_time - search_time,
        **({"nprobe": ivf.nprobe, "reverse_nprobe": min(len(ivf.centroids),
                                                        REVERSE_PROBE_FACTOR * ivf.nprobe)}
           if ivf else {})}
    logger.info("%s: updated %d rows of %d (%d changed, %d searched, %d completed from the "
                "reserve, %d with changed rows entering), %d reused; recall@%d %.4f",
                what, len(x) - reused, len(x), len(plan.changed), len(plan.searched),
                from_reserve, incremental["entered_count"], reused, k, recall.at_k)
    params = dict(previous.index_params)
    if ivf is not None:
        params["tuned_by_run"] = params.get("tuned_by_run", previous.run_id)
    return KnnGraph(neighbours=graph_ids, scores=graph_scores, method=previous.method,
                    index_params=params, build_time_sec=build_time, query_time_sec=query_time,
                    recall_at_k=recall.at_k, recall_by_prefix=recall.by_prefix,
                    recall_queries=recall.queries, recall_time_sec=recall.time_sec,
                    device=str(device), reserve_neighbours=ids[:, k:],
                    reserve_scores=scores[:, k:], ivf=ivf, reused_count=reused,
                    incremental=incremental)


def top_overlap(neighbours: np.ndarray, previous_neighbours: np.ndarray, prev_row: np.ndarray,
                rows: np.ndarray, top: int) -> np.ndarray:
    """Per row of ``rows``: the share of its first ``top`` neighbours that were among the first
    ``top`` of its previous list (items matched by ``prev_row``: the previous row of each of
    this run's rows, -1 for none)."""
    new_of_prev = np.full(len(previous_neighbours), -1, dtype=np.int64)
    had = np.flatnonzero(prev_row >= 0)
    new_of_prev[prev_row[had]] = had
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), PLAN_CHUNK // 4):
        chunk = rows[start:start + PLAN_CHUNK // 4]
        now = neighbours[chunk, :top].astype(np.int64)
        before = new_of_prev[previous_neighbours[prev_row[chunk], :top]]
        out[start:start + len(chunk)] = (now[:, :, None] == before[:, None, :]).any(axis=2).sum(
            axis=1) / top
    return out
