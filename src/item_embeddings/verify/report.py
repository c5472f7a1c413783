"""What ``verify`` found, and the readers that turn any damage into a violation instead of a
traceback: a JSON object, a parquet table with typed columns, a 2-D array, rows finite and of
unit norm, meta fields the data must agree with."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..blocks import row_blocks

NORM_TOLERANCE = 1e-3
CHUNK_ROWS = 65536      # rows per pass over a memory-mapped array (bounded memory on 500k x 512)
EXAMPLES = 5

# Column kinds of the parquet files: a test of the arrow type and how a message names it.
KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "id": (lambda t: pa.types.is_integer(t) or pa.types.is_string(t)
           or pa.types.is_large_string(t), "string or integer ids"),
    "int": (pa.types.is_integer, "an integer type"),
    "str": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "a string type"),
    "bool": (pa.types.is_boolean, "bool"),
}


@dataclass
class Report:
    """What ``verify_outputs`` found: printable facts and violations."""

    source: str
    facts: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def format(self) -> str:
        lines = [f"output set: {self.source}", *(f"  {f}" for f in self.facts)]
        if self.violations:
            lines.append(f"{len(self.violations)} violation(s):")
            lines += [f"  VIOLATION: {v}" for v in self.violations]
        else:
            lines.append("all checks passed")
        return "\n".join(lines)


def load_json(path: Path, report: Report) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        report.fail(f"{path.name}: unreadable JSON: {exc}")
        return None
    if not isinstance(data, dict):
        report.fail(f"{path.name}: expected a JSON object")
        return None
    return data


def load_table(path: Path, columns: dict[str, str], report: Report) -> pa.Table | None:
    """The table with ``columns`` (name -> kind in ``KINDS``), or None after a violation."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # any pyarrow error: the file is unusable
        report.fail(f"{path.name}: unreadable parquet: {exc}")
        return None
    absent = [c for c in columns if c not in table.column_names]
    if absent:
        report.fail(f"{path.name}: missing column(s) {absent} (has {table.column_names})")
        return None
    usable = True
    for column, kind in columns.items():
        accepts, expected = KINDS[kind]
        dtype = table.schema.field(column).type
        if not accepts(dtype):
            report.fail(f"{path.name}: column {column!r} has type {dtype}, expected {expected}")
            usable = False
    return table if usable else None


def load_array(path: Path, report: Report, dtype: type = np.float32) -> np.ndarray | None:
    """The 2-D array at ``path`` (memory-mapped), or None when it cannot be checked further.

    A wrong dtype of the right kind (float64 for float32) is a violation but still checked.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # truncated header, wrong format: say so instead of crashing
        report.fail(f"{path.name}: unreadable .npy: {exc}")
        return None
    report.facts.append(f"{path.name}: shape {list(arr.shape)}, dtype {arr.dtype}")
    if arr.ndim != 2:
        report.fail(f"{path.name}: expected a 2-D array, got shape {list(arr.shape)}")
        return None
    if arr.dtype != dtype:
        report.fail(f"{path.name}: expected {np.dtype(dtype)}, got {arr.dtype}")
        if arr.dtype.kind != np.dtype(dtype).kind:
            return None
    return arr


def rows_text(rows: list[int]) -> str:
    return f"{len(rows)} row(s) (rows {rows[:EXAMPLES]})"


def check_values(name: str, arr: np.ndarray, report: Report) -> None:
    """No NaN/Inf and unit L2 norm on every row, in chunks (the array is memory-mapped)."""
    bad_finite, bad_norm = [], []
    for block in row_blocks(arr, CHUNK_ROWS, dtype=np.float64):
        bad_finite += (np.flatnonzero(~block.finite) + block.start).tolist()
        bad_norm += (np.flatnonzero(block.finite & (np.abs(block.norms - 1.0) > NORM_TOLERANCE))
                     + block.start).tolist()
    if bad_finite:
        report.fail(f"{name}: {len(bad_finite)} row(s) with NaN/Inf (rows {bad_finite[:5]})")
    if bad_norm:
        report.fail(f"{name}: {len(bad_norm)} row(s) not unit-norm (tolerance {NORM_TOLERANCE}; "
                    f"rows {bad_norm[:5]})")


def check_meta(meta_name: str, meta: dict, expected: dict[str, Any], report: Report) -> None:
    for key, value in expected.items():
        if key not in meta:
            report.fail(f"{meta_name}: field {key!r} missing")
        elif meta[key] != value:
            report.fail(f"{meta_name}: {key} = {meta[key]!r} but the data says {value!r}")


def meta_fact(name: str, meta: dict) -> str:
    shown = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
