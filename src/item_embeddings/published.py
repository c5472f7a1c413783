"""Where a published set's files are: the pointer at a publish prefix, resolved once.

A publish prefix holds immutable sets and one pointer (``publish.publish_outputs`` writes them)::

    PREFIX/manifest.json              the pointer: the current set's manifest plus "set"
    PREFIX/sets/<set id>/             one published set: its files and its own manifest.json

A reader resolves the prefix once (one read of ``manifest.json``: one object generation on
``gs://``, one atomic rename locally) and reads only the set that pointer names: a publish that
starts meanwhile writes a new set beside it and swaps the pointer, and the sets before it are kept
(:data:`KEEP_SETS`), so the reader never sees a half-published or mixed set. A folder without a
pointer is read as it is: a set's own folder, an earlier run's output folder, or a prefix
published by an older version (files beside ``manifest.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ItemEmbeddingsError
from .outputs import MANIFEST
from .storage import gcs_client, is_gcs_uri, split_gcs_uri

SETS_DIR = "sets"
KEEP_SETS = 3  # sets kept under a prefix: the current one and the two before it (readers)


class PublishedSetError(ItemEmbeddingsError, ValueError):
    """A publish prefix whose pointer cannot be read."""


@dataclass(frozen=True)
class Resolved:
    """A location resolved to the folder of one set's files."""

    uri: str                         # what was asked for
    root: str                        # the folder holding the set's files (no trailing '/')
    manifest: dict[str, Any] | None  # the manifest read (None: no manifest, a run's folder)
    generation: int | None = None    # the pointer object's generation (gs://), for a swap

    @property
    def pointed(self) -> bool:
        """Whether ``uri`` is a publish prefix whose pointer named ``root``."""
        return self.root != self.uri.rstrip("/")


def join(uri: str, *names: str) -> str:
    """``uri/name/...`` for a local folder or a ``gs://`` prefix."""
    return "/".join([uri.rstrip("/"), *(n.strip("/") for n in names)])


def _gcs_blob(uri: str):
    bucket, name = split_gcs_uri(uri)
    return gcs_client().bucket(bucket).blob(name)


def read_manifest(uri: str) -> tuple[dict[str, Any] | None, int | None]:
    """The manifest at ``uri/manifest.json`` and its generation (``gs://``; 0 when absent, None
    locally); ``(None, ...)`` when there is none."""
    path = join(uri, MANIFEST)
    if is_gcs_uri(uri):
        data, generation = _read_generation(path)
        if data is None:
            return None, 0
    else:
        try:
            data = Path(path).expanduser().read_bytes()
        except FileNotFoundError:
            return None, None
        generation = None
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise PublishedSetError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise PublishedSetError(f"{path}: a manifest is a JSON object with 'files'")
    return manifest, generation


def _read_generation(path: str, attempts: int = 5) -> tuple[bytes | None, int]:
    """An object's bytes and the generation they are ((None, 0) when it does not exist): its
    metadata, then its contents pinned to that generation; a write in between is read again."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    for _ in range(attempts):
        blob = _gcs_blob(path)
        try:
            blob.reload()
            generation = blob.generation  # (a download resets it from its response headers)
            return blob.download_as_bytes(if_generation_match=generation), generation
        except NotFound:
            if blob.generation is None:  # not there at all
                return None, 0
        except PreconditionFailed:
            pass  # replaced between the two reads: read the new one
    raise PublishedSetError(f"{path} changed on every one of {attempts} reads")


def resolve(uri: str) -> Resolved:
    """``uri`` resolved once: the set its pointer names, or ``uri`` itself without one."""
    manifest, generation = read_manifest(uri)
    root = uri.rstrip("/")
    if manifest is not None and manifest.get("set"):
        name = str(manifest["set"]).strip("/")
        if not name.startswith(f"{SETS_DIR}/") or ".." in name.split("/"):
            raise PublishedSetError(f"{join(uri, MANIFEST)}: 'set' {name!r} is not a folder "
                                    f"under {SETS_DIR}/")
        root = join(uri, name)
    return Resolved(uri=uri, root=root, manifest=manifest, generation=generation)
