"""Durable, atomic shards of the image step (the unit of resume after a preemption), and the
assembly of the finished shards into the step's outputs.

The selected items are cut into shards of ``shard_size`` items in input order. A finished shard
is one parquet file (every item of the shard: its embedding or its failure), written atomically to
``<checkpoint root>/<fingerprint>/shard-NNNNN.parquet``:

* local: written beside its name, fsynced, renamed, and the directory fsynced;
* ``gs://``: uploaded as one object (an object appears whole or not at all).

A shard is reused only if its file's metadata carries the same run fingerprint (items URI,
columns, selection cap, shard size, model, weights and every setting that changes an outcome)
and the same content hash (the ids and URLs of the shard's items), so a changed input or
configuration never picks up a stale shard.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..outputs import IMG_ARRAY, IMG_FAILURES, IMG_ITEMS
from ..storage import (
    atomic_npy,
    atomic_path,
    gcs_client,
    gcs_prefix,
    is_gcs_uri,
    write_json_atomic,
    write_parquet_atomic,
)
from .download import HOST_UNAVAILABLE
from .hosts import unavailable_hosts

logger = logging.getLogger(__name__)

SHARD_FORMAT = "item-embeddings/image-shard/2"
SETTINGS_FILE = "settings.json"  # what the shards of a fingerprint are made from, for people
_META_FINGERPRINT = b"fingerprint"
_META_CONTENT = b"content_sha256"
_META_FORMAT = b"format"


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable hash of everything that decides a shard's content."""
    blob = json.dumps({"format": SHARD_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def content_hash(index: int, ids: Sequence[Any], urls: Sequence[str]) -> str:
    """Hash of a shard's position and items (id and URL, in order)."""
    digest = hashlib.sha256(f"shard {index}\n".encode())
    for item_id, url in zip(ids, urls):
        digest.update(f"{item_id}\x1f{url}\x1e".encode())
    return digest.hexdigest()


# Where an item's row came from, recorded per item (the meta file's counts are made from it).
ENCODED = "encoded"              # downloaded and encoded by this run
REUSED = "reused"                # the previous set's vector, no request made
REVALIDATED = "revalidated"      # the previous set's vector, after a 304 from the host
FAILED = "failed"                # failed in this run
FAILURE_REUSED = "failure-reused"  # the previous set's failure, not tried again
SOURCES = (ENCODED, REUSED, REVALIDATED, FAILED, FAILURE_REUSED)

ITEM_COLUMNS = ["id", "url", "key", "etag", "last_modified"]  # img_items.parquet, before "row"
FAILURE_COLUMNS = ["id", "url", "reason", "detail", "http_status", "attempts", "key"]


def shard_schema(id_type: pa.DataType, dim: int) -> pa.Schema:
    """Columns of a shard file; ``embedding`` is null exactly for failed items."""
    return pa.schema([
        ("id", id_type),
        ("url", pa.string()),
        ("key", pa.string()),             # sha256(image encoder fingerprint, url), see incremental
        ("source", pa.string()),          # one of SOURCES
        ("reason", pa.string()),          # null for an embedded item
        ("detail", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("etag", pa.string()),            # the host's validators, for a later revalidation
        ("last_modified", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


def shard_table(columns: Mapping[str, Sequence[Any]], vectors: Sequence[np.ndarray | None],
                id_type: pa.DataType, dim: int) -> pa.Table:
    """One shard's rows: every item with its outcome (``columns``: every column of
    :func:`shard_schema` but ``embedding``), ``embedding`` null for failed items."""
    flat = np.zeros((len(vectors), dim), dtype=np.float32)
    valid = np.array([v is not None for v in vectors], dtype=bool)
    for i, vector in enumerate(vectors):
        if vector is not None:
            flat[i] = vector
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), dim,
                                                  mask=pa.array(~valid))
    schema = shard_schema(id_type, dim)
    arrays = [pa.array(columns[f.name], f.type) for f in schema if f.name != "embedding"]
    return pa.table([*arrays, embedding], schema=schema)


class ShardStore:
    """Finished shards of one run configuration, under ``root/<fingerprint[:16]>/``."""

    def __init__(self, root: str, run_fingerprint: str, settings: Mapping[str, Any]):
        self.fingerprint = run_fingerprint
        sub = run_fingerprint[:16]
        self.gcs = is_gcs_uri(root)
        self.location = f"{root.rstrip('/')}/{sub}" if self.gcs else str(Path(root) / sub)
        self._settings = dict(settings)
        self._bucket = None
        if self.gcs:
            bucket_name, self._prefix = gcs_prefix(self.location)
            self._bucket = gcs_client().bucket(bucket_name)
        else:
            Path(self.location).mkdir(parents=True, exist_ok=True)

    def _name(self, index: int) -> str:
        return f"shard-{index:05d}.parquet"

    def write_settings(self) -> None:
        """Record what the shards are made from (for people; resume reads shard metadata)."""
        payload = {"format": SHARD_FORMAT, "fingerprint": self.fingerprint,
                   "settings": self._settings}
        if self.gcs:
            blob = self._bucket.blob(self._prefix + SETTINGS_FILE)
            blob.upload_from_string(json.dumps(payload, indent=2, sort_keys=True, default=str),
                                    content_type="application/json")
        else:
            write_json_atomic(Path(self.location) / SETTINGS_FILE, payload)

    def save(self, index: int, content_sha256: str, table: pa.Table) -> None:
        table = table.replace_schema_metadata({_META_FINGERPRINT: self.fingerprint.encode(),
                                               _META_CONTENT: content_sha256.encode(),
                                               _META_FORMAT: SHARD_FORMAT.encode()})
        if self.gcs:
            sink = io.BytesIO()
            pq.write_table(table, sink)
            self._bucket.blob(self._prefix + self._name(index)).upload_from_string(
                sink.getvalue(), content_type="application/octet-stream")
            return
        with atomic_path(Path(self.location) / self._name(index)) as tmp:
            pq.write_table(table, tmp)
        _fsync_dir(Path(self.location))  # make the rename itself durable

    def load(self, index: int, content_sha256: str, rows: int) -> pa.Table | None:
        """The finished shard, or None when absent, unreadable or made from something else."""
        try:
            if self.gcs:
                blob = self._bucket.blob(self._prefix + self._name(index))
                if not blob.exists():
                    return None
                table = pq.read_table(io.BytesIO(blob.download_as_bytes()))
            else:
                path = Path(self.location) / self._name(index)
                if not path.is_file():
                    return None
                table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            logger.warning("shard %d at %s is unreadable (%s); recomputing it",
                           index, self.location, exc)
            return None
        meta = table.schema.metadata or {}
        if (meta.get(_META_FINGERPRINT) != self.fingerprint.encode()
                or meta.get(_META_CONTENT) != content_sha256.encode()
                or table.num_rows != rows):
            logger.warning("shard %d at %s was made from other items or settings; recomputing it",
                           index, self.location)
            return None
        return table


def iter_shards(selected: Iterator[tuple[Any, str]], shard_size: int
                ) -> Iterator[tuple[int, list[Any], list[str]]]:
    """Cut the selected (id, url) pairs into shards of ``shard_size``: (index, ids, urls)."""
    ids: list[Any] = []
    urls: list[str] = []
    index = 0
    for item_id, url in selected:
        ids.append(item_id)
        urls.append(url)
        if len(ids) == shard_size:
            yield index, ids, urls
            index, ids, urls = index + 1, [], []
    if ids:
        yield index, ids, urls


def assemble(store: ShardStore | None, shards: Iterator[tuple[int, list[Any], list[str]]],
             embedded_per_shard: dict[int, int], out: Path, dim: int,
             id_type: pa.DataType) -> dict[str, Any]:
    """Stream the finished shards into img.npy, img_items.parquet and img_failures.parquet.

    One shard's embeddings are in memory at a time; ``embedded_per_shard`` (known from the run)
    sizes img.npy up front (no shards, no store: the empty files). Returns the counts for the
    meta file.
    """
    count = sum(embedded_per_shard.values())
    kept, failures = [], []
    retried = 0  # items that needed more than one download attempt
    sources: collections.Counter = collections.Counter()
    with atomic_npy(out / IMG_ARRAY, (count, dim)) as array:
        row = 0
        for index, ids, urls in shards:
            table = store.load(index, content_hash(index, ids, urls), len(ids))
            if table is None:
                raise RuntimeError(f"shard {index} missing at {store.location} after it was made")
            ok = pc.is_null(table.column("reason"))
            embedded = table.filter(ok)
            n = embedded.num_rows
            if n != embedded_per_shard[index]:
                raise RuntimeError(f"shard {index} at {store.location} changed during the run")
            vectors = embedded.column("embedding").combine_chunks().flatten()
            array[row:row + n] = vectors.to_numpy(zero_copy_only=False).reshape(n, dim)
            kept.append(embedded.select(ITEM_COLUMNS).replace_schema_metadata(None))
            failures.append(table.filter(pc.invert(ok)).select(FAILURE_COLUMNS)
                            .replace_schema_metadata(None))
            retried += int(pc.sum(pc.greater(table.column("attempts"), 1)).as_py() or 0)
            sources.update(table.column("source").to_pylist())
            row += n
    schema = shard_schema(id_type, dim)
    items = pa.concat_tables(kept) if kept else schema.empty_table().select(ITEM_COLUMNS)
    failed = (pa.concat_tables(failures) if failures
              else schema.empty_table().select(FAILURE_COLUMNS))
    write_parquet_atomic(out / IMG_ITEMS, items.append_column(
        "row", pa.array(np.arange(count, dtype=np.int64))))
    write_parquet_atomic(out / IMG_FAILURES, failed)
    by_reason = collections.Counter(failed.column("reason").to_pylist())
    return {"count": count, "failed_count": failed.num_rows,
            "attempted_count": count + failed.num_rows,
            "failures_by_reason": dict(sorted(by_reason.items())),
            # hosts whose circuit breaker opened: their items that got no request
            "unavailable_hosts": unavailable_hosts(failed.column("url").to_pylist(),
                                                   failed.column("reason").to_pylist(),
                                                   HOST_UNAVAILABLE),
            "retried_items": retried,
            "encoded_count": sources[ENCODED], "reused_count": sources[REUSED],
            "revalidated_count": sources[REVALIDATED],
            "failures_reused_count": sources[FAILURE_REUSED]}


def _fsync_dir(path: Path) -> None:
    """Best effort: some filesystems (gcsfuse) do not fsync directories; the file itself was."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        logger.debug("cannot fsync directory %s: %s", path, exc)
    finally:
        os.close(fd)
