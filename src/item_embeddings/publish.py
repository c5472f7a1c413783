"""Publish a run's output files to a stable prefix (local folder or ``gs://``) for the next stage.

Layout (:mod:`.published`): every publish writes a new, immutable set and then swaps one pointer::

    PREFIX/sets/<UTC time>-<run id>-<random>/   txt.npy, txt_items.parquet, ..., manifest.json
    PREFIX/manifest.json                        the pointer: that set's manifest plus "set"

Write protocol (what this module does):

1. read the pointer (its ``gs://`` generation; locally its set); a run that read its previous
   set from this prefix and finds the pointer moved on since refuses to publish: it would
   replace a newer set with one made from an older one;
2. upload every file into a new set folder (``if_generation_match=0``: nothing is overwritten),
   the set's own ``manifest.json`` last; nothing a reader looks at has changed yet;
3. write the pointer, on ``gs://`` with ``if_generation_match`` = the generation read in 1 (a
   compare-and-swap in one request); locally under an exclusive lock, re-reading the pointer
   first, with an atomic rename. If another publisher swapped it in between, this set is removed
   and :class:`PublishError` says so: two publishers never both "win";
4. remove the sets older than the :data:`~.published.KEEP_SETS` newest, so a reader that resolved
   the pointer before this publish still finds its set.

Read protocol: read ``PREFIX/manifest.json`` once and read the files of the set it names
(``PREFIX/<set>/<name>``), checking sizes and sha256 against it if wanted; nothing needs a
retry, because a set never changes once the pointer can name it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ItemEmbeddingsError
from .outputs import FUSION_CONFIG, IMG_META, MANIFEST, TXT_META
from .published import KEEP_SETS, SETS_DIR, join, resolve
from .storage import file_record, gcs_client, gcs_prefix, is_gcs_uri, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 2  # 1: files flat beside manifest.json (read still), 2: sets and a pointer
LOCK_FILE = ".publish.lock"  # local prefixes: publishers take turns on it
_STAMP = "%Y%m%dT%H%M%SZ"    # a set's name starts with its UTC time (16 characters)
STALE_AFTER = dt.timedelta(days=1)  # a set never made current is a leftover after this
# Meta files whose counts are copied into the manifest: file -> {manifest key: meta key}.
_COUNT_FIELDS = {
    TXT_META: {"text_count": "count", "text_embed_dim": "embed_dim"},
    IMG_META: {"image_count": "count", "image_failed_count": "failed_count",
                      "image_attempted_count": "attempted_count",
                      "image_no_url_count": "no_url_count", "image_embed_dim": "embed_dim"},
    FUSION_CONFIG: {"fused_count": "count", "items_with_images": "items_with_images",
                           "fused_output_dim": "output_dim"},
}


class PublishError(ItemEmbeddingsError, RuntimeError):
    """The output set cannot be published (no files, name clash, unreadable meta file)."""


def _collect(source_dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for src in source_dirs:
        src = Path(src)
        if not src.is_dir():
            raise PublishError(f"source directory not found: {src}")
        for path in sorted(src.iterdir()):
            # Hidden files are temporaries of an atomic write or tool state, never outputs.
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.name == MANIFEST:
                raise PublishError(f"{path}: a source may not contain {MANIFEST} (reserved)")
            if path.name in files:
                raise PublishError(f"file name {path.name!r} is in both {files[path.name].parent} "
                                   f"and {src}")
            files[path.name] = path
    if not files:
        raise PublishError(f"nothing to publish in {[str(s) for s in source_dirs]}")
    return files


def _counts(files: Mapping[str, Path]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for meta_name, fields in _COUNT_FIELDS.items():
        if meta_name not in files:
            continue
        try:
            meta = json.loads(files[meta_name].read_text())
        except (OSError, ValueError) as exc:
            raise PublishError(f"{files[meta_name]}: unreadable meta file: {exc}") from None
        counts.update({key: meta[field] for key, field in fields.items() if field in meta})
    return counts


def build_manifest(files: Mapping[str, Path], *, publish_uri: str, run_id: str,
                   extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a set of files: sizes, sha256, run id and the counts of the meta files."""
    return {
        "format": MANIFEST_FORMAT,
        "publish_uri": publish_uri,
        "run_id": run_id,
        "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {name: file_record(path) for name, path in sorted(files.items())},
        "counts": _counts(files),
        "extra": dict(extra_meta or {}),
    }


