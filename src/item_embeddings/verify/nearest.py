"""Whether a kNN graph lists the *nearest* rows: a seeded sample of rows per space is searched
exactly against every row, and what the graph lists is compared with what it should list,
within the recall the kNN step recorded.

A row misses ``m`` neighbours when ``m`` rows that it does not list (other than itself) are
more similar to it than its k-th listed neighbour (by more than :data:`NEAR_TIE`, so a
different choice among equal scores is no miss; at most ``k``). An exact graph may miss none;
an approximate one with recorded recall ``r`` misses about ``(1 - r) k`` per row, and is
refused when the sample's recall falls below ``r`` by more than sampling noise can explain
(:func:`allowed_shortfall`).

The search reads the array in blocks (:func:`~item_embeddings.blocks.row_blocks`), so memory is
one block whatever N is, and its cost is bounded: the sample shrinks above
:data:`SEARCH_BUDGET` multiply-adds (docs/benchmarks.md has the times).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..blocks import row_blocks
from ..outputs import KNN_META
from .graphs import KNN_SPACES
from .report import CHUNK_ROWS, Report, rows_text

EXACT_METHOD = "exact"  # knn.graph.METHOD_EXACT (not imported: that module loads torch)
SAMPLE_SEED = 0
MAX_SAMPLE = 256        # rows searched exactly per space, at most
MIN_SAMPLE = 64         # ... and at least (or every row of a smaller set)
SEARCH_BUDGET = 1 << 38  # multiply-adds of one space's exact search (~3 s on 2 cores)
NEAR_TIE = 1e-5         # cosines this close are a tie: float rounding of two computations
NOISE_SIGMAS = 4.0      # how many standard deviations of sampling noise a recall may fall


@dataclass(frozen=True)
class Recorded:
    """What ``knn_meta.json`` says of a space's graph."""

    method: str
    recall: float | None    # recall@k the kNN step measured (None: not a usable number)
    queries: int | None     # the rows it measured it on (None: not recorded)


