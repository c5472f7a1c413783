"""Publish a run's output files to a stable prefix (local folder or ``gs://``) for the next stage.

Layout after a publish: ``PREFIX/txt.npy``, ``PREFIX/txt_items.parquet``, ... (fixed names) and
``PREFIX/manifest.json`` listing every file of the set with its size and sha256.

Write protocol (what this module does):

1. every file is uploaded under a temporary prefix ``PREFIX/.staging-<token>/`` (slow part);
2. the previous ``manifest.json`` is deleted: from here on the prefix reads as "being published";
3. the staged files are moved into place (a rename / server-side copy each, fast); files that the
   previous manifest listed but this set lacks are deleted;
4. ``manifest.json`` is written last, then the staging prefix is removed.

Read protocol (what the next stage must do):

1. read ``PREFIX/manifest.json``; if it is absent, a publish is in progress (or none happened):
   wait and retry;
2. read only the files it lists, and check each file's sha256 (and size) against the manifest;
   on a mismatch a newer publish replaced the file while you read: start again at 1.

A reader following it never uses a half-published or mixed set.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from .outputs import FUSION_CONFIG, IMG_META, TXT_META
from .storage import file_record, gcs_client, is_gcs_uri, split_gcs_uri, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STAGING_PREFIX = ".staging-"
# Meta files whose counts are copied into the manifest: file -> {manifest key: meta key}.
_COUNT_FIELDS = {
    TXT_META: {"text_count": "count", "text_embed_dim": "embed_dim"},
    IMG_META: {"image_count": "count", "image_failed_count": "failed_count",
                      "image_attempted_count": "attempted_count",
                      "image_no_url_count": "no_url_count", "image_embed_dim": "embed_dim"},
    FUSION_CONFIG: {"fused_count": "count", "items_with_images": "items_with_images",
                           "fused_output_dim": "output_dim"},
}


class PublishError(RuntimeError):
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
    """Copy the files of ``source_dirs`` (flat) to ``publish_uri`` and write ``manifest.json`` last.

    Args:
        source_dirs: Local directories whose (non-hidden) files form the output set.
        publish_uri: Local folder or ``gs://bucket/prefix``; the set's stable location.
        run_id: Pipeline run id recorded in the manifest.
        extra_meta: Extra JSON-serialisable fields recorded under ``extra``.

    Returns:
        The manifest written to ``publish_uri/manifest.json``.
    """
    if not publish_uri:
        raise PublishError("publish_uri is empty")
    files = _collect(source_dirs)
    manifest = build_manifest(files, publish_uri=publish_uri, run_id=run_id,
                              extra_meta=extra_meta)
    token = f"{run_id or 'run'}-{uuid.uuid4().hex[:8]}"
    target = _GcsTarget(publish_uri) if is_gcs_uri(publish_uri) else _LocalTarget(publish_uri)
    target.publish(files, manifest, token)
    log.info("published %d files (%s bytes) to %s", len(files),
             f"{sum(f['size'] for f in manifest['files'].values()):,d}", publish_uri)
    return manifest


def manifest_uri(publish_uri: str) -> str:
    """Where the manifest of the set published to ``publish_uri`` is.

    >>> manifest_uri("gs://bucket/embeddings/")
    'gs://bucket/embeddings/manifest.json'
    """
    return publish_uri.rstrip("/") + "/" + MANIFEST


class _LocalTarget:
    def __init__(self, uri: str):
        self.root = Path(uri).expanduser()

    def _old_files(self) -> set[str]:
        path = self.root / MANIFEST
        return set(json.loads(path.read_text())["files"]) if path.is_file() else set()

    def publish(self, files: Mapping[str, Path], manifest: dict, token: str) -> None:
        stage = self.root / f"{STAGING_PREFIX}{token}"
        stage.mkdir(parents=True)
        try:
            for name, src in files.items():
                shutil.copyfile(src, stage / name)
                with open(stage / name, "rb+") as fh:
                    os.fsync(fh.fileno())
            stale = self._old_files() - set(files)
            (self.root / MANIFEST).unlink(missing_ok=True)
            for name in files:
                os.replace(stage / name, self.root / name)
            for name in stale:
                (self.root / name).unlink(missing_ok=True)
            write_json_atomic(self.root / MANIFEST, manifest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


class _GcsTarget:
    def __init__(self, uri: str):
        bucket, prefix = split_gcs_uri(uri)
        self.bucket = gcs_client().bucket(bucket)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _old_files(self) -> set[str]:
        blob = self.bucket.blob(self.prefix + MANIFEST)
        return set(json.loads(blob.download_as_bytes())["files"]) if blob.exists() else set()

    def publish(self, files: Mapping[str, Path], manifest: dict, token: str) -> None:
        stage = f"{self.prefix}{STAGING_PREFIX}{token}/"
        staged = []
        try:
            for name, src in files.items():
                blob = self.bucket.blob(stage + name)
                # if_generation_match=0: never overwrite, so a retried upload cannot clobber.
                blob.upload_from_filename(str(src), if_generation_match=0,
                                          checksum="crc32c")
                staged.append(blob)
            stale = self._old_files() - set(files)
            old_manifest = self.bucket.blob(self.prefix + MANIFEST)
            if old_manifest.exists():
                old_manifest.delete()
            for blob in staged:
                # Server-side rewrite (no download); large objects take several calls.
                dest, rewrite_token = self.bucket.blob(self.prefix + blob.name[len(stage):]), None
                while True:
                    rewrite_token, _, _ = dest.rewrite(blob, token=rewrite_token)
                    if rewrite_token is None:
                        break
            for name in stale:
                stale_blob = self.bucket.blob(self.prefix + name)
                if stale_blob.exists():
                    stale_blob.delete()
            self.bucket.blob(self.prefix + MANIFEST).upload_from_string(
                json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                content_type="application/json")
        finally:
            for blob in staged:
                try:
                    blob.delete()
                except Exception as exc:  # leftover staging objects are harmless; say so
                    log.warning("could not delete staging object %s: %s", blob.name, exc)
