"""The vectors a kNN graph is built from: checked and L2-normalised in one pass.

A graph needs a 2-D float32 ``[N, d]`` array, ``1 <= k < N`` (self is never a neighbour) and
rows that have a direction: a NaN/Inf or all-zero row is refused, the first few named by item id
(:class:`KnnInputError`). The rows are read in blocks, so a memory-mapped array of 10M rows is
checked, and normalised (:func:`unit_rows`), without being read into memory whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks import row_blocks
from ..errors import ItemEmbeddingsError

CHECK_ROWS = 65536          # rows validated and normalised at a time
EXAMPLE_ROWS = 5            # bad rows named in an error message


class KnnInputError(ItemEmbeddingsError, ValueError):
    """Vectors or ``k`` that no kNN graph can be built from; the message names the rows."""


def _name_rows(rows: np.ndarray, labels: Sequence[Any] | None) -> str:
    shown = [f"{labels[r]!r} (row {r})" if labels is not None else f"row {r}"
             for r in rows[:EXAMPLE_ROWS].tolist()]
    more = f" and {len(rows) - EXAMPLE_ROWS} more" if len(rows) > EXAMPLE_ROWS else ""
    return ", ".join(shown) + more


def _scan(vectors: np.ndarray, k: int, what: str, labels: Sequence[Any] | None,
          normalise: bool, scratch: Path | None = None) -> np.ndarray | None:
    """Check ``vectors`` and ``k`` (see :func:`check_vectors`); with ``normalise``, also return
    the L2-normalised rows, made in the same pass over the (possibly memory-mapped) rows, in
    memory or (``scratch``) in a memory-mapped file there."""
    if getattr(vectors, "ndim", None) != 2:
        raise KnnInputError(f"{what}: expected a 2-D [N, d] array, got shape "
                            f"{getattr(vectors, 'shape', type(vectors).__name__)}")
    if vectors.dtype != np.float32:
        raise KnnInputError(f"{what}: expected float32 rows, got {vectors.dtype}")
    n, dim = vectors.shape
    if n == 0 or dim == 0:
        raise KnnInputError(f"{what}: the set is empty (shape {vectors.shape})")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise KnnInputError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise KnnInputError(f"{what}: k={k} needs at least {k + 1} items (self is excluded), "
                            f"got {n}")
    out = None
    if normalise and scratch is not None:
        handle, name = tempfile.mkstemp(prefix="unit-rows-", suffix=".npy", dir=scratch)
        os.close(handle)
        out = np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=(n, dim))
    elif normalise:
        out = np.empty((n, dim), dtype=np.float32)
    bad_finite: list[np.ndarray] = []
    bad_zero: list[np.ndarray] = []
    for block in row_blocks(vectors, CHECK_ROWS):
        bad_finite.append(np.flatnonzero(~block.finite) + block.start)
        bad_zero.append(np.flatnonzero(block.finite & (block.norms == 0)) + block.start)
        if out is not None:
            out[block.start:block.start + len(block.rows)] = (
                block.rows / np.where(block.norms > 0, block.norms, 1)[:, None])
    problems = []
    for rows, kind in ((np.concatenate(bad_finite), "NaN or Inf values"),
                       (np.concatenate(bad_zero), "all zeros (no direction)")):
        if len(rows):
            problems.append(f"{len(rows)} rows with {kind}: {_name_rows(rows, labels)}")
    if problems:
        raise KnnInputError(f"{what}: " + "; ".join(problems))
    return out


def check_vectors(vectors: np.ndarray, k: int, *, what: str = "vectors",
                  labels: Sequence[Any] | None = None) -> None:
    """Check that a kNN graph with ``k`` neighbours can be built from ``vectors``.

    Args:
        vectors: ``[N, d]`` float32 (a memory map is read in chunks).
        k: Neighbours wanted per row (self excluded), so ``1 <= k < N``.
        what: How error messages name the vectors ("text vectors").
        labels: Item ids of the rows, used in error messages only.

    Raises:
        KnnInputError: not 2-D, not float32, empty, ``k`` out of range, or rows that are
            NaN/Inf or zero (examples named, by id when ``labels`` are given).
    """
    _scan(vectors, k, what, labels, normalise=False)


def unit_rows(vectors: np.ndarray, k: int, *, what: str = "vectors",
              labels: Sequence[Any] | None = None, scratch: Path | None = None) -> np.ndarray:
    """The rows of ``vectors`` L2-normalised into a new float32 array, checked as
    :func:`check_vectors` does. With a ``scratch`` directory the array is a memory-mapped file
    there: its pages are the kernel's cache, which it can drop and read again, so the copy
    does not add to the memory a large catalogue needs (docs/knn.md, *Memory*)."""
    return _scan(vectors, k, what, labels, normalise=True, scratch=scratch)
