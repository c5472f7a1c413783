"""publish_outputs against a local folder and a real GCS emulator (gcp-storage-emulator)."""

import json
import os
from pathlib import Path

import pytest
from google.cloud.storage import Blob

from item_embeddings import publish as publish_mod
from item_embeddings.outputs import QA_REPORT, TXT_ARRAY, TXT_ITEMS, TXT_META
from item_embeddings.publish import MANIFEST, PublishError, publish_outputs
from item_embeddings.outputs import IMG_FAILURES
from item_embeddings.storage import sha256_file
from item_embeddings.verify import verify_outputs
from helpers import make_output_set

BUCKET = "embeddings-bucket"


@pytest.fixture
def bucket(gcs):
    """A bucket in the GCS emulator (conftest's ``gcs`` fixture: real emulator on loopback)."""
    found = gcs.lookup_bucket(BUCKET)
    return found or gcs.create_bucket(BUCKET)


def _sources(tmp_path: Path, with_images: bool = True) -> list[Path]:
    """Split an output set into the step directories the pipeline hands over."""
    full = make_output_set(tmp_path / "all", with_images=with_images)
    dirs = {"text": ("txt",), "image": ("img",), "fusion": ("fused", "fusion")}
    out = []
    for step, prefixes in dirs.items():
        d = tmp_path / step
        d.mkdir()
        for f in full.iterdir():
            if f.name.startswith(prefixes):
                f.rename(d / f.name)
        if any(d.iterdir()):
            out.append(d)
    (out[0] / ".txt.npy.123.tmp").write_bytes(b"partial")  # leftovers are never published
    return out


def _check_manifest(manifest: dict, sources: list[Path]) -> None:
    files = {f.name: f for d in sources for f in d.iterdir() if not f.name.startswith(".")}
    assert set(manifest["files"]) == set(files)
    for name, entry in manifest["files"].items():
        assert entry == {"size": files[name].stat().st_size, "sha256": sha256_file(files[name])}


def test_publish_local_folder(tmp_path):
    sources = _sources(tmp_path)
    dest = tmp_path / "published"
    manifest = publish_outputs(sources, str(dest), run_id="run-1", extra_meta={"git": "abc"})
    _check_manifest(manifest, sources)
    assert manifest["run_id"] == "run-1" and manifest["extra"] == {"git": "abc"}
    assert manifest["counts"] == {
        "text_count": 40, "text_embed_dim": 384, "image_count": 21, "image_failed_count": 5,
        "image_attempted_count": 26, "image_no_url_count": 14, "image_embed_dim": 512,
        "fused_count": 40, "items_with_images": 20, "fused_output_dim": 128}
    assert json.loads((dest / MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in dest.iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert verify_outputs(str(dest)).ok

    # Republishing a text-only set replaces the files and drops the old set's extra files.
    text_only = _sources(tmp_path / "second", with_images=False)
    manifest2 = publish_outputs(text_only, str(dest), run_id="run-2")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", TXT_ARRAY,
                                                      TXT_ITEMS, TXT_META]
    # It reads back whole (manifest and hashes agree) but is refused as a run that stopped early.
    report = verify_outputs(str(dest))
    assert manifest2["run_id"] == "run-2" and not report.ok
    assert all("outputs missing" in v for v in report.violations), report.violations


def test_local_manifest_removed_before_files_move_and_written_last(tmp_path, monkeypatch):
    dest = tmp_path / "published"
    publish_outputs(_sources(tmp_path / "a"), str(dest), run_id="old")
    real_replace, moved = os.replace, []

    def replace(src, dst):
        if Path(dst).parent == dest and Path(dst).name != MANIFEST:
            assert not (dest / MANIFEST).exists(), "old manifest still visible while moving"
            moved.append(Path(dst).name)
            if len(moved) == 3:
                raise OSError("disk full")  # a crash in the middle of moving files
        return real_replace(src, dst)

    monkeypatch.setattr(publish_mod.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        publish_outputs(_sources(tmp_path / "b", with_images=False), str(dest), run_id="new")
    # Half moved: no manifest, so a reader waits instead of reading a mixed set.
    assert not (dest / MANIFEST).exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".staging-")]
    monkeypatch.setattr(publish_mod.os, "replace", real_replace)
    manifest = publish_outputs(_sources(tmp_path / "c"), str(dest), run_id="retry")
    assert json.loads((dest / MANIFEST).read_text())["run_id"] == "retry"
    assert verify_outputs(str(dest)).ok and len(manifest["files"]) == 12


