"""The items table shared by every step: reading, validation and the text of an item.

An items table is a parquet file or a folder of parquet files (local or ``gs://``) with an id,
title, description (string or list of strings) and image URL column. :func:`validate_items` runs
before any model is loaded and raises one :class:`ItemsError` that names the column and a few
offending rows.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .config import PipelineParams
from .errors import UsageError
from .storage import arrow_filesystem

MAX_EXAMPLES = 5
MIN_ROWS = 2         # the fusion step learns from how items compare with each other
SCAN_ROWS = 16384    # rows per batch of the validation scan (bounds its memory)


class ItemsError(UsageError):
    """The items table cannot be used; the message names the column and offending rows."""


_DEFAULTS = PipelineParams()


@dataclass(frozen=True)
class ItemColumns:
    """The names of the items table's columns (pipeline parameters ``*_column``)."""

    id: str = _DEFAULTS.id_column
    title: str = _DEFAULTS.title_column
    description: str = _DEFAULTS.description_column
    image_url: str = _DEFAULTS.image_url_column

    @classmethod
    def from_params(cls, params: PipelineParams) -> ItemColumns:
        return cls(id=params.id_column, title=params.title_column,
                   description=params.description_column, image_url=params.image_url_column)


@dataclass(frozen=True)
class ItemsSummary:
    num_rows: int
    schema: pa.Schema

    def row_range(self, rows: tuple[int, int] | None) -> tuple[int, int]:
        """``rows`` (a shard's ``[start, stop)``; None = every row), checked against the table."""
        start, stop = rows if rows is not None else (0, self.num_rows)
        if not 0 <= start <= stop <= self.num_rows:
            raise ItemsError(f"rows [{start}, {stop}) are not within the table's "
                             f"{self.num_rows} rows")
        return start, stop


def open_items(uri: str) -> pads.Dataset:
    """A pyarrow dataset over the parquet file(s) at ``uri``; files are read in path order."""
    if not uri:
        raise ItemsError("no items table given (items_uri is empty)")
    fs, path = arrow_filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type.name == "NotFound":
            raise ItemsError(f"items table not found: {uri}")
        if info.type.name == "Directory":
            import pyarrow.fs as pafs

            files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                           if f.is_file and f.path.endswith(".parquet"))
            if not files:
                raise ItemsError(f"no .parquet files in {uri}")
            return pads.dataset(files, filesystem=fs, format="parquet")
        return pads.dataset(path, filesystem=fs, format="parquet")
    except ItemsError:
        raise
    except (OSError, pa.ArrowInvalid) as exc:
        raise ItemsError(f"cannot read items table {uri}: {exc}") from None


def items_fingerprint(uri: str) -> str:
    """A hash of the items table's contents, cheap enough to compute on every run.

    Local files are hashed whole (local tables are small); ``gs://`` objects contribute their
    name, size and CRC32C checksum from the object metadata (no download), which changes with
    any change of their bytes. Used as a cache key: a rerun over the same URI whose contents
    changed must not be served yesterday's outputs.
    """
    from .storage import gcs_client, is_gcs_uri, sha256_file, split_gcs_uri

    digest = hashlib.sha256()
    if is_gcs_uri(uri):
        bucket, prefix = split_gcs_uri(uri)
        blobs = sorted((b for b in gcs_client().list_blobs(bucket, prefix=prefix)
                        if b.name == prefix or b.name.endswith(".parquet")), key=lambda b: b.name)
        if not blobs:
            raise ItemsError(f"items table not found: {uri}")
        for blob in blobs:
            digest.update(f"{blob.name}\x1f{blob.size}\x1f{blob.crc32c}\x1e".encode())
        return digest.hexdigest()
    root = Path(arrow_filesystem(uri)[1])
    files = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].is_file():
        raise ItemsError(f"items table not found: {uri}")
    for file in files:
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}\x1f"
                      f"{sha256_file(file)}\x1e".encode())
    return digest.hexdigest()


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_text_or_null(t: pa.DataType) -> bool:
    return _is_string(t) or pa.types.is_null(t)


