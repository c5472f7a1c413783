"""The quality gate a fast text backend must pass against the float32 reference (docs/text.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ItemEmbeddingsError

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
    return _gate(reference, candidate, k)


GATE_SAMPLE = 512      # texts of the catalogue an approximate backend is checked on
GATE_MIN_SAMPLE = 16   # below this the neighbour overlap says too little: cosines only


class QualityGateError(ItemEmbeddingsError, RuntimeError):
    """An approximate text backend drifted too far from the exact model on this catalogue."""


def check_backend_on_sample(texts: list[str], candidate, reference) -> dict[str, Any]:
    """Run the gate for ``candidate`` (an approximate encoder) against ``reference`` (exact) on
    the first :data:`GATE_SAMPLE` distinct ``texts``; raise :class:`QualityGateError` if it fails.

    Returns the gate's numbers and the sample size (recorded in ``txt_meta.json``).
    """
    sample = list(dict.fromkeys(t for t in texts if t))[:GATE_SAMPLE]
    if not sample:
        return {"passed": True, "sample": 0}
    result = _gate(reference.encode(sample), candidate.encode(sample),
                   10 if len(sample) >= GATE_MIN_SAMPLE else None)
    result["sample"] = len(sample)
    if not result["passed"]:
        raise QualityGateError(
            f"text_backend {candidate.backend!r} fails the quality gate on {len(sample)} texts "
            f"of this catalogue: {result} (needs cosine mean >= {GATE_MEAN_COSINE}, min >= "
            f"{GATE_MIN_COSINE}, top-10 overlap >= {GATE_TOP10_OVERLAP}); use the exact default "
            "text_backend=auto")
    return result


def _gate(reference: np.ndarray, candidate: np.ndarray, k: int | None) -> dict[str, Any]:
    """The gate's numbers; ``k`` None skips the neighbour overlap (too few rows for it)."""
    cosine = (reference.astype(np.float64) * candidate).sum(axis=1)
    result: dict[str, Any] = {"cosine_mean": float(cosine.mean()),
                              "cosine_min": float(cosine.min())}
    passed = result["cosine_mean"] >= GATE_MEAN_COSINE and result["cosine_min"] >= GATE_MIN_COSINE
    if k:
        ref_nn, cand_nn = _top_k(reference, k), _top_k(candidate, k)
        overlap = float(np.mean([len(np.intersect1d(a, b)) / k
                                 for a, b in zip(ref_nn, cand_nn)]))
        result[f"top{k}_overlap"] = overlap
        passed = passed and overlap >= GATE_TOP10_OVERLAP
    result["passed"] = bool(passed)
    return result