def test_publish_errors(tmp_path):
    a = make_output_set(tmp_path / "a", with_images=False)
    b = make_output_set(tmp_path / "b", with_images=False)
    with pytest.raises(PublishError, match="'txt.npy' is in both"):
        publish_outputs([a, b], str(tmp_path / "dest"))
    with pytest.raises(PublishError, match="publish_uri is empty"):
        publish_outputs([a], "")
    with pytest.raises(PublishError, match="source directory not found"):
        publish_outputs([tmp_path / "nope"], str(tmp_path / "dest"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PublishError, match="nothing to publish"):
        publish_outputs([empty], str(tmp_path / "dest"))
    (a / TXT_META).write_text("{broken")
    with pytest.raises(PublishError, match="txt_meta.json: unreadable meta file"):
        publish_outputs([a], str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


def test_publish_gcs(bucket, tmp_path):
    sources = _sources(tmp_path)
    uri = f"gs://{BUCKET}/embeddings/prod"
    manifest = publish_outputs(sources, uri, run_id="run-1")
    _check_manifest(manifest, sources)
    names = sorted(b.name for b in bucket.list_blobs(prefix="embeddings/prod/"))
    assert names == sorted(f"embeddings/prod/{n}" for n in [*manifest["files"], MANIFEST])
    stored = json.loads(bucket.blob(f"embeddings/prod/{MANIFEST}").download_as_bytes())
    assert stored == manifest
    # The published set reads back (download + hash check) through verify.
    report = verify_outputs(uri)
    assert report.ok, report.violations
    assert "run_id='run-1'" in report.format()

    text_only = _sources(tmp_path / "second", with_images=False)
    publish_outputs(text_only, uri, run_id="run-2")
    names = sorted(b.name.rsplit("/", 1)[1] for b in bucket.list_blobs(prefix="embeddings/prod/"))
    assert names == ["manifest.json", TXT_ARRAY, TXT_ITEMS, TXT_META]


def test_gcs_failure_while_moving_leaves_no_manifest(bucket, tmp_path, monkeypatch):
    uri = f"gs://{BUCKET}/embeddings/crash"
    publish_outputs(_sources(tmp_path / "a"), uri, run_id="old")
    real_rewrite, calls = Blob.rewrite, []

    def rewrite(self, source, token=None, **kw):
        assert not bucket.blob(f"embeddings/crash/{MANIFEST}").exists()
        calls.append(self.name)
        if len(calls) == 2:
            raise ConnectionError("network lost")
        return real_rewrite(self, source, token=token, **kw)

    monkeypatch.setattr(Blob, "rewrite", rewrite)
    with pytest.raises(ConnectionError):
        publish_outputs(_sources(tmp_path / "b"), uri, run_id="new")
    names = [b.name for b in bucket.list_blobs(prefix="embeddings/crash/")]
    assert f"embeddings/crash/{MANIFEST}" not in names
    assert not [n for n in names if "/.staging-" in n]  # staging cleaned up


def test_component_publishes_through_kfp_local(tmp_path):
    """The KFP component end to end in kfp.local (importers hand it three step directories)."""
    from kfp import dsl, local

    from item_embeddings.components.publish_outputs import make_component

    text, image, fused = _sources(tmp_path / "steps")
    knn, report = tmp_path / "steps" / "knn", tmp_path / "steps" / "report"
    knn.mkdir()  # an empty kNN folder: a set without graphs (verify accepts it)
    report.mkdir()
    (report / QA_REPORT).write_text("<html><body><h2>QA</h2></body></html>")
    dest = tmp_path / "published"
    publish_op = make_component("python:3.11")

    @dsl.pipeline(name="publish-test")
    def pipe(publish_uri: str) -> str:
        imported = [dsl.importer(artifact_uri=str(d), artifact_class=dsl.Dataset).output
                    for d in (text, image, fused, knn, report)]
        return publish_op(text_embeddings=imported[0], image_embeddings=imported[1],
                          fused_embeddings=imported[2], knn_graphs=imported[3],
                          report=imported[4], publish_uri=publish_uri,
                          run_id="local-1").output

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "kfp"))
    assert pipe(publish_uri=str(dest)).output == str(dest / MANIFEST)
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["run_id"] == "local-1" and len(manifest["files"]) == 13
    assert QA_REPORT in manifest["files"]
    assert manifest["extra"]["sources"]["text"] == str(text)
    assert verify_outputs(str(dest)).ok
    # Empty publish_uri = publishing off: nothing happens, "" comes back.
    assert pipe(publish_uri="").output == ""


