"""The quality gate a fast text backend must pass against the float32 reference (docs/text.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

# The quality gate a fast backend must pass against the float32 reference on the same texts.
GATE_MEAN_COSINE = 0.99
GATE_MIN_COSINE = 0.97
GATE_TOP10_OVERLAP = 0.90


def _top_k(vectors: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Indices of each row's k nearest other rows by cosine (rows are unit vectors), blockwise."""
    out = np.empty((len(vectors), k), dtype=np.int64)
    for start in range(0, len(vectors), block):
        sims = vectors[start:start + block] @ vectors.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf  # not itself
        out[start:start + len(sims)] = np.argpartition(-sims, k, axis=1)[:, :k]
    return out


def quality_gate(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> dict[str, Any]:
    """Compare a backend's vectors with the float32 reference vectors of the same texts.

    Returns mean and minimum row cosine, the mean top-``k`` neighbour overlap (the share of each
    item's ``k`` nearest neighbours that both agree on) and ``passed`` (all three thresholds).
    """
    if reference.shape != candidate.shape or len(reference) <= k:
        raise ValueError(f"need two [N, d] arrays of the same shape with N > {k}, got "
                         f"{reference.shape} and {candidate.shape}")
    cosine = (reference.astype(np.float64) * candidate).sum(axis=1)
    ref_nn, cand_nn = _top_k(reference, k), _top_k(candidate, k)
    overlap = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ref_nn, cand_nn)]))
    result = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
              f"top{k}_overlap": overlap}
    result["passed"] = bool(result["cosine_mean"] >= GATE_MEAN_COSINE
                            and result["cosine_min"] >= GATE_MIN_COSINE
                            and overlap >= GATE_TOP10_OVERLAP)
    return result
