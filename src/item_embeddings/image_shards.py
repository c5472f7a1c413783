"""Durable, atomic shards of the image step: the unit of resume after a preemption.

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

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import atomic_path, gcs_client, is_gcs_uri, split_gcs_uri, write_json_atomic

logger = logging.getLogger(__name__)

SHARD_FORMAT = "item-embeddings/image-shard/1"
MANIFEST = "manifest.json"
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


def shard_schema(id_type: pa.DataType, dim: int) -> pa.Schema:
    """Columns of a shard file; ``embedding`` is null exactly for failed items."""
    return pa.schema([
        ("id", id_type),
        ("url", pa.string()),
        ("reason", pa.string()),          # null for an embedded item
        ("detail", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


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
            bucket_name, self._prefix = split_gcs_uri(self.location)
            self._bucket = gcs_client().bucket(bucket_name)
        else:
            Path(self.location).mkdir(parents=True, exist_ok=True)

    def _name(self, index: int) -> str:
        return f"shard-{index:05d}.parquet"

    def write_manifest(self) -> None:
        """Record what the shards are made from (for people; resume reads shard metadata)."""
        payload = {"format": SHARD_FORMAT, "fingerprint": self.fingerprint,
                   "settings": self._settings}
        if self.gcs:
            blob = self._bucket.blob(f"{self._prefix}/{MANIFEST}")
            blob.upload_from_string(json.dumps(payload, indent=2, sort_keys=True, default=str),
                                    content_type="application/json")
        else:
            write_json_atomic(Path(self.location) / MANIFEST, payload)

    def save(self, index: int, content_sha256: str, table: pa.Table) -> None:
        table = table.replace_schema_metadata({_META_FINGERPRINT: self.fingerprint.encode(),
                                               _META_CONTENT: content_sha256.encode(),
                                               _META_FORMAT: SHARD_FORMAT.encode()})
        if self.gcs:
            sink = io.BytesIO()
            pq.write_table(table, sink)
            self._bucket.blob(f"{self._prefix}/{self._name(index)}").upload_from_string(
                sink.getvalue(), content_type="application/octet-stream")
            return
        with atomic_path(Path(self.location) / self._name(index)) as tmp:
            pq.write_table(table, tmp)
        _fsync_dir(Path(self.location))  # make the rename itself durable

    def load(self, index: int, content_sha256: str, rows: int) -> pa.Table | None:
        """The finished shard, or None when absent, unreadable or made from something else."""
        try:
            if self.gcs:
                blob = self._bucket.blob(f"{self._prefix}/{self._name(index)}")
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
