"""What lets a run reuse an earlier output set (``previous_uri``): content keys, the previous set.

Every text row carries a key: a hash of the encoder's fingerprint and the exact text encoded;
every image row a key from the image encoder's fingerprint and the URL. A row of a new run whose
key is in the previous set gets the previous vector, byte for byte; the others are encoded. Keys
carry the model's identity, so vectors of two models are never mixed: a changed fingerprint means
no key matches (and the step says why it recomputes everything).

The previous set is read only after it is verified: every file of the group must be there, with
the size and sha256 its step's meta file records under ``files`` (and, for a published set, its
``manifest.json`` too: a manifest must agree with the meta files, it never stands in for them).
A missing, partial or corrupted set is an error, never a silent reuse. Hashes alone do not prove
that a row belongs to its item (rows swapped and the records rewritten to match pass them), so
the groups are also checked against each other (:mod:`.previous_checks`), and the text step
encodes a sample of the rows it reuses again.

The pipeline's first task verifies the set once for the whole run (:func:`verify_previous_set`:
a publish prefix resolved once to the set its pointer names, every file hashed once) and hands
the result (:class:`VerifiedSet`) to the steps, which then only check that each file is still
that version and read the rows they need: a row range of an ``.npy`` file, a column of a
parquet file (:mod:`.ranged`), never the whole group per shard.

Example::

    with open_previous("gs://bucket/embeddings/", "text", verified=verified) as previous:
        index = KeyIndex(previous.table(TXT_ITEMS, ["key"]).column("key"))
        rows = index.rows(keys)                     # previous row per key, -1 = encode it
        vectors = previous.rows(TXT_ARRAY, rows[rows >= 0])
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import UsageError
from .outputs import (
    GROUPS,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_GROUP,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    MANIFEST,
)
from .published import PublishedSetError, Resolved, resolve
from .ranged import (
    FileVersion,
    file_version,
    npy_layout,
    npy_rows,
    open_pinned,
    parquet_table,
    sha256_pinned,
)
from .storage import (
    is_file_records,
    is_gcs_uri,
    list_files,
    read_bytes,
    record_problems,
    split_gcs_uri,
)

logger = logging.getLogger(__name__)

KEY_BYTES = 16              # 128-bit keys: collisions are out of the question at 10^8 rows
_HASH_HEX = 64              # an inputs fingerprint: sha256 hex, then ':' and the pinned set
HASH_THREADS = 4            # files of the previous set hashed at once (I/O and hashlib overlap)


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


@dataclass(frozen=True)
class VerifiedSet:
    """The previous set as the run's first task verified it (:func:`verify_previous_set`):
    where its files are and each one's size, sha256 and version (a ``gs://`` generation, a
    local mtime). The steps that read the set are handed it and check only that the files are
    still those versions, then read just the rows they need."""

    uri: str                           # previous_uri as given
    root: str                          # the folder of the set's files
    files: dict[str, dict[str, Any]]   # name -> {"size", "sha256", "version"}

    def as_dict(self) -> dict[str, Any]:
        """As a task's output: versions as strings, because KFP carries numbers as floats and
        a generation or an mtime in nanoseconds does not survive a float."""
        return {"uri": self.uri, "root": self.root,
                "files": {name: {**e, "version": str(e["version"])}
                          for name, e in self.files.items()}}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None) -> VerifiedSet | None:
        """Back from :meth:`as_dict` through a task's output or a loop item (None or {} when
        there was no set)."""
        if not value or not value.get("root"):
            return None
        files = {name: {"size": int(e["size"]), "sha256": str(e["sha256"]),
                        "version": int(e["version"])} for name, e in value["files"].items()}
        return cls(str(value["uri"]), str(value["root"]), files)

    def names(self, uri: str) -> bool:
        """Whether ``uri`` is the location this set was verified for (or its folder)."""
        return uri.rstrip("/") in (self.uri.rstrip("/"), self.root)

    def version(self, name: str) -> FileVersion:
        entry = self.files[name]
        return FileVersion(entry["size"], entry["version"])


class PreviousGroup:
    """One step's files of a previous output set, verified: rows and columns read as needed
    (ranged reads on ``gs://``), or the whole files in a local folder (:attr:`dir`)."""

    def __init__(self, verified: VerifiedSet, meta: dict[str, Any], names: Sequence[str],
                 stack: contextlib.ExitStack):
        self.uri = verified.root
        self.meta = meta
        self.verified = verified
        self._names = list(names)
        self._stack = stack
        self._dir: Path | None = None
        self._cache: dict[str, Any] = {}

    def path(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of the array file ``name`` (only those are read)."""
        return npy_rows(self.path(name), rows, self.verified.version(name))

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of the array file ``name`` (its header)."""
        return npy_layout(self.path(name), self.verified.version(name)).shape

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """The parquet file ``name``, or some of its columns (only those are read)."""
        return parquet_table(self.path(name), columns, self.verified.version(name))

    def cached(self, key: str, make):
        """``make()``, computed once per opened group (a worker's shards share it)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def dir(self) -> Path:
        """A local folder holding the group's files whole: the set's own folder, or for a
        ``gs://`` set a temporary copy of the verified versions (made on first use)."""
        if self._dir is None:
            if not is_gcs_uri(self.uri):
                self._dir = Path(self.uri).expanduser()
            else:
                tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="item-embeddings-previous-")))
                for name in self._names:
                    with open_pinned(self.path(name), self.verified.version(name)) as src, \
                            open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 8 << 20)
                self._dir = tmp
        return self._dir

    def array(self, name: str) -> np.ndarray:
        """The whole array file ``name``, memory-mapped from :attr:`dir`."""
        return np.load(self.dir / name, mmap_mode="r")


