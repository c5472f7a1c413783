"""The fusion step's inputs: both steps' outputs, memory-mapped, checked and joined by id.

``txt.npy`` and ``img.npy`` stay memory-mapped: minibatches and the output pass gather their rows
from the maps, so memory does not grow with the catalogue.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..errors import ItemEmbeddingsError
from ..items import id_problems
from ..outputs import (
    FUSION_EXCLUSIONS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from .model import unit_rows, usable_rows

logger = logging.getLogger(__name__)

SCAN_ROWS = 8192        # rows per chunk when checking or fusing a whole memmap
MAX_EXAMPLES = 5


class FusionInputError(ItemEmbeddingsError, ValueError):
    """The text / image step outputs cannot be fused; the message names the file and items."""


@dataclass
class FusionInputs:
    """The two steps' outputs, memory-mapped, joined by id (text order is the output order)."""

    text: np.ndarray                 # [N, text_dim] memmap
    image: np.ndarray                # [M, img_dim] memmap (M may be 0)
    ids: pa.Array                    # [N] text ids, output order
    image_row: np.ndarray            # [N] int64 row in ``image``, -1 = no (usable) image
    text_meta: dict[str, Any]
    image_meta: dict[str, Any]
    excluded_ids: list = field(default_factory=list)     # image excluded (non-finite / zero)
    image_failures: int | None = None                    # rows of img_failures.parquet
    text_keys: pa.Array | None = None    # [N] content keys of the text rows (incremental runs)
    image_keys: pa.Array | None = None   # [N] key of each item's used image, null without one

    @property
    def count(self) -> int:
        return int(self.text.shape[0])

    @property
    def items_with_images(self) -> int:
        return int((self.image_row >= 0).sum())

    def row_keys(self) -> pa.Array | None:
        return fused_row_keys(self.text_keys, self.image_keys)


def fused_row_keys(text_keys: pa.Array | None, image_keys: pa.Array | None) -> pa.Array | None:
    """What decides an item's fused code for given weights: its text key and its image key
    (or none); None when the rows carry no keys (sets made before keys existed)."""
    if text_keys is None or image_keys is None:
        return None
    return pc.binary_join_element_wise(text_keys, pc.fill_null(image_keys, "-"), "|")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FusionInputError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FusionInputError(f"{path} is not valid JSON: {exc}") from None


def _open_array(path: Path, meta: dict[str, Any], meta_name: str) -> np.ndarray:
    if not path.is_file():
        raise FusionInputError(f"missing {path}")
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as exc:  # numpy raises ValueError for a corrupt header
        raise FusionInputError(f"{path} is not a readable .npy file: {exc}") from None
    if array.ndim != 2 or array.dtype != np.float32:
        raise FusionInputError(f"{path} must be a 2-D float32 array, got shape "
                               f"{list(array.shape)} dtype {array.dtype}")
    dim = meta.get("embed_dim")
    if dim is not None and int(dim) != array.shape[1]:
        raise FusionInputError(f"dimension mismatch: {path} has {array.shape[1]} columns but "
                               f"{meta_name} says embed_dim={dim} (outputs of different runs?)")
    return array


def _read_ids(path: Path, columns: list[str]) -> pa.Table:
    if not path.is_file():
        raise FusionInputError(f"missing {path}")
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise FusionInputError(f"{path} has no column(s) {missing}; "
                               f"columns present: {table.column_names}")
    problems = id_problems(table.column("id"))
    if problems:
        raise FusionInputError(f"{path}: {problems[0]}")
    return table


