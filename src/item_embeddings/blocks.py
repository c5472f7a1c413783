"""Reading a large (often memory-mapped) ``[N, d]`` array in blocks of rows, with what every
scan of vectors asks first: which rows are finite and how long they are.

``verify`` checks that rows are finite and of unit norm, the kNN step refuses NaN/Inf and zero
rows and normalises the others: both read their arrays through :func:`row_blocks`, so memory is
bounded by one block whatever N is.

Example::

    for block in row_blocks(np.load("txt.npy", mmap_mode="r"), 65536):
        bad = block.start + np.flatnonzero(~block.finite)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[start, start + len(rows))`` of an array."""

    start: int
    rows: np.ndarray      # the rows, read into memory (in the dtype asked for)
    finite: np.ndarray    # bool per row: every value of the row is finite
    norms: np.ndarray     # L2 norm per row; 0 for a row that is not finite


def row_blocks(array: np.ndarray, block_rows: int, dtype=None) -> Iterator[RowBlock]:
    """The rows of the 2-D ``array`` in blocks of ``block_rows`` (the last one shorter), each
    read into memory as ``dtype`` (default: the array's own)."""
    for start in range(0, array.shape[0], block_rows):
        rows = np.asarray(array[start:start + block_rows], dtype=dtype)
        # One pass for the usual block: a NaN/Inf value makes its row's norm NaN/Inf; only
        # those rows (and finite ones whose squares overflow) are looked at again.
        with np.errstate(over="ignore"):
            norms = np.linalg.norm(rows, axis=1)
        finite = np.isfinite(norms)
        odd = np.flatnonzero(~finite)
        if len(odd):
            finite[odd] = np.isfinite(rows[odd]).all(axis=1)
            with np.errstate(over="ignore"):
                norms[odd] = np.linalg.norm(np.where(finite[odd, None], rows[odd], 0), axis=1)
        yield RowBlock(start, rows, finite, norms)
