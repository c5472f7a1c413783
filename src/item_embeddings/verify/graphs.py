"""The kNN graph files of a set: neighbour indices in range, scores that are the cosines of the
rows they link, most similar first."""

from __future__ import annotations

import numpy as np

from ..outputs import (
    FUSED_ARRAY,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    TXT_ARRAY,
)
from .report import CHUNK_ROWS, Report, rows_text

SCORE_TOLERANCE = 1e-3  # a kNN score vs the cosine of its two rows, and the [-1, 1] bounds
_ORDER_SLACK = 1e-6     # float rounding allowed between neighbouring kNN scores
_GATHER_VALUES = 1 << 24  # neighbour vector values gathered at once by the kNN score check (64 MB)

KNN_FILES = (KNN_TEXT, KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES, KNN_META)
# kNN space in knn_meta.json -> (neighbour indices, scores, the array whose rows they link)
KNN_SPACES = {"text": (KNN_TEXT, KNN_TEXT_SCORES, TXT_ARRAY),
              "fused": (KNN_FUSED, KNN_FUSED_SCORES, FUSED_ARRAY)}


def check_graph(space: str, idx: np.ndarray, scores: np.ndarray, vectors: np.ndarray | None,
                report: Report) -> None:
    """Indices in range, not the row itself, no repeats; scores finite, within [-1, 1],
    most similar first, and equal to the cosine of the two rows of ``vectors``."""
    idx_name, score_name, source = KNN_SPACES[space]
    n, k = idx.shape
    bad: dict[str, list[int]] = {key: [] for key in (
        "range", "self", "repeat", "finite", "bounds", "order", "cosine")}
    dim = vectors.shape[1] if vectors is not None and vectors.shape[0] == n else 0
    if dim:
        norms = np.concatenate([np.linalg.norm(np.asarray(vectors[s:s + CHUNK_ROWS]), axis=1)
                                for s in range(0, n, CHUNK_ROWS)])
    step = max(1, min(CHUNK_ROWS, _GATHER_VALUES // max(1, k * dim)))
    for start in range(0, n, step):
        ix = np.asarray(idx[start:start + step], dtype=np.int64)
        sc = np.asarray(scores[start:start + step], dtype=np.float64)
        rows = np.arange(start, start + len(ix))
        in_range = (ix >= 0) & (ix < n)
        ordered = np.sort(ix, axis=1)
        finite = np.isfinite(sc)
        found = {
            "range": ~in_range.all(axis=1),
            "self": (ix == rows[:, None]).any(axis=1),
            "repeat": (ordered[:, 1:] == ordered[:, :-1]).any(axis=1),
            "finite": ~finite.all(axis=1),
            "bounds": (finite & (np.abs(sc) > 1 + SCORE_TOLERANCE)).any(axis=1),
            "order": (np.diff(sc, axis=1) > _ORDER_SLACK).any(axis=1),
        }
        if dim:
            # float32 products (error ~1e-6, far below the tolerance): 6x faster than float64
            linked = np.where(in_range, ix, 0)
            anchors = np.asarray(vectors[start:start + len(ix)])
            dots = np.matmul(vectors[linked], anchors[:, :, None])[..., 0]
            cosine = dots / np.maximum(norms[rows, None] * norms[linked], 1e-12)
            found["cosine"] = (in_range & finite
                               & (np.abs(cosine - sc) > SCORE_TOLERANCE)).any(axis=1)
        for key, hit in found.items():
            bad[key] += rows[hit].tolist()
    messages = {
        "range": f"{idx_name}: {{}} with neighbour indices outside [0, {n})",
        "self": f"{idx_name}: {{}} listing the item itself as its neighbour",
        "repeat": f"{idx_name}: {{}} listing a neighbour twice",
        "finite": f"{score_name}: {{}} with NaN/Inf scores",
        "bounds": f"{score_name}: {{}} with scores outside [-1, 1] "
                  f"(tolerance {SCORE_TOLERANCE})",
        "order": f"{score_name}: {{}} not sorted most similar first",
        "cosine": f"{score_name}: {{}} whose scores are not the cosine of the {source} rows "
                  f"they link (tolerance {SCORE_TOLERANCE}): built from other vectors, or "
                  f"rows moved",
    }
    for key, rows in bad.items():
        if rows:
            report.fail(messages[key].format(rows_text(rows)))

