"""What lets a run reuse an earlier output set (``previous_uri``): content keys and the previous set.

Every text row carries a key: a hash of the encoder's fingerprint and the exact text encoded;
every image row a key from the image encoder's fingerprint and the URL. A row of a new run whose
key is in the previous set gets the previous vector, byte for byte; the others are encoded. Keys
carry the model's identity, so vectors of two models are never mixed: a changed fingerprint means
no key matches (and the step says why it recomputes everything).

The previous set is read only after it is verified: every file of the group must be there, with
the size and sha256 the set's ``manifest.json`` (a published set) or its meta file's ``files``
(a run's own output) records. A missing, partial or corrupted set is an error, never a silent
reuse.

Example::

    with open_previous("gs://bucket/embeddings/", "text") as previous:
        index = KeyIndex(previous.table(TXT_ITEMS).column("key"))
        rows = index.rows(keys)        # previous row per key, -1 = encode it
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .outputs import GROUPS, KNN_GROUP, KNN_META
from .storage import gcs_client, is_gcs_uri, sha256_file, split_gcs_uri

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # the publish manifest (publish.MANIFEST; publish imports storage only)
KEY_BYTES = 16              # 128-bit keys: collisions are out of the question at 10^8 rows


class PreviousSetError(ValueError):
    """The previous output set is missing, incomplete or damaged: nothing is reused from it."""


def fingerprint(identity: Mapping[str, Any]) -> str:
    """A stable hash of what makes an encoder's vectors what they are (weights, backend, ...)."""
    blob = json.dumps(dict(identity), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def content_keys(encoder_fingerprint: str, contents: Sequence[str]) -> pa.Array:
    """One key per content (a text, a URL): hex of the first 128 bits of
    sha256(fingerprint, content)."""
    prefix = encoder_fingerprint.encode() + b"\x1f"
    return pa.array([hashlib.sha256(prefix + c.encode()).hexdigest()[:2 * KEY_BYTES]
                     for c in contents], pa.string())


class KeyIndex:
    """Looks keys up in a previous set's key column (vectorised; no per-key Python dict)."""

    def __init__(self, keys: pa.Array | pa.ChunkedArray):
        self._keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys

    def rows(self, keys: pa.Array) -> np.ndarray:
        """[len(keys)] int64: the previous row holding each key (the first one), -1 if none."""
        pos = pc.index_in(keys, value_set=self._keys)
        return pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class PreviousGroup:
    """One step's files of a previous output set, verified, in a local directory."""

    uri: str
    dir: Path
    meta: dict[str, Any]

    def array(self, name: str) -> np.ndarray:
        return np.load(self.dir / name, mmap_mode="r")

    def table(self, name: str) -> pa.Table:
        return pq.read_table(self.dir / name)


def group_files(group: str) -> tuple[list[str], str]:
    """(every file of a step's group, its meta file) from :data:`outputs.GROUPS` ('knn': the
    kNN step's graphs and state, :data:`outputs.KNN_GROUP`)."""
    if group == "knn":
        return [*KNN_GROUP, KNN_META], KNN_META
    array, ids, meta, extra = GROUPS[group]
    return [array, ids, *extra, meta], meta


@contextlib.contextmanager
def open_previous(uri: str, group: str, *, optional: bool = False
                  ) -> Iterator[PreviousGroup | None]:
    """The ``group`` ('text', 'image', 'fusion', 'knn') of the previous set at ``uri``, verified.

    Yields None when ``uri`` is empty (a full run), and with ``optional`` when the set lacks
    some of the group's files (a set without kNN graphs, or made before they kept a state).
    A ``gs://`` set is copied to a temporary directory first (only the group's files).

    Raises:
        PreviousSetError: the set or the group is missing, incomplete (unless ``optional``), or
            a file's size or sha256 differs from what the set recorded.
    """
    if not uri:
        yield None
        return
    names, meta_name = group_files(group)
    if is_gcs_uri(uri):
        with tempfile.TemporaryDirectory(prefix="item-embeddings-previous-") as tmp:
            _download(uri, names, Path(tmp))
            yield _verified(uri, Path(tmp), group, names, meta_name, optional)
        return
    root = Path(uri).expanduser()
    if not root.is_dir():
        raise PreviousSetError(f"previous output set not found: {uri} (previous_uri must be an "
                               "earlier run's output folder or publish prefix; empty = full run)")
    yield _verified(uri, root, group, names, meta_name, optional)


def previous_fingerprint(uri: str) -> str:
    """A hash of what the previous set recorded about its files ('' without one), cheap: the
    manifest of a published set, else the meta files. Part of the cache key of the steps that
    reuse from it."""
    if not uri:
        return ""
    metas = [meta for _, (_, _, meta, _) in sorted(GROUPS.items())] + [KNN_META]
    digest = hashlib.sha256()
    if is_gcs_uri(uri):
        bucket_name, prefix = split_gcs_uri(uri)
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        bucket = gcs_client().bucket(bucket_name)
        for name in [MANIFEST, *metas]:
            blob = bucket.blob(prefix + name)
            digest.update(name.encode() + (blob.download_as_bytes() if blob.exists() else b""))
    else:
        root = Path(uri).expanduser()
        for name in [MANIFEST, *metas]:
            path = root / name
            digest.update(name.encode() + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()


def _download(uri: str, names: list[str], dest: Path) -> None:
    bucket_name, prefix = split_gcs_uri(uri)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    bucket = gcs_client().bucket(bucket_name)
    for name in [MANIFEST, *names]:
        blob = bucket.blob(prefix + name)
        if blob.exists():
            blob.download_to_filename(str(dest / name))


def _verified(uri: str, root: Path, group: str, names: list[str], meta_name: str,
              optional: bool = False) -> PreviousGroup | None:
    missing = [n for n in names if not (root / n).is_file()]
    if missing and optional:
        logger.info("previous output set %s has no complete %s outputs (missing %s)", uri, group,
                    ", ".join(missing))
        return None
    if missing:
        raise PreviousSetError(f"previous output set {uri} lacks the {group} step's "
                               f"{', '.join(missing)}: incomplete (a killed run, a publish in "
                               "progress?); nothing is reused")
    try:
        meta = json.loads((root / meta_name).read_text())
    except ValueError as exc:
        raise PreviousSetError(f"previous output set {uri}: {meta_name} is not valid JSON: "
                               f"{exc}") from None
    recorded = _recorded_files(uri, root, meta, meta_name)
    for name in names:
        if name == meta_name and name not in recorded:
            continue  # a meta file cannot record its own hash
        entry = recorded.get(name)
        if entry is None:
            raise PreviousSetError(f"previous output set {uri}: no recorded size and sha256 for "
                                   f"{name}, so it cannot be verified")
        size = (root / name).stat().st_size
        if size != entry.get("size") or sha256_file(root / name) != entry.get("sha256"):
            raise PreviousSetError(f"previous output set {uri}: {name} does not match its "
                                   f"recorded size/sha256 (damaged or replaced)")
    logger.info("previous %s outputs at %s verified (%d files)", group, uri, len(names))
    return PreviousGroup(uri=uri, dir=root, meta=meta)


def _recorded_files(uri: str, root: Path, meta: dict[str, Any],
                    meta_name: str) -> dict[str, dict[str, Any]]:
    """Sizes and hashes the set recorded: the publish manifest, else the meta file's ``files``."""
    if (root / MANIFEST).is_file():
        try:
            return json.loads((root / MANIFEST).read_text())["files"]
        except (ValueError, KeyError) as exc:
            raise PreviousSetError(f"previous output set {uri}: unreadable {MANIFEST}: "
                                   f"{exc}") from None
    files = meta.get("files")
    if not isinstance(files, dict):
        raise PreviousSetError(f"previous output set {uri} has no {MANIFEST} and its "
                               f"{meta_name} records no file hashes (made by an older "
                               "version?): it cannot be verified; run once without "
                               "previous_uri")
    return files
