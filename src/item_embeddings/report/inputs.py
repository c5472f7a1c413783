"""Reading a run's outputs for the QA report: the step files, opened and cross-checked, and the
rows of the items table the report shows (docs/outputs.md, docs/report.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import PipelineParams
from ..errors import ItemEmbeddingsError
from ..items import ItemsError, iter_batches, open_items
from ..outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from ..progress import Progress

MISSING_CATEGORY = "(missing)"


class ReportInputError(ItemEmbeddingsError, ValueError):
    """The step outputs cannot be reported on; the message names the file and what is wrong."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReportInputError(f"{path} not found (the step's meta file is written last: did "
                               "the step finish?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path} is not valid JSON: {exc}") from None


def _read_table(path: Path, columns: Sequence[str]) -> pa.Table:
    if not path.is_file():
        raise ReportInputError(f"{path} not found")
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ReportInputError(f"{path} has no column(s) {', '.join(missing)}")
    return pq.read_table(path, columns=list(columns))


def _open_array(path: Path, rows: int, id_file: str) -> np.ndarray:
    if not path.is_file():
        raise ReportInputError(f"{path} not found")
    array = np.load(path, mmap_mode="r")
    if array.ndim != 2 or array.shape[0] != rows:
        raise ReportInputError(f"{path} has shape {array.shape}, but {id_file} lists {rows} "
                               "rows")
    return array


@dataclass
class KnnGraph:
    meta: dict[str, Any]
    neighbours: dict[str, np.ndarray]   # space -> [N, k] int32 rows (memory-mapped)
    scores: dict[str, np.ndarray]       # space -> [N, k] float32 (memory-mapped)

    @property
    def drift(self) -> dict[str, dict[str, Any]]:
        """Per space, the night-over-night drift knn_meta.json records (graphs updated from a
        previous set); empty otherwise."""
        return {space: info["drift"] for space, info in self.meta.get("spaces", {}).items()
                if info.get("drift")}


@dataclass
class RunInputs:
    """The step outputs the report reads, opened (arrays memory-mapped) and cross-checked."""

    ids: pa.ChunkedArray                # text order = items order = fused order = kNN rows
    text_meta: dict[str, Any]
    image_meta: dict[str, Any]
    fusion_meta: dict[str, Any]
    arrays: dict[str, np.ndarray]       # space -> memory-mapped array
    has_image: np.ndarray               # [N] bool, fused_items.parquet
    image_text_rows: np.ndarray         # [M] the text row of each img.npy row
    failures: pa.Table                  # img_failures.parquet (empty when absent)
    knn: KnnGraph | None

    @property
    def count(self) -> int:
        return len(self.ids)


def _image_text_rows(img_items: pa.Table, ids: pa.ChunkedArray, path: Path) -> np.ndarray:
    """For every img.npy row, the row of its id in txt_items.parquet (-1 when no id lists it)."""
    rows = img_items.column("row").to_numpy()
    m = len(rows)
    if m and (rows.min() < 0 or rows.max() >= m):
        raise ReportInputError(f"{path}: 'row' must be an img.npy row in [0, {m})")
    position = pc.index_in(img_items.column("id"), value_set=ids)
    if position.null_count:
        unknown = img_items.column("id").filter(pc.is_null(position))[:5].to_pylist()
        raise ReportInputError(f"{position.null_count} id(s) of {path} are not in {TXT_ITEMS}, "
                               f"e.g. {unknown}")
    out = np.full(m, -1, np.int64)  # -1: a row no id lists
    listed, first = np.unique(rows, return_index=True)
    out[listed] = position.to_numpy(zero_copy_only=False)[first]  # a shared row: its first id
    return out


def _open_knn(knn_dir: str | os.PathLike | None, count: int) -> KnnGraph | None:
    """The kNN graph, or None when ``knn_dir`` is not given or holds no finished graph."""
    if not knn_dir or not (Path(knn_dir) / KNN_META).is_file():
        return None
    root = Path(knn_dir)
    meta = _read_json(root / KNN_META)
    if meta.get("count") != count:
        raise ReportInputError(f"{root / KNN_META} count is {meta.get('count')}, but "
                               f"{TXT_ITEMS} lists {count} items (a graph of another run?)")
    neighbours, scores = {}, {}
    for space, index_file, score_file in (("text", KNN_TEXT, KNN_TEXT_SCORES),
                                          ("fused", KNN_FUSED, KNN_FUSED_SCORES)):
        if space not in meta.get("spaces", {}):
            continue
        neighbours[space] = _open_array(root / index_file, count, TXT_ITEMS)
        scores[space] = _open_array(root / score_file, count, TXT_ITEMS)
        if scores[space].shape != neighbours[space].shape:
            raise ReportInputError(f"{root / score_file} has shape {scores[space].shape}, "
                                   f"{index_file} {neighbours[space].shape}")
    return KnnGraph(meta=meta, neighbours=neighbours, scores=scores)