def publish_outputs(source_dirs: Sequence[str | os.PathLike], publish_uri: str, *,
                    run_id: str = "", extra_meta: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Publish the files of ``source_dirs`` (flat) as a new set under ``publish_uri`` and make it
    the current one (the module's write protocol).

    Args:
        source_dirs: Local directories whose (non-hidden) files form the output set.
        publish_uri: Local folder or ``gs://bucket/prefix``; the set's stable location.
        run_id: Pipeline run id recorded in the manifest (and in the set's folder name).
        extra_meta: Extra JSON-serialisable fields recorded under ``extra``.

    Returns:
        The pointer written to ``publish_uri/manifest.json`` (the set's manifest plus ``set``).

    Raises:
        PublishError: nothing to publish, or another run moved the pointer (before this run
            started from it, or while this run published).
    """
    if not publish_uri:
        raise PublishError("publish_uri is empty")
    files = _collect(source_dirs)
    manifest = build_manifest(files, publish_uri=publish_uri, run_id=run_id,
                              extra_meta=extra_meta)
    stamp = dt.datetime.now(dt.timezone.utc).strftime(_STAMP)
    run_part = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id or "run")[:48].strip("-") or "run"
    set_name = f"{SETS_DIR}/{stamp}-{run_part}-{uuid.uuid4().hex[:8]}"
    # Writing keeps one target per store (reading a set does not, storage.local_folder): the
    # protocol needs GCS's generation preconditions, and a local lock and atomic rename.
    target = _GcsTarget(publish_uri) if is_gcs_uri(publish_uri) else _LocalTarget(publish_uri)
    pointer = {**manifest, "set": set_name + "/"}
    target.publish(files, manifest, pointer, _started_from(files, publish_uri))
    log.info("published %d files (%s bytes) to %s as %s", len(files),
             f"{sum(f['size'] for f in manifest['files'].values()):,d}", publish_uri, set_name)
    return pointer


def manifest_uri(publish_uri: str) -> str:
    """Where the manifest (the pointer) of the sets published to ``publish_uri`` is.

    >>> manifest_uri("gs://bucket/embeddings/")
    'gs://bucket/embeddings/manifest.json'
    """
    return join(publish_uri, MANIFEST)


def _same_place(a: str, b: str) -> bool:
    if is_gcs_uri(a) or is_gcs_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _started_from(files: Mapping[str, Path], publish_uri: str) -> str:
    """The set under ``publish_uri`` this run's steps read as their previous set ('' if none):
    the text step records it (the first task pinned it, see ``incremental``)."""
    if TXT_META not in files:
        return ""
    previous = str(json.loads(files[TXT_META].read_text()).get("previous_uri") or "")
    parent = previous.rstrip("/").rsplit("/", 1)[0]
    return previous if previous and _same_place(parent, join(publish_uri, SETS_DIR)) else ""


def _moved_on(current: str, started_from: str, publish_uri: str) -> None:
    """Refuse to replace a set newer than the one this run was made from."""
    if started_from and not _same_place(current, started_from):
        raise PublishError(
            f"{publish_uri} now names set {current}, not {started_from} that this run started "
            "from: another run published meanwhile; not replacing a newer set with one made "
            "from an older one (publish to one prefix from one run at a time; "
            "docs/operations.md, Publishing)")


class _LocalTarget:
    def __init__(self, uri: str):
        self.uri = uri
        self.root = Path(uri).expanduser()

    def publish(self, files: Mapping[str, Path], manifest: dict, pointer: dict,
                started_from: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        before = resolve(self.uri)
        if before.manifest is not None:
            _moved_on(before.root, started_from, self.uri)
        pointer["history"] = _history(before.manifest, pointer["set"])
        final = self.root / pointer["set"]
        work = final.parent / f".{final.name}.tmp"
        work.mkdir(parents=True)
        try:
            for name, src in files.items():
                shutil.copyfile(src, work / name)
                with open(work / name, "rb+") as fh:
                    os.fsync(fh.fileno())
            write_json_atomic(work / MANIFEST, manifest)
            os.replace(work, final)  # the whole set appears at once
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one publisher at a time from here to the swap
            now = resolve(self.uri)
            if now.root != before.root or now.manifest != before.manifest:
                shutil.rmtree(final, ignore_errors=True)
                raise _raced(self.uri, now.root)
            write_json_atomic(self.root / MANIFEST, pointer)  # the swap: an atomic rename
            _drop_flat_set(before.manifest, lambda name: (self.root / name).unlink(
                missing_ok=True))
            for old in _old_sets([p.name for p in (self.root / SETS_DIR).iterdir()
                                  if p.is_dir() and not p.name.startswith(".")],
                                 before.manifest, pointer):
                shutil.rmtree(self.root / SETS_DIR / old, ignore_errors=True)


class _GcsTarget:
    def __init__(self, uri: str):
        self.uri = uri
        bucket, self.prefix = gcs_prefix(uri)
        self.bucket = gcs_client().bucket(bucket)

    def publish(self, files: Mapping[str, Path], manifest: dict, pointer: dict,
                started_from: str) -> None:
        from google.api_core.exceptions import PreconditionFailed

        before = resolve(self.uri)
        if before.manifest is not None:
            _moved_on(before.root, started_from, self.uri)
        pointer["history"] = _history(before.manifest, pointer["set"])
        folder = self.prefix + pointer["set"]
        try:
            for name, src in files.items():
                # if_generation_match=0: never overwrite, so a retried upload cannot clobber
                self.bucket.blob(folder + name).upload_from_filename(
                    str(src), if_generation_match=0, checksum="crc32c")
            self.bucket.blob(folder + MANIFEST).upload_from_string(
                _json(manifest), content_type="application/json", if_generation_match=0)
            # the swap: one request that fails if another publisher wrote the pointer since
            self.bucket.blob(self.prefix + MANIFEST).upload_from_string(
                _json(pointer), content_type="application/json",
                if_generation_match=before.generation or 0)
        except PreconditionFailed:
            self._delete(folder)
            raise _raced(self.uri, resolve(self.uri).root) from None
        except BaseException:
            self._delete(folder)  # a set the pointer never named: nobody can be reading it
            raise
        _drop_flat_set(before.manifest, lambda name: self._delete_blob(self.prefix + name))
        sets = {b.name[len(self.prefix) + len(SETS_DIR) + 1:].split("/", 1)[0]
                for b in self.bucket.list_blobs(prefix=f"{self.prefix}{SETS_DIR}/")}
        for old in _old_sets(sorted(sets), before.manifest, pointer):
            self._delete(f"{self.prefix}{SETS_DIR}/{old}/")

    def _delete_blob(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self.bucket.blob(name).delete()
        except NotFound:
            pass

    def _delete(self, folder: str) -> None:
        for blob in self.bucket.list_blobs(prefix=folder):
            try:
                self._delete_blob(blob.name)
            except Exception as exc:  # a leftover of a set nobody names is harmless; say so
                log.warning("could not delete %s: %s", blob.name, exc)


def _json(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def _raced(publish_uri: str, current: str) -> PublishError:
    return PublishError(f"another run published to {publish_uri} while this one was publishing "
                        f"(it now names {current}); this run's set was removed, the other's "
                        "stays current (publish to one prefix from one run at a time; "
                        "docs/operations.md, Publishing)")


def _kept(pointer: Mapping[str, Any] | None) -> list[str]:
    """The sets a pointer keeps for its readers, newest first (its own first)."""
    if not pointer or not pointer.get("set"):
        return []
    return list(pointer.get("history") or [pointer["set"]])


def _history(before: Mapping[str, Any] | None, set_name: str) -> list[str]:
    """The new pointer's: this set and the :data:`KEEP_SETS` - 1 last current before it."""
    return [set_name, *_kept(before)][:KEEP_SETS]


def _old_sets(names: list[str], before: Mapping[str, Any] | None,
              pointer: Mapping[str, Any]) -> list[str]:
    """The set folders (ids under ``sets/``) to remove after ``pointer`` replaced ``before``:
    those that were current once and fell out of the history, and leftovers that never were
    (a killed publish) from more than :data:`STALE_AFTER` before this one. A set of a publish
    still under way is newer than that and never current yet: it is not touched."""
    def ids(sets):
        return {s.strip("/").split("/")[-1] for s in sets}

    kept, dropped = ids(pointer["history"]), ids(_kept(before))
    stamp = dt.datetime.strptime(pointer["set"].strip("/").split("/")[-1][:16], _STAMP)
    stale = (stamp - STALE_AFTER).strftime(_STAMP)
    return sorted(n for n in names if n not in kept and (n in dropped or n[:16] < stale))


def _drop_flat_set(previous: Mapping[str, Any] | None, delete) -> None:
    """Remove the files of a set an older version published flat beside the pointer."""
    if previous is not None and not previous.get("set"):
        for name in previous.get("files", {}):
            if name == Path(name).name and name != MANIFEST:
                delete(name)
