"""Parts of a file without the rest: rows of a ``.npy`` array, columns of a parquet file, the
whole file streamed through a hash, from a local path or a ``gs://`` object.

A ``gs://`` object is read pinned to one version (its generation, :class:`FileVersion`): every
ranged read asks for that generation only, so the bytes are those that were verified even if the
object is replaced meanwhile (the read then fails instead of mixing two versions). A local file's
version is its modification time; it is checked before a read.

Example::

    version = file_version("gs://b/set/txt.npy")
    rows = npy_rows("gs://b/set/txt.npy", np.array([4, 5, 900]), version)  # 2 ranged reads
    keys = parquet_table("gs://b/set/txt_items.parquet", ["key"], version)  # one column
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import gcs_client, is_gcs_uri, split_gcs_uri

# Rows closer than this many bytes are read in one request (a request costs about as much as
# reading a megabyte more).
COALESCE_BYTES = 1 << 20
READ_BUFFER = 64 << 10  # a gs:// object's read-ahead (larger reads go straight through)
_NPY_HEADER_MAX = 1 << 16  # an .npy header is at most 64 KiB (format 2.0 allows more; unused)


@dataclass(frozen=True)
class FileVersion:
    """A file's size and version: a ``gs://`` object's generation, a local file's mtime (ns)."""

    size: int
    version: int


def file_version(uri: str) -> FileVersion | None:
    """The file's :class:`FileVersion`, None when there is none."""
    if is_gcs_uri(uri):
        blob = _blob(uri)
        if not blob.exists():
            return None
        blob.reload()
        return FileVersion(int(blob.size), int(blob.generation))
    try:
        st = os.stat(Path(uri).expanduser())
    except FileNotFoundError:
        return None
    return FileVersion(st.st_size, st.st_mtime_ns)


def _blob(uri: str, generation: int | None = None):
    bucket, name = split_gcs_uri(uri)
    return gcs_client().bucket(bucket).blob(name, generation=generation)


class _PinnedObject(io.RawIOBase):
    """A seekable, readable ``gs://`` object of one generation, read by byte ranges."""

    def __init__(self, uri: str, version: FileVersion):
        self._blob = _blob(uri, version.version)
        self._size = version.size
        self._generation = version.version
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of this generation."""
        if stop <= start:
            return b""
        return self._blob.download_as_bytes(start=start, end=stop - 1,
                                            if_generation_match=self._generation)

    def readinto(self, buffer) -> int:
        stop = min(self._size, self._pos + len(buffer))
        data = self.read_range(self._pos, stop)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def open_pinned(uri: str, version: FileVersion) -> BinaryIO:
    """The file opened for reading at ``version`` (a ``gs://`` object by ranged reads; a small
    buffer, so that a reader seeking to the parts it wants, parquet's, fetches only those)."""
    if is_gcs_uri(uri):
        return io.BufferedReader(_PinnedObject(uri, version), buffer_size=READ_BUFFER)
    return open(Path(uri).expanduser(), "rb")


def sha256_pinned(uri: str, version: FileVersion, chunk: int = 8 << 20) -> str:
    """The sha256 of the file at ``version``, streamed (memory: one chunk)."""
    digest = hashlib.sha256()
    with open_pinned(uri, version) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class NpyLayout:
    """Where an ``.npy`` file's rows are: shape, dtype and the offset of the first byte."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def npy_layout(uri: str, version: FileVersion) -> NpyLayout:
    """The layout of a C-ordered ``.npy`` file, from its header."""
    if is_gcs_uri(uri):
        head = io.BytesIO(_PinnedObject(uri, version).read_range(
            0, min(version.size, _NPY_HEADER_MAX)))
    else:
        with open(Path(uri).expanduser(), "rb") as fh:
            head = io.BytesIO(fh.read(min(version.size, _NPY_HEADER_MAX)))
    major, _ = np.lib.format.read_magic(head)
    reader = (np.lib.format.read_array_header_1_0 if major == 1
              else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = reader(head)
    if fortran:
        raise ValueError(f"{uri}: a Fortran-ordered array cannot be read by rows")
    return NpyLayout(tuple(shape), np.dtype(dtype), head.tell())


def npy_rows(uri: str, rows: np.ndarray, version: FileVersion) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of the ``.npy`` file at ``version``; a
    ``gs://`` object is read in ranges of nearby rows, never whole."""
    rows = np.asarray(rows, dtype=np.int64)
    if not is_gcs_uri(uri):
        return np.array(np.load(Path(uri).expanduser(), mmap_mode="r")[rows])
    layout = npy_layout(uri, version)
    out = np.empty((len(rows), *layout.shape[1:]), dtype=layout.dtype)
    if not len(rows):
        return out
    if rows.min() < 0 or rows.max() >= layout.shape[0]:
        raise IndexError(f"{uri}: rows outside [0, {layout.shape[0]})")
    wanted = np.unique(rows)
    gap = max(1, COALESCE_BYTES // max(layout.row_bytes, 1))
    breaks = np.flatnonzero(np.diff(wanted) > gap) + 1
    source = _PinnedObject(uri, version)
    for run in np.split(wanted, breaks):
        first, last = int(run[0]), int(run[-1])
        data = source.read_range(layout.offset + first * layout.row_bytes,
                                 layout.offset + (last + 1) * layout.row_bytes)
        block = np.frombuffer(data, dtype=layout.dtype).reshape(-1, *layout.shape[1:])
        where = np.flatnonzero((rows >= first) & (rows <= last))
        out[where] = block[rows[where] - first]
    return out


def parquet_table(uri: str, columns: list[str] | None, version: FileVersion) -> pa.Table:
    """``columns`` (None: all) of the parquet file at ``version``; a ``gs://`` object is read by
    ranges: its footer, then those columns' chunks only."""
    with open_pinned(uri, version) as fh:
        return pq.read_table(fh, columns=columns)