def _fraction(value: object) -> bool:
    """A JSON number in [0, 1] (not a bool; NaN and Infinity fail the comparison)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def recorded_recall(space: str, info: dict, k: int | None, report: Report) -> Recorded:
    """What ``knn_meta.json`` records of the recall of ``space``'s graph, checked: ``recall_at_k``
    and every ``recall_at`` value a number in [0, 1] (``recall_at`` keys: column counts below
    ``k``), ``recall_queries`` a row count. Returns what is usable of it."""
    where = f"{KNN_META}: spaces.{space}"
    recall = info.get("recall_at_k")
    if not _fraction(recall):
        report.fail(f"{where}.recall_at_k = {recall!r} is not a number in [0, 1]")
        recall = None
    prefixes = info.get("recall_at", {})  # (absent in sets written before it was measured)
    if not isinstance(prefixes, dict):
        report.fail(f"{where}.recall_at = {prefixes!r} is not a mapping of column count to "
                    f"recall")
        prefixes = {}
    for columns, value in prefixes.items():
        if not _fraction(value):
            report.fail(f"{where}.recall_at[{columns!r}] = {value!r} is not a number in [0, 1]")
        if k is not None and not (columns.isdigit() and 1 <= int(columns) < k):
            report.fail(f"{where}.recall_at: {columns!r} is not a column count in [1, {k})")
    queries = info.get("recall_queries")
    if queries is not None and (isinstance(queries, bool) or not isinstance(queries, int)
                                or queries < 0):
        report.fail(f"{where}.recall_queries = {queries!r} is not a row count")
        queries = None
    return Recorded(method=str(info.get("method")), recall=recall, queries=queries or None)


def sample_size(n: int, dim: int) -> int:
    """Rows to search exactly in an ``[n, dim]`` space: :data:`MAX_SAMPLE`, fewer when that
    would cost more than :data:`SEARCH_BUDGET` multiply-adds (not below :data:`MIN_SAMPLE`).

    >>> sample_size(500_000, 384), sample_size(10_000_000, 384), sample_size(40, 384)
    (256, 71, 40)
    """
    return min(n, max(MIN_SAMPLE, min(MAX_SAMPLE, SEARCH_BUDGET // max(1, n * dim))))


def allowed_shortfall(recorded: Recorded, sample: int) -> float:
    """How far the sample's recall may fall below the recorded one by chance alone.

    0 for an exact graph. Otherwise :data:`NOISE_SIGMAS` standard deviations of the
    difference of two independent sample means of per-row recall (``sample`` rows here,
    ``recorded.queries`` rows in the kNN step): a per-row recall in [0, 1] with mean ``1 - q``
    has a variance of at most ``q (1 - q)``. A recall measured as 1 only bounds the miss rate
    ``q`` below about ``3 / queries`` (the rule of three), so ``q`` is at least that.

    >>> round(allowed_shortfall(Recorded("ivf-flat", 0.96, 1000), 256), 4)
    0.0549
    >>> allowed_shortfall(Recorded("exact", 1.0, 1000), 256)
    0.0
    """
    if recorded.method == EXACT_METHOD:
        return 0.0
    queries = recorded.queries or sample
    q = max(1.0 - (recorded.recall or 0.0), 3.0 / queries)
    return NOISE_SIGMAS * math.sqrt(q * (1.0 - q) * (1.0 / sample + 1.0 / queries))


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; NaN for a row that is not finite or is zero."""
    rows = np.asarray(rows, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.where(np.isfinite(unit).all(axis=-1, keepdims=True), unit, np.nan)


def _nearer_rows(vectors: np.ndarray, queries: np.ndarray, listed: np.ndarray,
                 kth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query row, exact search of every row of ``vectors``: how many rows it does not
    list (nor itself) have a cosine above ``kth + NEAR_TIE``, and the best of them (cosine,
    row; -inf and -1 for a row with none)."""
    q = _unit(vectors[queries])
    s = len(queries)
    count = np.zeros(s, np.int64)
    best = np.full(s, -np.inf, np.float32)
    best_row = np.full(s, -1, np.int64)
    # (sample row, column) of the cells that are no candidate: the row itself, its listed ones
    skip_rows = np.repeat(np.arange(s), listed.shape[1] + 1)
    skip_cols = np.concatenate([queries[:, None], listed], axis=1).ravel()
    threshold = (kth + NEAR_TIE).astype(np.float32)[:, None]
    for block in row_blocks(vectors, CHUNK_ROWS, dtype=np.float32):
        measured = np.isfinite(block.norms) & (block.norms > 0)
        scale = np.divide(1, block.norms, out=np.zeros_like(block.norms), where=measured)
        with np.errstate(invalid="ignore", over="ignore"):
            scores = q @ block.rows.T  # float32 products, as the kNN step's
            scores *= scale
        scores[:, ~measured] = -np.inf  # NaN/Inf or zero rows have no direction
        inside = (skip_cols >= block.start) & (skip_cols < block.start + len(block.rows))
        scores[skip_rows[inside], skip_cols[inside] - block.start] = -np.inf
        found = np.count_nonzero(scores > threshold, axis=1)
        count += found
        hit = np.flatnonzero(found)  # (none in a sound graph: the best is only kept for misses)
        if len(hit):
            top = scores[hit].argmax(axis=1)
            top_score = scores[hit, top]
            better = top_score > best[hit]
            best[hit[better]], best_row[hit[better]] = (top_score[better],
                                                        top[better] + block.start)
    return count, best, best_row


def check_nearest(space: str, idx: np.ndarray, vectors: np.ndarray, recorded: Recorded,
                  report: Report) -> None:
    """Search a seeded sample of rows exactly and compare with the neighbours ``idx`` lists:
    an exact graph must miss none; an approximate one's recall on the sample may fall below
    the recorded recall by :func:`allowed_shortfall` at most."""
    idx_name, _, source = KNN_SPACES[space]
    n, k = idx.shape
    if recorded.method != EXACT_METHOD and recorded.recall is None:
        return  # nothing to compare with (the meta check reported the recall)
    rng = np.random.default_rng(SAMPLE_SEED)
    queries = np.sort(rng.choice(n, sample_size(n, vectors.shape[1]), replace=False))
    listed = np.asarray(idx[queries], dtype=np.int64)
    in_range = ((listed >= 0) & (listed < n)).all(axis=1)  # (other rows: the range check)
    queries, listed = queries[in_range], listed[in_range]
    cosines = np.einsum("sd,skd->sk", _unit(vectors[queries]), _unit(vectors[listed]))
    usable = np.isfinite(cosines).all(axis=1)  # (rows without a direction: the norm check)
    queries, listed, cosines = queries[usable], listed[usable], cosines[usable]
    if not len(queries):
        return
    kth = cosines.min(axis=1)
    count, best, best_row = _nearer_rows(vectors, queries, listed, kth)
    misses = np.minimum(count, k)
    recall = 1.0 - misses.sum() / (len(queries) * k)
    shown = "?" if recorded.recall is None else f"{recorded.recall:.4f}"
    report.facts.append(f"{idx_name}: {len(queries)} of {n} rows (seeded sample) searched "
                        f"exactly: recall@{k} {recall:.4f} (recorded {shown}, method "
                        f"{recorded.method})")
    allowed = allowed_shortfall(recorded, len(queries))
    if not misses.any() or (recorded.method != EXACT_METHOD
                            and recall >= recorded.recall - allowed):
        return
    worst = int(np.argmax(misses))
    example = (f"e.g. row {queries[worst]} lists row {listed[worst, np.argmin(cosines[worst])]} "
               f"(cosine {kth[worst]:.4f}) but not row {best_row[worst]} (cosine "
               f"{best[worst]:.4f})")
    if recorded.method == EXACT_METHOD:
        report.fail(f"{idx_name}: {rows_text(queries[misses > 0].tolist())} of "
                    f"{len(queries)} sampled do not list their nearest {source} rows, though "
                    f"{KNN_META} says the graph is exact ({example})")
    else:
        report.fail(f"{idx_name}: recall@{k} {recall:.4f} on {len(queries)} sampled rows "
                    f"searched exactly, but {KNN_META} records {recorded.recall:.4f} "
                    f"({recorded.method}; sampling noise explains {allowed:.4f} less): the "
                    f"graph does not list the nearest {source} rows ({example})")