# ----------------------------------------------------------------------------- what a reader sees


def test_manifest_records_format_uri_time_and_the_counts_present(tmp_path):
    import datetime as dt

    text, image, fused = _sources(tmp_path)
    dest = str(tmp_path / "published")
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    manifest = publish_outputs([image, fused], dest)  # no text group, no run id
    published_at = dt.datetime.fromisoformat(manifest["published_at"])
    assert published_at.utcoffset() == dt.timedelta(0)  # UTC, whole seconds
    assert before <= published_at <= dt.datetime.now(dt.timezone.utc)
    assert manifest["published_at"].endswith("+00:00") and "." not in manifest["published_at"]
    assert manifest["format"] == 1 and manifest["publish_uri"] == dest and manifest["run_id"] == ""
    # A missing meta file leaves its counts out; the other groups' counts are still there.
    assert manifest["counts"] == {
        "image_count": 21, "image_failed_count": 5, "image_attempted_count": 26,
        "image_no_url_count": 14, "image_embed_dim": 512, "fused_count": 40,
        "items_with_images": 20, "fused_output_dim": 128}
    assert json.loads((Path(dest) / MANIFEST).read_text()) == manifest


def test_publish_error_messages_name_the_problem(tmp_path):
    with pytest.raises(PublishError) as exc:
        publish_outputs([tmp_path], "")
    assert str(exc.value) == "publish_uri is empty"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PublishError) as exc:
        publish_outputs([empty], str(tmp_path / "dest"))
    assert str(exc.value) == f"nothing to publish in {[str(empty)]}"
    source = make_output_set(tmp_path / "set", with_images=False)
    (source / MANIFEST).write_text("{}")  # e.g. a published folder handed back as a source
    with pytest.raises(PublishError) as exc:
        publish_outputs([source], str(tmp_path / "dest"))
    assert str(exc.value) == f"{source / MANIFEST}: a source may not contain {MANIFEST} (reserved)"


def test_manifest_uri_is_beside_the_files():
    assert publish_mod.manifest_uri("gs://b/embeddings/") == "gs://b/embeddings/manifest.json"
    assert publish_mod.manifest_uri("gs://b/embeddings") == "gs://b/embeddings/manifest.json"
    assert publish_mod.manifest_uri("/data/out/") == "/data/out/manifest.json"
    assert publish_mod.manifest_uri("gs://b/v2/X") == "gs://b/v2/X/manifest.json"  # verbatim


@pytest.mark.parametrize("run_id, staging", [("run-1", r"\.staging-run-1-[0-9a-f]{8}"),
                                             ("", r"\.staging-run-[0-9a-f]{8}")])
def test_local_publish_stages_under_a_named_folder_and_logs_what_it_did(
        tmp_path, monkeypatch, caplog, run_id, staging):
    """docs/operations.md: files are staged under PREFIX/.staging-<run id>-<random>/."""
    import logging
    import re

    dest = tmp_path / "published"
    sources = _sources(tmp_path)
    real_replace, staged_in = os.replace, set()

    def replace(src, dst):
        if Path(dst).parent == dest and Path(src).parent != dest:  # not the manifest's own
            staged_in.add(Path(src).parent.name)
        return real_replace(src, dst)

    monkeypatch.setattr(publish_mod.os, "replace", replace)
    with caplog.at_level(logging.INFO, logger="item_embeddings.publish"):
        manifest = publish_outputs(sources, str(dest), run_id=run_id)
    (folder,) = staged_in
    assert re.fullmatch(staging, folder), folder
    assert not (dest / folder).exists()
    size = sum(entry["size"] for entry in manifest["files"].values())
    logged = [r.getMessage() for r in caplog.records if r.name == "item_embeddings.publish"]
    assert size > 1000 and logged == [f"published 12 files ({size:,d} bytes) to {dest}"]