def group_files(group: str) -> tuple[list[str], str]:
    """(every file of a step's group, its meta file) from :data:`outputs.GROUPS` ('knn': the
    kNN step's graphs and state, :data:`outputs.KNN_GROUP`)."""
    if group == "knn":
        return [*KNN_GROUP, KNN_META], KNN_META
    array, ids, meta, extra = GROUPS[group]
    return [array, ids, *extra, meta], meta


@contextlib.contextmanager
def open_previous(uri: str, group: str, *, verified: VerifiedSet | None = None,
                  optional: bool = False) -> Iterator[PreviousGroup | None]:
    """The ``group`` ('text', 'image', 'fusion', 'knn') of the previous set at ``uri``, verified.

    Yields None when ``uri`` is empty (a full run), and with ``optional`` when the set lacks
    some of the group's files (a set without kNN graphs, or made before they kept a state).
    With ``verified`` (what the run's first task verified, :func:`verify_previous_set`) the
    group's files are only checked to be still those versions; without it every file is hashed
    here. A publish prefix is resolved once to the set its pointer names. Nothing is copied: the
    step reads the rows and columns it needs.

    Raises:
        PreviousSetError: the set or the group is missing, incomplete (unless ``optional``), a
            file's size or sha256 differs from what the set recorded, or a file changed since
            it was verified.
    """
    if not uri:
        yield None
        return
    names, meta_name = group_files(group)
    if verified is None or not verified.names(uri) or not set(names) <= set(verified.files):
        found = _resolve_existing(uri)
        missing = [n for n in names if file_version(f"{found.root}/{n}") is None]
        if missing and optional:
            logger.info("previous output set %s has no complete %s outputs (missing %s)",
                        _where(found), group, ", ".join(missing))
            yield None
            return
        verified = VerifiedSet(uri, found.root,
                               _verified_files(found, {group: (names, meta_name)}))
    else:
        _check_unchanged(verified, names, group)
    meta = json.loads(read_bytes(f"{verified.root}/{meta_name}") or b"{}")
    with contextlib.ExitStack() as stack:
        yield PreviousGroup(verified, meta, names, stack)


def verify_previous_set(uri: str) -> VerifiedSet | None:
    """Verify the previous set at ``uri`` once for a whole run (the first task does it): every
    file of every group it holds is hashed (concurrently) against the size and sha256 its
    step's meta file records, a manifest must agree with those records, and the groups must
    agree with each other (:func:`.previous_checks.check_contents`). None for an empty
    ``uri``.

    Raises:
        PreviousSetError: as :func:`open_previous`, and when the groups contradict each other.
    """
    if not uri:
        return None
    check_previous_set(uri)
    found = _resolve_existing(uri)
    verified = VerifiedSet(uri, found.root,
                           _verified_files(found, _set_groups(set(list_files(found.root)))))
    from .previous_checks import check_contents

    problems = check_contents(verified)
    if problems:
        raise PreviousSetError(f"previous output set {_where(found)}: {'; '.join(problems)}; "
                               "rows were moved or files replaced after they were written "
                               "(with their records rewritten): nothing is reused")
    return verified


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


