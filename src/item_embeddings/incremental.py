"""What lets a run reuse an earlier output set (``previous_uri``): content keys, the previous set.

Every text row carries a key: a hash of the encoder's fingerprint and the exact text encoded;
every image row a key from the image encoder's fingerprint and the URL. A row of a new run whose
key is in the previous set gets the previous vector, byte for byte; the others are encoded. Keys
carry the model's identity, so vectors of two models are never mixed: a changed fingerprint means
no key matches (and the step says why it recomputes everything).

The previous set is read only after it is verified: every file of the group must be there, with
the size and sha256 the set's ``manifest.json`` (a published set) or its meta file's ``files``
(a run's own output) records. A missing, partial or corrupted set is an error, never a silent
reuse. A publish prefix is resolved once to the set its pointer names (:mod:`.published`); the
pipeline's first task does it for the whole run (:func:`inputs_fingerprint`), so every step of
a run reads the same set even when another run publishes meanwhile.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UsageError
from .outputs import GROUPS, KNN_GROUP, KNN_META, MANIFEST
from .published import PublishedSetError, Resolved, resolve
from .storage import (
    is_file_records,
    is_gcs_uri,
    list_files,
    local_folder,
    read_bytes,
    record_problems,
    split_gcs_uri,
)

logger = logging.getLogger(__name__)

KEY_BYTES = 16              # 128-bit keys: collisions are out of the question at 10^8 rows
_HASH_HEX = 64              # an inputs fingerprint: sha256 hex, then ':' and the pinned set


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
    A publish prefix is resolved once to the set its pointer names; a ``gs://`` set is copied
    to a temporary directory first (only the group's files).

    Raises:
        PreviousSetError: the set or the group is missing, incomplete (unless ``optional``), or
            a file's size or sha256 differs from what the set recorded.
    """
    if not uri:
        yield None
        return
    names, meta_name = group_files(group)
    found = _resolve_existing(uri)
    with local_folder(found.root, names) as root:
        yield _verified(found, root, group, names, meta_name, optional)


def _resolve_existing(uri: str) -> Resolved:
    """:func:`published.resolve`, or a one-line :class:`PreviousSetError` when ``uri`` is not
    a folder or prefix holding something."""
    if not is_gcs_uri(uri):
        path = Path(uri).expanduser()
        if path.is_file():
            raise PreviousSetError(f"previous output set {uri} is a file (previous_uri must be "
                                   "an earlier run's output folder or publish prefix; empty = "
                                   "full run)")
        if not path.is_dir():
            raise PreviousSetError(f"previous output set not found: {uri} (previous_uri must "
                                   "be an earlier run's output folder or publish prefix; empty "
                                   "= full run)")
    try:
        return resolve(uri)
    except PublishedSetError as exc:
        raise PreviousSetError(f"previous_uri: {exc}") from None


def check_previous_set(uri: str, groups: Sequence[str] = ("text", "image")) -> None:
    """Refuse, before anything runs, a ``previous_uri`` that cannot be an output set: not found,
    a file, empty, or without the files of ``groups`` (names only; the steps verify the hashes
    when they read them). Empty ``uri``: a full run, nothing to check."""
    if not uri:
        return
    if is_gcs_uri(uri):
        if split_gcs_uri(uri)[1].strip("/") and read_bytes(uri.rstrip("/")) is not None:
            raise PreviousSetError(f"previous output set {uri} is an object, a file "
                                   "(previous_uri must be an earlier run's output folder or "
                                   "publish prefix)")
    found = _resolve_existing(uri)
    present = set(list_files(found.root))
    if not present:
        raise PreviousSetError(f"previous output set {uri} is empty or not found (previous_uri "
                               "must be an earlier run's output folder or publish prefix)")
    missing = [name for group in groups for name in group_files(group)[0] if name not in present]
    if missing:
        where = f" (the set {found.root} its pointer names)" if found.pointed else ""
        raise PreviousSetError(f"previous output set {uri}{where} lacks {', '.join(missing)}: "
                               "not a complete output set (previous_uri)")