def load_run_inputs(text_dir: str | os.PathLike, image_dir: str | os.PathLike,
                    fused_dir: str | os.PathLike, knn_dir: str | os.PathLike | None
                    ) -> RunInputs:
    """Open the steps' outputs (docs/outputs.md) and check that they line up.

    Raises:
        ReportInputError: a file is missing, or counts/ids of two files disagree.
    """
    text_dir, image_dir, fused_dir = Path(text_dir), Path(image_dir), Path(fused_dir)
    text_meta = _read_json(text_dir / TXT_META)
    image_meta = _read_json(image_dir / IMG_META)
    fusion_meta = _read_json(fused_dir / FUSION_CONFIG)
    ids = _read_table(text_dir / TXT_ITEMS, ["id"]).column("id")
    n = len(ids)
    fused_items = _read_table(fused_dir / FUSED_ITEMS, ["id", "has_image"])
    if fused_items.num_rows != n or not fused_items.column("id").equals(ids):
        raise ReportInputError(f"{fused_dir / FUSED_ITEMS} does not list the ids of "
                               f"{text_dir / TXT_ITEMS} in the same order")
    img_items = _read_table(image_dir / IMG_ITEMS, ["id", "row"])
    failures_path = image_dir / IMG_FAILURES
    failures = (pq.read_table(failures_path) if failures_path.is_file()
                else pa.table({"id": pa.array([], ids.type), "reason": pa.array([], pa.string())}))
    arrays = {"text": _open_array(text_dir / TXT_ARRAY, n, TXT_ITEMS),
              "image": _open_array(image_dir / IMG_ARRAY, img_items.num_rows, IMG_ITEMS),
              "fused": _open_array(fused_dir / FUSED_ARRAY, n, FUSED_ITEMS)}
    return RunInputs(
        ids=ids, text_meta=text_meta, image_meta=image_meta, fusion_meta=fusion_meta,
        arrays=arrays, has_image=fused_items.column("has_image").to_numpy(zero_copy_only=False),
        image_text_rows=_image_text_rows(img_items, ids, image_dir / IMG_ITEMS),
        failures=failures, knn=_open_knn(knn_dir, n))


@dataclass
class ItemRows:
    """Title and category of the items table rows the report shows."""

    titles: dict[int, str | None]
    categories: dict[int, str] | None   # None when the table has no category column
    category_column: str


def category_label(value: Any) -> str:
    """A category value as one label (a list, e.g. an Amazon category path, joined by ' > ')."""
    if value is None:
        return MISSING_CATEGORY
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value if v is not None]
        return " > ".join(parts) if parts else MISSING_CATEGORY
    text = str(value).strip()
    return text or MISSING_CATEGORY


def read_item_rows(items_uri: str, params: PipelineParams, rows: np.ndarray,
                   ids: pa.ChunkedArray) -> ItemRows:
    """Stream the items table and keep the titles (and categories) of ``rows`` (sorted, unique),
    checking that the table's ids are those of ``txt_items.parquet`` at these rows.

    Raises:
        ItemsError: the table has no id or title column.
        ReportInputError: the table does not have the text step's rows and ids.
    """
    schema = open_items(items_uri).schema
    for column in (params.id_column, params.title_column):
        if column not in schema.names:
            raise ItemsError(f"items table {items_uri} has no column {column!r}; columns "
                             f"present: {', '.join(schema.names)}")
    has_category = params.category_column in schema.names
    columns = [params.id_column, params.title_column]
    if has_category:
        columns.append(params.category_column)
    titles: dict[int, str | None] = {}
    categories: dict[int, str] = {}
    offset = 0
    with Progress(len(ids), "qa report: items table") as progress:
        for batch in iter_batches(items_uri, columns):
            lo, hi = np.searchsorted(rows, (offset, offset + batch.num_rows))
            local = pa.array(rows[lo:hi] - offset)
            picked = batch.take(local)
            expected = ids.take(pa.array(rows[lo:hi])).to_pylist()
            for row, got, want in zip(rows[lo:hi], picked.column(0).to_pylist(), expected):
                if got != want:
                    raise ReportInputError(
                        f"items table {items_uri} row {row} has id {got!r}, but {TXT_ITEMS} "
                        f"row {row} is {want!r}: the report needs the table the run embedded")
            titles.update(zip(rows[lo:hi].tolist(), picked.column(1).to_pylist()))
            if has_category:
                categories.update(zip(rows[lo:hi].tolist(),
                                      map(category_label, picked.column(2).to_pylist())))
            offset += batch.num_rows
            progress.update(batch.num_rows)
    if offset != len(ids):
        raise ReportInputError(f"items table {items_uri} has {offset} rows, {TXT_ITEMS} "
                               f"{len(ids)}: the report needs the table the run embedded")
    return ItemRows(titles=titles, categories=categories if has_category else None,
                    category_column=params.category_column)