def _where(found: Resolved) -> str:
    return found.uri if not found.pointed else f"{found.uri} (set {found.root})"


def _set_groups(present: set[str]) -> dict[str, tuple[list[str], str]]:
    """Group -> (its files, its meta file), for every group whose meta file the set holds."""
    groups = {group: group_files(group) for group in GROUPS if group_files(group)[1] in present}
    if KNN_META in present:  # the graphs: checked against the vectors they were built on
        graphs = (KNN_TEXT, KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES)
        # and their state where the set has it (a set made before it was kept has none; its
        # meta file says which files it wrote, and they must all be there)
        groups["knn"] = ([*(n for n in KNN_GROUP if n in graphs or n in present), KNN_META],
                         KNN_META)
    return groups


def _check_unchanged(verified: VerifiedSet, names: Sequence[str], group: str) -> None:
    """Refuse a file that is no longer the version the run's first task verified."""
    changed = [name for name in names
               if file_version(f"{verified.root}/{name}") != verified.version(name)]
    if changed:
        raise PreviousSetError(f"previous output set {verified.root}: {', '.join(changed)} "
                               f"changed since this run verified it (the {group} step's "
                               "files): nothing is reused")


def _verified_files(found: Resolved, groups: Mapping[str, tuple[list[str], str]]
                    ) -> dict[str, dict[str, Any]]:
    """Every file of ``groups`` hashed once against its step's record: name -> size, sha256,
    version. Raises :class:`PreviousSetError` naming every problem."""
    where = _where(found)
    versions = {name: file_version(f"{found.root}/{name}")
                for names, _ in groups.values() for name in names}
    for group, (names, _) in groups.items():
        missing = [n for n in names if versions[n] is None]
        if missing:
            raise PreviousSetError(f"previous output set {where} lacks the {group} step's "
                                   f"{', '.join(missing)}: incomplete (a killed run?); nothing "
                                   "is reused")
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = dict(zip(versions, pool.map(
            lambda name: sha256_pinned(f"{found.root}/{name}", versions[name]), versions)))
    problems = []
    for names, meta_name in groups.values():
        for owner, records in _records(where, found, names, meta_name):
            problems += record_problems(
                {name: name for name in names}, records, owner,
                required=[n for n in names if n != meta_name] if owner == meta_name else (),
                sha256=digests.__getitem__, size=lambda name: versions[name].size)
    if problems:
        raise PreviousSetError(f"previous output set {where}: {'; '.join(problems)}; nothing is "
                               "reused")
    logger.info("previous outputs at %s verified (%s: %d files)", where, ", ".join(groups),
                len(versions))
    return {name: {"size": versions[name].size, "sha256": digests[name],
                   "version": versions[name].version} for name in versions}


def _records(where: str, found: Resolved, names: Sequence[str], meta_name: str
             ) -> list[tuple[str, dict[str, Any]]]:
    """Who recorded the group's sizes and hashes, and what: the step's meta file always (it
    cannot record itself), and a manifest when there is one, for the group's files it lists
    (the meta file included). A manifest never replaces the meta file's record: both must
    hold, so a manifest dropped into a run's folder cannot bless files its meta file does not
    describe."""
    try:
        meta = json.loads(read_bytes(f"{found.root}/{meta_name}") or b"")
    except ValueError as exc:
        raise PreviousSetError(f"previous output set {where}: {meta_name} is not valid JSON: "
                               f"{exc}") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        raise PreviousSetError(f"previous output set {where}: its {meta_name} records no file "
                               "hashes (made by an older version?): it cannot be verified; "
                               "run once without previous_uri")
    records = [(meta_name, files)]
    if found.manifest is not None and is_file_records(found.manifest["files"]):
        records.append((MANIFEST, {name: entry for name, entry in found.manifest["files"].items()
                                   if name in names}))
    return records