def test_republish_when_a_file_of_the_old_set_was_already_removed(tmp_path):
    dest = tmp_path / "published"
    publish_outputs(_sources(tmp_path / "a"), str(dest), run_id="old")
    (dest / IMG_FAILURES).unlink()  # removed by hand (or a cleanup) since the last publish
    manifest = publish_outputs(_sources(tmp_path / "b", with_images=False), str(dest),
                               run_id="new")
    assert sorted(p.name for p in dest.iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert verify_outputs(str(dest)).ok is False  # text only: refused as a run that stopped early


# ----------------------------------------------------------------------------- gs:// details


@pytest.mark.parametrize("uri_path, prefix", [
    ("", ""), ("/", ""), ("//", ""),                 # the bucket itself
    ("/nightly/sets", "nightly/sets/"), ("/nightly/sets//", "nightly/sets/"),
    ("/v2/X", "v2/X/"), ("/X", "X/"),                # kept verbatim, whatever its letters
])
def test_gcs_prefix_spellings(gcs, tmp_path, uri_path, prefix):
    import uuid

    bucket = gcs.create_bucket(f"spell-{uuid.uuid4().hex[:8]}")
    manifest = publish_outputs(_sources(tmp_path, with_images=False),
                               f"gs://{bucket.name}{uri_path}", run_id="r")
    names = sorted(b.name for b in bucket.list_blobs())
    assert names == sorted(prefix + name for name in [*manifest["files"], MANIFEST])


def test_gcs_publish_requests(bucket, tmp_path, monkeypatch):
    """What goes over the wire: staged uploads that never overwrite (ifGenerationMatch=0, which
    also makes them safe to retry) with a crc32c the server checks, every rewrite continued with
    its token until done, and the manifest as readable JSON with its content type."""
    import requests

    real_request, uploads = requests.Session.request, []

    def request(self, method, url, *args, **kwargs):
        if "/upload/storage/v1/" in url:
            body = kwargs.get("data") or b""
            meta = json.loads(body.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0])
            uploads.append((url, meta))
        return real_request(self, method, url, *args, **kwargs)

    real_rewrite, rewrites = Blob.rewrite, {}

    def rewrite(self, source, token=None, **kw):
        # Cloud Storage may answer a large rewrite in several calls: the first hands back a token.
        calls = rewrites.setdefault(self.name, [])
        calls.append(token)
        assert len(calls) <= 2, f"rewrite of {self.name} never finished: {calls}"
        if token is None:
            return f"token-{self.name}", 0, source.size
        return real_rewrite(self, source, **kw)

    monkeypatch.setattr(requests.Session, "request", request)
    monkeypatch.setattr(Blob, "rewrite", rewrite)
    uri = f"gs://{BUCKET}/embeddings/wire"
    manifest = publish_outputs(_sources(tmp_path), uri, run_id="run-1")

    staged = [(url, meta) for url, meta in uploads if "/.staging-" in meta["name"]]
    assert sorted(meta["name"].rsplit("/", 1)[1] for _, meta in staged) == sorted(manifest["files"])
    for url, meta in staged:
        assert "ifGenerationMatch=0" in url and meta.get("crc32c"), (url, meta)
    assert rewrites == {f"embeddings/wire/{name}": [None, f"token-embeddings/wire/{name}"]
                        for name in manifest["files"]}
    blob = bucket.get_blob(f"embeddings/wire/{MANIFEST}")
    assert blob.content_type == "application/json"
    assert blob.download_as_bytes().decode() == json.dumps(manifest, indent=2,
                                                           sort_keys=True) + "\n"


def test_gcs_staging_objects_that_cannot_be_deleted_are_reported(bucket, tmp_path, monkeypatch,
                                                                  caplog):
    import logging

    real_delete = Blob.delete

    def delete(self, *args, **kwargs):
        if "/.staging-" in self.name:
            raise ConnectionError("connection reset")
        return real_delete(self, *args, **kwargs)

    monkeypatch.setattr(Blob, "delete", delete)
    uri = f"gs://{BUCKET}/embeddings/leftovers"
    with caplog.at_level(logging.WARNING, logger="item_embeddings.publish"):
        manifest = publish_outputs(_sources(tmp_path, with_images=False), uri, run_id="run-1")
    staged = sorted(b.name for b in bucket.list_blobs(prefix="embeddings/leftovers/.staging-"))
    assert len(staged) == len(manifest["files"])  # the set is published; leftovers are harmless
    logged = [r.getMessage() for r in caplog.records if r.name == "item_embeddings.publish"]
    assert sorted(logged) == [
        f"could not delete staging object {name}: connection reset" for name in staged]