def _scan_usable(array: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """[len(rows)] bool, chunked so that a memmap is read once and never held whole."""
    n = array.shape[0] if rows is None else rows.shape[0]
    ok = np.empty(n, dtype=bool)
    for start in range(0, n, SCAN_ROWS):
        stop = min(start + SCAN_ROWS, n)
        chunk = array[start:stop] if rows is None else array[rows[start:stop]]
        ok[start:stop] = usable_rows(chunk)
    return ok


def _content_keys(txt_items: pa.Table, img_items: pa.Table, image_pos: np.ndarray,
                  image_ok: np.ndarray) -> tuple[pa.Array | None, pa.Array | None]:
    """Per text row its text key and the key of the image fused with it (None without one);
    (None, None) for outputs without keys."""
    if "key" not in txt_items.column_names or "key" not in img_items.column_names:
        return None, None
    keys = np.full(txt_items.num_rows, None, dtype=object)
    used = image_ok.nonzero()[0]
    keys[image_pos[used]] = np.asarray(img_items.column("key").to_pylist(), dtype=object)[used]
    return txt_items.column("key").combine_chunks(), pa.array(keys, pa.string())


def load_fusion_inputs(text_dir: str | os.PathLike, image_dir: str | os.PathLike) -> FusionInputs:
    """Open and check both steps' outputs and join them by id.

    Raises:
        FusionInputError: a missing file, a dimension or count mismatch, null or duplicated ids,
            image ids that the text step does not know, an image row out of range, or a
            non-finite / zero text vector. Non-finite or zero *image* vectors are not an error:
            those items are fused as items without an image and listed in the exclusions.
    """
    text_dir, image_dir = Path(text_dir), Path(image_dir)
    text_meta = _read_json(text_dir / TXT_META)
    image_meta = _read_json(image_dir / IMG_META)
    text = _open_array(text_dir / TXT_ARRAY, text_meta, TXT_META)
    image = _open_array(image_dir / IMG_ARRAY, image_meta, IMG_META)
    txt_items = _read_ids(text_dir / TXT_ITEMS, ["id"])
    img_items = _read_ids(image_dir / IMG_ITEMS, ["id", "row"])
    n, m = text.shape[0], image.shape[0]
    if txt_items.num_rows != n or int(text_meta.get("count", n)) != n:
        raise FusionInputError(f"count mismatch: {text_dir / TXT_ARRAY} has {n} rows, "
                               f"{TXT_ITEMS} {txt_items.num_rows}, {TXT_META} count "
                               f"{text_meta.get('count')}")
    if n < 2:
        raise FusionInputError(f"{text_dir / TXT_ARRAY} has {n} item(s); fusion needs at least 2")
    if img_items.num_rows != m or int(image_meta.get("count", m)) != m:
        raise FusionInputError(f"count mismatch: {image_dir / IMG_ARRAY} has {m} rows, "
                               f"{IMG_ITEMS} {img_items.num_rows}, {IMG_META} count "
                               f"{image_meta.get('count')}")
    img_rows = img_items.column("row").combine_chunks()
    if len(pc.unique(img_rows)) != img_items.num_rows:
        raise FusionInputError(f"{image_dir / IMG_ITEMS} lists the same 'row' for several ids: "
                               "each image vector must belong to one item")

    ids = txt_items.column("id").combine_chunks()
    img_ids = img_items.column("id").combine_chunks()
    if len(img_ids) and not ids.type.equals(img_ids.type):
        raise FusionInputError(f"id types differ: {TXT_ITEMS} has {ids.type}, "
                               f"{IMG_ITEMS} has {img_ids.type}")
    pos = pc.index_in(img_ids, value_set=ids)
    if pos.null_count:
        unknown = img_ids.filter(pc.is_null(pos))
        raise FusionInputError(f"{len(unknown)} image id(s) in {image_dir / IMG_ITEMS} are not in "
                               f"the text step's ids (different items tables?), e.g. "
                               f"{unknown[:MAX_EXAMPLES].to_pylist()}")
    rows_col = img_items.column("row")
    if not pa.types.is_integer(rows_col.type) or rows_col.null_count:
        raise FusionInputError(f"{IMG_ITEMS} column 'row' must be non-null integers, "
                               f"got {rows_col.type} with {rows_col.null_count} null(s)")
    rows = rows_col.to_numpy().astype(np.int64)
    bad = np.flatnonzero((rows < 0) | (rows >= m))
    if bad.size:
        raise FusionInputError(f"{IMG_ITEMS}: {bad.size} row index(es) outside {IMG_ARRAY} "
                               f"[0, {m}), e.g. ids {img_ids.take(bad[:MAX_EXAMPLES]).to_pylist()}")

    text_ok = _scan_usable(text)
    if not text_ok.all():
        bad = np.flatnonzero(~text_ok)
        raise FusionInputError(f"{bad.size} text vector(s) in {text_dir / TXT_ARRAY} are "
                               f"non-finite or zero, e.g. ids "
                               f"{ids.take(bad[:MAX_EXAMPLES]).to_pylist()}")
    image_row = np.full(n, -1, dtype=np.int64)
    image_pos = pos.to_numpy().astype(np.int64)
    image_ok = _scan_usable(image, rows)
    image_row[image_pos[image_ok]] = rows[image_ok]
    excluded = img_ids.filter(pa.array(~image_ok)).to_pylist()
    if excluded:
        logger.warning("%d image vector(s) are non-finite or zero; fused as items without an "
                       "image (listed in %s), e.g. %s", len(excluded), FUSION_EXCLUSIONS,
                       excluded[:MAX_EXAMPLES])
    failures = None
    if (image_dir / IMG_FAILURES).is_file():
        failures = pq.read_metadata(image_dir / IMG_FAILURES).num_rows
    text_keys, image_keys = _content_keys(txt_items, img_items, image_pos, image_ok)
    return FusionInputs(text=text, image=image, ids=ids, image_row=image_row, text_meta=text_meta,
                        image_meta=image_meta, excluded_ids=excluded, image_failures=failures,
                        text_keys=text_keys, image_keys=image_keys)


def gather(inputs: FusionInputs, idx: np.ndarray
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit text rows, unit image rows of the items that have one, and their batch positions."""
    rows = inputs.image_row[idx]
    pos = np.flatnonzero(rows >= 0)
    return unit_rows(inputs.text[idx]), unit_rows(inputs.image[rows[pos]]), torch.from_numpy(pos)
