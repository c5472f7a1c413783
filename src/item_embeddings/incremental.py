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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UsageError
from .outputs import GROUPS, MANIFEST
from .storage import is_file_records, is_gcs_uri, local_folder, read_bytes, record_problems

logger = logging.getLogger(__name__)

KEY_BYTES = 16              # 128-bit keys: collisions are out of the question at 10^8 rows


class PreviousSetError(UsageError):
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
    """(every file of a step's group, its meta file) from :data:`outputs.GROUPS`."""
    array, ids, meta, extra = GROUPS[group]
    return [array, ids, *extra, meta], meta


@contextlib.contextmanager
def open_previous(uri: str, group: str) -> Iterator[PreviousGroup | None]:
    """The ``group`` ('text', 'image', 'fusion') of the previous set at ``uri``, verified.

    Yields None when ``uri`` is empty (a full run). A ``gs://`` set is copied to a temporary
    directory first (only the group's files).

    Raises:
        PreviousSetError: the set or the group is missing, incomplete, or a file's size or
            sha256 differs from what the set recorded.
    """
    if not uri:
        yield None
        return
    names, meta_name = group_files(group)
    if not is_gcs_uri(uri) and not Path(uri).expanduser().is_dir():
        raise PreviousSetError(f"previous output set not found: {uri} (previous_uri must be an "
                               "earlier run's output folder or publish prefix; empty = full run)")
    with local_folder(uri, [MANIFEST, *names]) as root:
        yield _verified(uri, root, group, names, meta_name)


def previous_fingerprint(uri: str) -> str:
    """A hash of what the previous set recorded about its files ('' without one), cheap: the
    manifest of a published set, else the meta files. Part of the cache key of the steps that
    reuse from it."""
    if not uri:
        return ""
    metas = [meta for _, (_, _, meta, _) in sorted(GROUPS.items())]
    digest = hashlib.sha256()
    for name in [MANIFEST, *metas]:
        digest.update(name.encode() + (read_bytes(f"{uri.rstrip('/')}/{name}") or b""))
    return digest.hexdigest()


def _verified(uri: str, root: Path, group: str, names: list[str],
              meta_name: str) -> PreviousGroup:
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise PreviousSetError(f"previous output set {uri} lacks the {group} step's "
                               f"{', '.join(missing)}: incomplete (a killed run, a publish in "
                               "progress?); nothing is reused")
    try:
        meta = json.loads((root / meta_name).read_text())
    except ValueError as exc:
        raise PreviousSetError(f"previous output set {uri}: {meta_name} is not valid JSON: "
                               f"{exc}") from None
    owner, recorded = _recorded_files(uri, root, meta, meta_name)
    if is_file_records(recorded):  # a manifest records the other groups' files too
        recorded = {name: entry for name, entry in recorded.items() if name in names}
    # the meta file itself: checked when a manifest records it (a meta file cannot)
    problems = record_problems({name: root / name for name in names}, recorded, owner,
                               required=[name for name in names if name != meta_name])
    if problems:
        raise PreviousSetError(f"previous output set {uri}: {'; '.join(problems)}; nothing is "
                               "reused")
    logger.info("previous %s outputs at %s verified (%d files)", group, uri, len(names))
    return PreviousGroup(uri=uri, dir=root, meta=meta)


def _recorded_files(uri: str, root: Path, meta: dict[str, Any], meta_name: str
                    ) -> tuple[str, Any]:
    """Who recorded the sizes and hashes, and the record: the publish manifest, else the meta
    file's ``files``."""
    if (root / MANIFEST).is_file():
        try:
            return MANIFEST, json.loads((root / MANIFEST).read_text())["files"]
        except (ValueError, KeyError) as exc:
            raise PreviousSetError(f"previous output set {uri}: unreadable {MANIFEST}: "
                                   f"{exc}") from None
    files = meta.get("files")
    if not isinstance(files, dict):
        raise PreviousSetError(f"previous output set {uri} has no {MANIFEST} and its "
                               f"{meta_name} records no file hashes (made by an older "
                               "version?): it cannot be verified; run once without "
                               "previous_uri")
    return meta_name, files