def inputs_fingerprint(items_fingerprint: str, previous_uri: str) -> str:
    """What the pipeline's first task hands the steps: a hash of the items' contents and of the
    previous set's records (the cache key of every step reading them), followed by
    ``:<the set's folder>`` when ``previous_uri`` is a publish prefix, so that every step of the
    run reads the set this task resolved (:func:`pinned_previous`)."""
    found = None
    if previous_uri:
        check_previous_set(previous_uri)
        found = _resolve_existing(previous_uri)
    digest = hashlib.sha256(f"{items_fingerprint}\x1f{_records_hash(found)}".encode())
    pin = found.root if found is not None and found.pointed else ""
    return digest.hexdigest() + (f":{pin}" if pin else "")


def pinned_previous(fingerprint: str) -> str:
    """The set folder an :func:`inputs_fingerprint` pinned ('' when none)."""
    return fingerprint[_HASH_HEX + 1:] if fingerprint[_HASH_HEX:_HASH_HEX + 1] == ":" else ""


def previous_fingerprint(uri: str) -> str:
    """A hash of what the previous set recorded about its files ('' without one), cheap: the
    manifest of a published set, else the meta files."""
    return _records_hash(_resolve_existing(uri)) if uri else ""


def _records_hash(found: Resolved | None) -> str:
    if found is None:
        return ""
    metas = [meta for _, (_, _, meta, _) in sorted(GROUPS.items())] + [KNN_META]
    digest = hashlib.sha256()
    digest.update(MANIFEST.encode() + (json.dumps(found.manifest, sort_keys=True).encode()
                                       if found.manifest is not None else b""))
    for name in metas:
        digest.update(name.encode() + (read_bytes(f"{found.root}/{name}") or b""))
    return digest.hexdigest()


def _verified(found: Resolved, root: Path, group: str, names: list[str], meta_name: str,
              optional: bool = False) -> PreviousGroup | None:
    uri = found.uri if not found.pointed else f"{found.uri} (set {found.root})"
    missing = [n for n in names if not (root / n).is_file()]
    if missing and optional:
        logger.info("previous output set %s has no complete %s outputs (missing %s)", uri, group,
                    ", ".join(missing))
        return None
    if missing:
        raise PreviousSetError(f"previous output set {uri} lacks the {group} step's "
                               f"{', '.join(missing)}: incomplete (a killed run?); nothing is "
                               "reused")
    try:
        meta = json.loads((root / meta_name).read_text())
    except ValueError as exc:
        raise PreviousSetError(f"previous output set {uri}: {meta_name} is not valid JSON: "
                               f"{exc}") from None
    owner, recorded = _recorded_files(uri, found, meta, meta_name)
    if is_file_records(recorded):  # a manifest records the other groups' files too
        recorded = {name: entry for name, entry in recorded.items() if name in names}
    # the meta file itself: checked when a manifest records it (a meta file cannot)
    problems = record_problems({name: root / name for name in names}, recorded, owner,
                               required=[name for name in names if name != meta_name])
    if problems:
        raise PreviousSetError(f"previous output set {uri}: {'; '.join(problems)}; nothing is "
                               "reused")
    logger.info("previous %s outputs at %s verified (%d files)", group, uri, len(names))
    return PreviousGroup(uri=found.root, dir=root, meta=meta)


def _recorded_files(uri: str, found: Resolved, meta: dict[str, Any], meta_name: str
                    ) -> tuple[str, Any]:
    """Who recorded the sizes and hashes, and the record: the publish manifest, else the meta
    file's ``files``."""
    if found.manifest is not None:
        return MANIFEST, found.manifest["files"]
    files = meta.get("files")
    if not isinstance(files, dict):
        raise PreviousSetError(f"previous output set {uri} has no {MANIFEST} and its "
                               f"{meta_name} records no file hashes (made by an older "
                               "version?): it cannot be verified; run once without "
                               "previous_uri")
    return meta_name, files