def _is_text_or_list_of_text(t: pa.DataType) -> bool:
    if _is_text_or_null(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _is_text_or_null(t.value_type)
    return False


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _readable_as(t: pa.DataType, first: pa.DataType) -> bool:
    """True when a column of type ``t`` reads unchanged as ``first``: a folder is read with
    its first file's schema, and other types would be cast silently (integer ids to strings)
    or fail in the middle of a step."""
    if pa.types.is_null(t) or t == first:
        return True
    if _is_string(t) and _is_string(first):
        return True
    return _is_list(t) and _is_list(first) and _readable_as(t.value_type, first.value_type)


def _as_binary(t: pa.DataType) -> pa.DataType:
    """The same nesting with bytes instead of strings (a cast that never decodes)."""
    if _is_list(t):
        return (pa.large_list if pa.types.is_large_list(t) else pa.list_)(_as_binary(t.value_type))
    return {pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}.get(
        t, pa.binary() if pa.types.is_string(t) else t)


def _invalid_utf8_rows(array: pa.Array) -> list[int]:
    """Rows of a string or list-of-strings array whose bytes are not valid UTF-8."""
    def valid(value: bytes | None) -> bool:
        try:
            value is None or value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    return [row for row, value in enumerate(array.cast(_as_binary(array.type)).to_pylist())
            if not all(map(valid, value if isinstance(value, list) else [value]))]


def _rows(mask: pa.ChunkedArray | pa.Array) -> list[int]:
    return pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()


def _file_schemas(dataset: pads.FileSystemDataset, uri: str) -> list[tuple[str, pa.Schema]]:
    """(name relative to ``uri``, schema) of every file, footers read concurrently (gs://)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    files = dataset.files
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])

    def read(path: str) -> tuple[str, pa.Schema]:
        try:
            return path[len(root):].lstrip("/"), pq.read_schema(path, filesystem=dataset.filesystem)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ItemsError(f"cannot read items table {uri}: file {path}: {exc}") from None

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(read, files))


def _check_schema(uri: str, dataset: pads.FileSystemDataset,
                  checks: list[tuple[str, Callable[[pa.DataType], bool], str]]) -> None:
    """Every needed column present in every file, with an allowed type, the same in each file."""
    names = [name for name, _, _ in checks]
    (first_name, first), *others = _file_schemas(dataset, uri)
    missing = [c for c in names if c not in first.names]
    if missing:
        where = f" (file {first_name})" if others else ""
        raise ItemsError(f"items table {uri}{where} has no column(s) "
                         f"{', '.join(map(repr, missing))}; columns present: "
                         f"{', '.join(first.names)}")
    for name, ok, expected in checks:
        dtype = first.field(name).type
        if not ok(dtype):
            raise ItemsError(f"column {name!r} must be {expected}, but its type is {dtype}")
    for file_name, schema in others:
        for name in names:
            if name not in schema.names:
                raise ItemsError(f"items table {uri}: file {file_name} has no column {name!r} "
                                 f"(file {first_name} has it); every file needs the same columns")
            dtype, first_type = schema.field(name).type, first.field(name).type
            if not _readable_as(dtype, first_type):
                raise ItemsError(
                    f"items table {uri}: column {name!r} is {dtype} in file {file_name} but "
                    f"{first_type} in file {first_name}; every file must give a column the same "
                    "type (the folder is read with its first file's types)")


def _read_checked_ids(uri: str, dataset: pads.Dataset, id_column: str,
                      names: list[str]) -> pa.ChunkedArray:
    """The id column, read in one pass that also checks every string column for valid UTF-8
    (an invalid byte would otherwise fail a step half way, naming no column or row)."""
    text = [n for n in names if _is_text_or_list_of_text(dataset.schema.field(n).type)]
    ids: list[pa.Array] = []
    row = 0
    for batch in dataset.scanner(columns=list(dict.fromkeys([id_column, *text])),
                                 batch_size=SCAN_ROWS).to_batches():
        for name in text:
            try:
                batch.column(name).validate(full=True)
            except pa.ArrowInvalid:
                bad = [row + i for i in _invalid_utf8_rows(batch.column(name))]
                raise ItemsError(f"column {name!r} has invalid UTF-8 (not text) at rows "
                                 f"{bad[:MAX_EXAMPLES]} of items table {uri}") from None
        ids.append(batch.column(id_column))
        row += batch.num_rows
    return pa.chunked_array(ids, type=dataset.schema.field(id_column).type)


def validate_items(uri: str, columns: ItemColumns, *, need_text: bool = True,
                   need_image_url: bool = False) -> ItemsSummary:
    """Check the table's schema, text and ids before any model loads.

    The id column is always checked; title/description only with ``need_text`` (the text step),
    the image URL only with ``need_image_url`` (the image step). In a folder, every file's
    schema is checked against the first file's. Every checked string column must be valid UTF-8.

    Raises:
        ItemsError: fewer than :data:`MIN_ROWS` rows, a missing column, a column of the wrong
            type (or of another type in another file), invalid UTF-8, null or duplicate ids.
    """
    dataset = open_items(uri)
    checks = [(columns.id, lambda t: _is_string(t) or pa.types.is_integer(t), "string or integer")]
    if need_text:
        checks += [(columns.title, _is_text_or_null, "string"),
                   (columns.description, _is_text_or_list_of_text, "string or list of strings")]
    if need_image_url:
        checks.append((columns.image_url, _is_text_or_null, "string"))
    _check_schema(uri, dataset, checks)

    ids = _read_checked_ids(uri, dataset, columns.id, [name for name, _, _ in checks])
    if len(ids) == 0:
        raise ItemsError(f"items table {uri} is empty (no rows)")
    if len(ids) < MIN_ROWS:
        raise ItemsError(f"items table {uri} has {len(ids)} row; at least {MIN_ROWS} are needed "
                         "(the fusion step learns from how items compare with each other)")
    problems = id_problems(ids)
    if problems:
        raise ItemsError(f"column {columns.id!r} has {problems[0]}")
    return ItemsSummary(num_rows=len(ids), schema=dataset.schema)


def id_problems(ids: pa.Array | pa.ChunkedArray) -> list[str]:
    """What is wrong with an id column: null ids and duplicated ids, each with example rows.

    Every reader of ids (the items table, the steps' id files, ``verify``) reports with this.
    """
    problems = []
    null_rows = _rows(pc.is_null(ids))
    if null_rows:
        problems.append(f"{len(null_rows)} null id(s), at rows {null_rows[:MAX_EXAMPLES]}")
    counts = pc.value_counts(ids.drop_null())
    dup_values = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dup_values):
        first = dup_values[:MAX_EXAMPLES]
        dup_rows = _rows(pc.is_in(ids, value_set=first))
        problems.append(f"{len(dup_values)} duplicated id(s), e.g. {first.to_pylist()} at rows "
                        f"{dup_rows[:2 * MAX_EXAMPLES]}")
    return problems


def id_type(dtype: pa.DataType) -> pa.DataType:
    """The type ids are stored with in every step's id file: any string kind becomes ``string``
    (so the text and image outputs always join), integers stay as they are."""
    return pa.string() if _is_string(dtype) else dtype


def iter_batches(uri: str, column_names: Sequence[str], batch_size: int = 8192,
                 rows: tuple[int, int] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the named columns in input row order, ``batch_size`` rows at most per batch.

    ``rows`` = (start, stop) streams only those rows (a shard of a fan-out): parquet row groups
    entirely outside the range are skipped without being read.
    """
    dataset = open_items(uri)
    columns = list(column_names)
    if rows is None:
        for batch in dataset.scanner(columns=columns, batch_size=batch_size).to_batches():
            if batch.num_rows:
                yield batch
        return
    start, stop = rows
    offset = 0  # the table row of the next row group's first row
    for file_fragment in dataset.get_fragments():
        for group in file_fragment.split_by_row_group():
            first, offset = offset, offset + group.row_groups[0].num_rows
            if offset <= start:
                continue
            if first >= stop:
                return
            position = first
            for batch in group.to_batches(columns=columns, batch_size=batch_size):
                lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
                position += batch.num_rows
                if hi > lo:
                    yield batch.slice(lo, hi - lo)


_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Remove HTML tags and entities and normalise whitespace."""
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    text = _TAG.sub(" ", text)  # entities may have encoded tags (&lt;br&gt;)
    return _SPACE.sub(" ", text).strip()


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return " ".join(v for v in value if v)  # list of strings (Amazon metadata)


def item_text(title, description) -> str:
    """The text that is embedded for one item: title + " " + description, cleaned.

    >>> item_text("Acme <b>USB-C</b> cable", ["<p>2 m,&nbsp;braided</p>", "laptops &amp; phones"])
    'Acme USB-C cable 2 m, braided laptops & phones'
    >>> item_text(None, "Fast &lt;br&gt;charger")  # entities that encode tags go too
    'Fast charger'
    """
    return clean_text(f"{_as_text(title)} {_as_text(description)}")


def batch_texts(batch: pa.RecordBatch, columns: ItemColumns) -> list[str]:
    titles = batch.column(columns.title).to_pylist()
    descriptions = batch.column(columns.description).to_pylist()
    return [item_text(t, d) for t, d in zip(titles, descriptions)]
