"""Item-to-item kNN graphs: exact blocked top-k, a faiss IVF index above a size, measured recall.

Every item's ``k`` most cosine-similar other items. Up to ``exact_max_items`` items the graph is
exact: blocks of query rows are multiplied with blocks of all rows and a running top-k is kept,
so memory is bounded by one ``query_block x db_block`` score block, never ``N x N``. It runs with
torch on a GPU when there is one, on the CPU otherwise (docs/knn.md has the measurements).
Above the threshold a faiss ``IVF<nlist>,Flat`` index (inner product on unit rows, spherical
k-means) is used: ``nprobe`` is raised until a tuning sample of queries reaches
``TUNE_RECALL`` against exact search, and the recall of the delivered graph is then measured
on a separate random sample.

Ties: a row lists its neighbours by score, highest first, and among equal scores the smaller
row index first; when equal scores straddle the k-th place, the smaller indices are kept. The
exact path follows this rule exactly; the approximate path orders what the index found by it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..progress import Progress
from .state import IvfState, fill_ivf, ivf_state, nearest_lists
from .vectors import CHECK_ROWS, KnnInputError, unit_rows

logger = logging.getLogger(__name__)

METHOD_EXACT = "exact"
METHOD_IVF = "ivf-flat"
# Rows per score block of the exact path: QUERY_BLOCK x DB_BLOCK float32 = 128 MiB at most
# (512 x 65536 was the fastest of five shapes of that size measured, docs/knn.md).
QUERY_BLOCK = 512
DB_BLOCK = 65536
# A returned neighbour counts as a hit when its true score is within this of the exact k-th
# best score, so a different choice among (near-)equal scores is not a miss.
RECALL_TOLERANCE = 1e-5
# The target is recall@k >= 0.95; the tuning sample must reach more, as the recall of a
# 1000-query sample varies by about 0.005 between samples.
TUNE_RECALL = 0.965
TUNE_QUERIES = 1000         # tuning sample of the approximate path
# nprobe values tried in turn, about 1.25x apart (search time grows in proportion)
NPROBES = (4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320,
           384, 512)
TRAIN_POINTS_PER_LIST = 64  # k-means sample: faiss asks for 30..256 points per centroid
SEARCH_CHUNK = 16384        # queries per faiss search call (progress, bounded result memory)
RECALL_PREFIXES = (1, 5, 10, 15)  # consumers read the first columns: their recall is measured too


@dataclass(frozen=True)
class KnnGraph:
    """The ``k`` nearest other rows of every row and how they were found."""

    neighbours: np.ndarray          # int32 [N, k], row indices, most similar first
    scores: np.ndarray              # float32 [N, k], cosine similarities, descending
    method: str                     # METHOD_EXACT or METHOD_IVF
    index_params: dict[str, Any]
    build_time_sec: float           # index training and adding (0 for exact search)
    query_time_sec: float           # the search of all N rows
    recall_at_k: float              # measured on ``recall_queries`` random rows
    recall_by_prefix: dict[int, float]  # recall@j of the first j columns, j in RECALL_PREFIXES
    recall_queries: int
    recall_time_sec: float
    device: str
    # The next neighbours after the k listed ones ([N, reserve], -1 / -inf where a row has
    # fewer): what lets an incremental update replace a deleted neighbour without a search.
    reserve_neighbours: np.ndarray | None = None
    reserve_scores: np.ndarray | None = None
    ivf: IvfState | None = None     # the IVF path's lists, kept for an incremental update
    reused_count: int = 0           # rows whose list an incremental update kept as it was
    incremental: dict[str, Any] | None = None   # what an incremental update did (None: full)


def default_device() -> torch.device:
    """The GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lexi_topk(values: torch.Tensor, ids: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` best (value, id) pairs: higher value first, then smaller id."""
    by_id = ids.argsort(dim=1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), ids.gather(1, by_value)


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` columns of each row of a score block (positions in the block).

    ``topk`` picks an arbitrary subset when equal scores straddle the k-th place; those rows
    are redone with a stable sort, which keeps the smaller positions.
    """
    if scores.shape[1] <= k:
        cols = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
        return scores, cols
    values, cols = scores.topk(k + 1, dim=1)
    straddle = torch.nonzero(values[:, k - 1] == values[:, k]).flatten()
    if len(straddle):
        values[straddle], cols[straddle] = (
            t[:, :k + 1] for t in scores[straddle].sort(dim=1, descending=True, stable=True))
    return values[:, :k], cols[:, :k]


@torch.no_grad()
def exact_knn(x: np.ndarray, k: int, *, queries: np.ndarray | None = None,
              database: np.ndarray | None = None, device: torch.device | None = None,
              query_block: int = QUERY_BLOCK, db_block: int = DB_BLOCK,
              desc: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product of ``queries`` (row indices; all rows when None)
    among all other rows of ``x`` (unit rows, as :func:`unit_rows` returns), or among the
    rows ``database`` (sorted row indices) only.

    Memory holds ``x`` on the device and one ``query_block x db_block`` score block.

    Returns:
        ``(neighbours int64 [Q, k], scores float32 [Q, k])``, ordered as the module says;
        -1 / -inf fill the places a ``database`` of fewer than ``k`` other rows leaves.
    """
    device = device or default_device()
    rows = np.arange(len(x)) if queries is None else np.asarray(queries, dtype=np.int64)
    base = torch.from_numpy(x).to(device)
    db_rows = None if database is None else torch.from_numpy(
        np.asarray(database, dtype=np.int64)).to(device)
    n = len(x) if db_rows is None else len(db_rows)
    out_ids = np.empty((len(rows), k), dtype=np.int64)
    out_scores = np.empty((len(rows), k), dtype=np.float32)
    with Progress(len(rows), desc or "exact kNN", unit="row") as progress:
        for q0 in range(0, len(rows), query_block):
            q_rows = torch.from_numpy(rows[q0:q0 + query_block]).to(device)
            q = base[q_rows]
            best = torch.full((len(q_rows), k), -math.inf, device=device)
            best_ids = torch.full((len(q_rows), k), -1, dtype=torch.int64, device=device)
            for d0 in range(0, n, db_block):
                if db_rows is None:
                    scores = q @ base[d0:d0 + db_block].T
                    own = ((q_rows >= d0) & (q_rows < d0 + scores.shape[1])).nonzero().flatten()
                    scores[own, q_rows[own] - d0] = -math.inf     # self is never a neighbour
                    block_ids = None
                else:
                    block_ids = db_rows[d0:d0 + db_block]
                    scores = q @ base[block_ids].T
                    scores[q_rows[:, None] == block_ids[None, :]] = -math.inf
                values, cols = _block_topk(scores, k)
                found = cols + d0 if block_ids is None else block_ids[cols]
                found[values == -math.inf] = -1
                best, best_ids = _lexi_topk(torch.cat([best, values], dim=1),
                                            torch.cat([best_ids, found], dim=1), k)
            out_ids[q0:q0 + len(q_rows)] = best_ids.cpu().numpy()
            out_scores[q0:q0 + len(q_rows)] = best.cpu().numpy()
            progress.update(len(q_rows))
    return out_ids, out_scores


def recall_at_k(x: np.ndarray, neighbours: np.ndarray, queries: np.ndarray,
                exact_scores: np.ndarray) -> float:
    """Share of the ``k`` listed neighbours of each query row that are true top-``k`` ones.

    A listed row is a hit when it is another row, listed once, and its true score is at least
    the exact k-th best score minus ``RECALL_TOLERANCE``; with distinct scores this is the
    usual overlap of the two id sets. Scores are recomputed from ``x``, not taken from the graph.

    Args:
        x: The unit rows the graph was built on.
        neighbours: ``[N, k]`` (or ``[Q, k]`` listing the query rows' neighbours only); its
            first ``j`` columns with the first ``j`` exact scores give recall@j.
        queries: Row indices of the sample.
        exact_scores: ``[Q, k]`` exact scores of the queries, best first (:func:`exact_knn`).
    """
    listed = neighbours[queries] if len(neighbours) == len(x) else neighbours
    listed = listed.astype(np.int64)
    k = listed.shape[1]
    valid = (listed >= 0) & (listed < len(x)) & (listed != queries[:, None])
    safe = np.where(valid, listed, 0)
    true = np.einsum("qd,qkd->qk", x[queries], x[safe])
    hit_ids = np.where(valid & (true >= exact_scores[:, -1:] - RECALL_TOLERANCE), listed, -1)
    hit_ids.sort(axis=1)
    first = np.ones_like(hit_ids, dtype=bool)
    first[:, 1:] = hit_ids[:, 1:] != hit_ids[:, :-1]     # a row listed twice counts once
    return float(((hit_ids >= 0) & first).sum() / (len(queries) * k))


def _drop_self(ids: np.ndarray, scores: np.ndarray, queries: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """``k + 1`` search results per query -> ``k`` without the query itself (the last one
    goes when the query is not among them)."""
    keep = ids != queries[:, None]
    keep[keep.all(axis=1), k] = False
    return ids[keep].reshape(-1, k), scores[keep].reshape(-1, k)


def _lexi_order(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows reordered by score descending, then by id ascending."""
    by_id = np.argsort(ids, axis=1, kind="stable")
    ids, scores = np.take_along_axis(ids, by_id, 1), np.take_along_axis(scores, by_id, 1)
    by_score = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(ids, by_score, 1), np.take_along_axis(scores, by_score, 1)


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` rows: the power of two nearest 4 sqrt(n), as autofaiss picks
    for an unquantised IVF below 1M vectors (and at most n / 39, so k-means has 39 points per
    centroid, faiss's minimum)."""
    return max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))


def _ivf_search(index, x: np.ndarray, queries: np.ndarray, k: int, desc: str = ""
                ) -> tuple[np.ndarray, np.ndarray]:
    ids = np.empty((len(queries), k), dtype=np.int32)   # N < 2^31: half of int64's memory
    scores = np.empty((len(queries), k), dtype=np.float32)
    with Progress(len(queries), desc or "IVF kNN", unit="row") as progress:
        for start in range(0, len(queries), SEARCH_CHUNK):
            q = queries[start:start + SEARCH_CHUNK]
            found_scores, found = index.search(x[q], k + 1)
            ids[start:start + len(q)], scores[start:start + len(q)] = _drop_self(
                found, found_scores, q, k)
            progress.update(len(q))
    return ids, scores


@dataclass(frozen=True)
class _Search:
    """Every row's neighbours as one search method found them, and how."""

    ids: np.ndarray               # [N, k (+ reserve)]: int64 (exact), int32 (IVF)
    scores: np.ndarray            # float32 [N, k (+ reserve)]
    index_params: dict[str, Any]
    build_time_sec: float
    query_time_sec: float
    ivf: IvfState | None = None   # the IVF path's lists, kept for an incremental update


def _ivf_knn(x: np.ndarray, k: int, rng: np.random.Generator, device: torch.device,
             desc: str, reserve: int = 0) -> _Search:
    """The approximate graph: train and fill an IVF index, tune nprobe for ``k``, search
    every row for ``k + reserve``."""
    import faiss

    n, dim = x.shape
    nlist = ivf_nlist(n)
    started = time.perf_counter()
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True        # unit centroids: assignment by inner product is cosine
    train_size = min(n, TRAIN_POINTS_PER_LIST * nlist)
    index.train(x[np.sort(rng.choice(n, train_size, replace=False))])
    lists = nearest_lists(index, x)
    fill_ivf(index, x, lists)
    build_time = time.perf_counter() - started

    tune = np.sort(rng.choice(n, min(TUNE_QUERIES, n), replace=False))
    _, tune_exact = exact_knn(x, k, queries=tune, device=device, desc=f"{desc} tuning sample")
    tried: dict[int, float] = {}
    for nprobe in [p for p in NPROBES if p < nlist] + [nlist]:
        index.nprobe = nprobe
        found, _ = _ivf_search(index, x, tune, k, desc=f"{desc} tuning nprobe={nprobe}")
        tried[nprobe] = recall_at_k(x, found, tune, tune_exact)
        if tried[nprobe] >= TUNE_RECALL:
            break
    else:
        logger.warning("%s: no nprobe up to %d reached recall %.2f on the tuning sample",
                       desc, nlist, TUNE_RECALL)
    tune_time = time.perf_counter() - started - build_time
    logger.info("%s: IVF%d nprobe=%d (tuning recall %s) in %.1fs", desc, nlist, index.nprobe,
                {p: round(r, 4) for p, r in tried.items()}, tune_time)

    started = time.perf_counter()
    ids, scores = _ivf_search(index, x, np.arange(n), k + reserve, desc=desc)
    unfilled = np.flatnonzero((ids < 0).any(axis=1))
    if len(unfilled):  # probed lists held fewer than k other rows: search those rows exactly
        ids[unfilled], scores[unfilled] = exact_knn(x, k + reserve, queries=unfilled,
                                                    device=device, desc=f"{desc} unfilled rows")
    query_time = time.perf_counter() - started
    params = {"index": f"IVF{nlist},Flat", "metric": "inner_product", "nlist": nlist,
              "nprobe": int(index.nprobe), "train_size": train_size, "spherical_kmeans": True,
              "kmeans_iterations": int(index.cp.niter),
              "tune_queries": len(tune), "tune_recall_target": TUNE_RECALL,
              "tune_recall_by_nprobe": {str(p): r for p, r in tried.items()},
              "tune_time_sec": tune_time, "exact_rows": len(unfilled),
              "faiss_threads": faiss.omp_get_max_threads(), "faiss_version": faiss.__version__}
    return _Search(ids, scores, params, build_time, query_time, ivf_state(index, lists))


def build_knn_graph(vectors: np.ndarray, k: int, *, exact_max_items: int,
                    recall_queries: int = 1000, seed: int = 0,
                    device: torch.device | None = None, what: str = "vectors",
                    labels: Sequence[Any] | None = None, reserve: int = 0,
                    scratch: Path | None = None) -> KnnGraph:
    """The ``k`` nearest other rows of every row of ``vectors`` by cosine similarity.

    Args:
        vectors: ``[N, d]`` float32 rows (normalised here; a memory map is fine).
        k: Neighbours per row, ``1 <= k < N``.
        exact_max_items: Exact search up to this many rows, the IVF index above.
        recall_queries: Random rows whose neighbours are checked against exact search
            (at least 1; all rows when N is smaller).
        seed: Seed of the samples (recall, tuning, k-means training).
        device: torch device of exact search (default: the GPU when there is one).
        what: How messages and progress lines name the vectors ("text vectors").
        labels: Item ids of the rows, for error messages.
        reserve: Also find the next ``reserve`` neighbours of every row (at most N - 1 - k),
            returned apart from the graph (:attr:`KnnGraph.reserve_neighbours`).
        scratch: A directory for the normalised copy (see :func:`unit_rows`); None: memory.

    Raises:
        KnnInputError: see :func:`~.vectors.check_vectors`; ``recall_queries`` below 1.
    """
    if isinstance(recall_queries, bool) or not isinstance(recall_queries, int) \
            or recall_queries < 1:
        raise KnnInputError(f"recall_queries must be a positive integer, got {recall_queries!r}")
    x = unit_rows(vectors, k, what=what, labels=labels, scratch=scratch)
    device = device or default_device()
    n = len(x)
    rng = np.random.default_rng(seed)
    reserve = max(0, min(reserve, n - 1 - k))
    if n <= exact_max_items:
        method = METHOD_EXACT
        started = time.perf_counter()
        ids, scores = exact_knn(x, k + reserve, device=device, desc=f"{what} exact kNN")
        search = _Search(ids, scores, {"query_block": QUERY_BLOCK, "db_block": DB_BLOCK,
                                       "torch_threads": torch.get_num_threads()},
                         build_time_sec=0.0, query_time_sec=time.perf_counter() - started)
    else:
        method = METHOD_IVF
        search = _ivf_knn(x, k, rng, device, f"{what} kNN", reserve)
    ids, scores = search.ids, search.scores
    for start in range(0, n, CHECK_ROWS):  # in row blocks: bounded temporaries at 10M rows
        ids[start:start + CHECK_ROWS], scores[start:start + CHECK_ROWS] = _lexi_order(
            ids[start:start + CHECK_ROWS], scores[start:start + CHECK_ROWS])
    ids, scores, reserve_ids, reserve_scores = ids[:, :k], scores[:, :k], ids[:, k:], scores[:, k:]
    recall = measure_recall(x, ids, rng, recall_queries, device=device, what=what)
    logger.info("%s: %s kNN of %d rows, k=%d: recall@%d %.4f on %d queries, search %.1fs",
                what, method, n, k, k, recall.at_k, recall.queries, search.query_time_sec)
    return KnnGraph(neighbours=ids.astype(np.int32), scores=scores,
                    method=method, index_params=search.index_params,
                    build_time_sec=search.build_time_sec, query_time_sec=search.query_time_sec,
                    recall_at_k=recall.at_k, recall_by_prefix=recall.by_prefix,
                    recall_queries=recall.queries, recall_time_sec=recall.time_sec,
                    device=str(device), reserve_neighbours=reserve_ids.astype(np.int32),
                    reserve_scores=reserve_scores.astype(np.float32), ivf=search.ivf)


@dataclass(frozen=True)
class Recall:
    """A graph's recall@k (and @j of its first columns) on a random sample of rows."""

    at_k: float
    by_prefix: dict[int, float]
    queries: int
    time_sec: float


def measure_recall(x: np.ndarray, neighbours: np.ndarray, rng: np.random.Generator,
                   recall_queries: int, *, device: torch.device, what: str) -> Recall:
    """Recall of ``neighbours`` (the graph of the unit rows ``x``) on ``recall_queries`` rows
    drawn from ``rng``, against exact search (:func:`recall_at_k`)."""
    started = time.perf_counter()
    n, k = neighbours.shape
    sample = np.sort(rng.choice(n, min(recall_queries, n), replace=False))
    _, exact_scores = exact_knn(x, k, queries=sample, device=device,
                                desc=f"{what} recall sample")
    by_prefix = {j: recall_at_k(x, neighbours[:, :j], sample, exact_scores[:, :j])
                 for j in RECALL_PREFIXES if j < k}
    return Recall(at_k=recall_at_k(x, neighbours, sample, exact_scores), by_prefix=by_prefix,
                  queries=len(sample), time_sec=time.perf_counter() - started)
