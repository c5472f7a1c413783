"""publish_outputs against a local folder and a real GCS emulator (gcp-storage-emulator)."""

import json
from pathlib import Path

import pytest
from google.cloud.storage import Blob

from helpers import make_output_set, write_items, write_knn
from item_embeddings import publish as publish_mod
from item_embeddings.outputs import QA_REPORT, TXT_ARRAY, TXT_ITEMS, TXT_META
from item_embeddings.publish import LOCK_FILE, MANIFEST, PublishError, publish_outputs
from item_embeddings.published import KEEP_SETS, SETS_DIR, resolve
from item_embeddings.storage import sha256_file
from item_embeddings.verify import verify_outputs

BUCKET = "embeddings-bucket"


@pytest.fixture
def bucket(gcs):
    """A bucket in the GCS emulator (conftest's ``gcs`` fixture: real emulator on loopback)."""
    found = gcs.lookup_bucket(BUCKET)
    return found or gcs.create_bucket(BUCKET)


def _emulator_honours_preconditions(bucket) -> bool:
    from google.api_core.exceptions import PreconditionFailed

    blob = bucket.blob("probe/preconditions")
    blob.upload_from_string(b"1")
    try:
        bucket.blob("probe/preconditions").upload_from_string(b"2", if_generation_match=0)
    except PreconditionFailed:
        return True
    return False


@pytest.fixture
def preconditions(bucket, gcs_emulator_host, monkeypatch):
    """GCS generation preconditions (``ifGenerationMatch``), enforced.

    gcp-storage-emulator (2024.8.3, checked here) ignores them: an upload with
    ``if_generation_match=0`` overwrites, one with a stale generation succeeds. So unless the
    emulator honours them, the HTTP transport is intercepted: a request to the emulator that
    carries ``ifGenerationMatch`` is answered 412, as GCS answers it, when the object's
    generation (asked of the emulator) differs; otherwise it goes through. Check and request run
    under one lock, so concurrent requests see the same order the emulator does.
    """
    import re
    import threading
    import urllib.error
    import urllib.parse
    import urllib.request

    import requests

    if _emulator_honours_preconditions(bucket):
        return "emulator"
    real_send, lock = requests.adapters.HTTPAdapter.send, threading.Lock()

    def generation(bucket_name: str, name: str) -> int:
        url = (f"{gcs_emulator_host}/storage/v1/b/{bucket_name}/o/"
               f"{urllib.parse.quote(name, safe='')}")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(json.loads(resp.read())["generation"])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return 0
            raise

    def send(adapter, request, **kwargs):
        url = urllib.parse.urlsplit(request.url)
        wanted = urllib.parse.parse_qs(url.query).get("ifGenerationMatch")
        if not wanted or not request.url.startswith(gcs_emulator_host):
            return real_send(adapter, request, **kwargs)
        path = urllib.parse.unquote(url.path)
        bucket_name = path.split("/b/", 1)[1].split("/", 1)[0]
        if "/o/" in path:
            name = path.split("/o/", 1)[1]
        else:  # a multipart upload names its object in the JSON part of the body
            body = request.body.decode("latin-1") if isinstance(request.body, bytes) \
                else str(request.body)
            name = json.loads(re.search(r'\{"name": ?"[^"]*"[^}]*\}', body).group(0))["name"]
        with lock:
            if generation(bucket_name, name) != int(wanted[0]):
                resp = requests.Response()
                resp.status_code, resp.url, resp.request = 412, request.url, request
                resp.headers["content-type"] = "application/json"
                resp._content = json.dumps({"error": {"code": 412, "message":
                                                      "conditionNotMet"}}).encode()
                return resp
            return real_send(adapter, request, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    assert _emulator_honours_preconditions(bucket)  # the interception works as GCS would
    return "intercepted"


def _sources(tmp_path: Path, with_images: bool = True) -> list[Path]:
    """Split an output set into the step directories the pipeline hands over."""
    full = make_output_set(tmp_path / "all", with_images=with_images)
    dirs = {"text": ("txt",), "image": ("img",), "fusion": ("fused", "fusion"),
            "report": ("qa_report", "report_meta")}
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
    # the pointer is the set's manifest plus the set it names; the set holds its own manifest
    assert json.loads((dest / MANIFEST).read_text()) == manifest
    assert manifest["set"].startswith("sets/") and "-run-1-" in manifest["set"]
    first = dest / manifest["set"]
    assert sorted(p.name for p in first.iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert json.loads((first / MANIFEST).read_text()) == \
        {k: v for k, v in manifest.items() if k not in ("set", "history")}
    assert manifest["history"] == [manifest["set"]]
    assert {p.name for p in dest.iterdir()} == {MANIFEST, SETS_DIR, LOCK_FILE}
    assert verify_outputs(str(dest)).ok and verify_outputs(str(first)).ok

    # Republishing a text-only set: the pointer names a set of just those files; the first set
    # stays (a reader that resolved the pointer before may still be reading it).
    text_only = _sources(tmp_path / "second", with_images=False)
    manifest2 = publish_outputs(text_only, str(dest), run_id="run-2")
    assert sorted(p.name for p in (dest / manifest2["set"]).iterdir()) == [
        MANIFEST, TXT_ARRAY, TXT_ITEMS, TXT_META]
    assert json.loads((dest / MANIFEST).read_text())["set"] == manifest2["set"]
    assert verify_outputs(str(first)).ok
    # It reads back whole (manifest and hashes agree) but is refused as a run that stopped early.
    report = verify_outputs(str(dest))
    assert manifest2["run_id"] == "run-2" and not report.ok
    assert all("outputs missing" in v for v in report.violations), report.violations


def test_local_crash_while_writing_a_set_leaves_the_current_one(tmp_path, monkeypatch):
    """A publish that dies while copying its files changes nothing a reader sees: the pointer
    still names the old, complete set; no partial set is left; a retry publishes."""
    dest = tmp_path / "published"
    old = publish_outputs(_sources(tmp_path / "a"), str(dest), run_id="old")
    real_copy, copied = publish_mod.shutil.copyfile, []

    def copyfile(src, dst):
        copied.append(Path(dst).name)
        if len(copied) == 3:
            raise OSError("disk full")  # a crash in the middle of the set
        return real_copy(src, dst)

    monkeypatch.setattr(publish_mod.shutil, "copyfile", copyfile)
    with pytest.raises(OSError, match="disk full"):
        publish_outputs(_sources(tmp_path / "b", with_images=False), str(dest), run_id="new")
    assert json.loads((dest / MANIFEST).read_text()) == old
    assert [p.name for p in (dest / SETS_DIR).iterdir()] == [old["set"].split("/")[1]]
    assert verify_outputs(str(dest)).ok
    monkeypatch.setattr(publish_mod.shutil, "copyfile", real_copy)
    manifest = publish_outputs(_sources(tmp_path / "c"), str(dest), run_id="retry")
    assert json.loads((dest / MANIFEST).read_text())["run_id"] == "retry"
    assert verify_outputs(str(dest)).ok and len(manifest["files"]) == 14  # report's 2 too


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


def _blobs(bucket, prefix: str) -> list[str]:
    return sorted(b.name[len(prefix):] for b in bucket.list_blobs(prefix=prefix))


def test_publish_gcs(bucket, tmp_path):
    sources = _sources(tmp_path)
    uri = f"gs://{BUCKET}/embeddings/prod"
    manifest = publish_outputs(sources, uri, run_id="run-1")
    _check_manifest(manifest, sources)
    set_name = manifest["set"]
    assert _blobs(bucket, "embeddings/prod/") == sorted(
        [MANIFEST, *(f"{set_name}{n}" for n in [*manifest["files"], MANIFEST])])
    stored = json.loads(bucket.blob(f"embeddings/prod/{MANIFEST}").download_as_bytes())
    assert stored == manifest
    # The published set reads back (download + hash check) through verify.
    report = verify_outputs(uri)
    assert report.ok, report.violations
    assert "run_id='run-1'" in report.format()
    assert f"its pointer names the set {uri}/{set_name.rstrip('/')}" in report.format()

    text_only = _sources(tmp_path / "second", with_images=False)
    second = publish_outputs(text_only, uri, run_id="run-2")
    assert _blobs(bucket, f"embeddings/prod/{second['set']}") == [
        MANIFEST, TXT_ARRAY, TXT_ITEMS, TXT_META]
    assert verify_outputs(f"{uri}/{set_name}").ok  # the first set is kept for its readers


def test_gcs_failure_while_uploading_leaves_the_current_set(bucket, tmp_path, monkeypatch):
    uri = f"gs://{BUCKET}/embeddings/crash"
    old = publish_outputs(_sources(tmp_path / "a"), uri, run_id="old")
    real_upload, calls = Blob.upload_from_filename, []

    def upload(self, filename, **kw):
        calls.append(self.name)
        if len(calls) == 2:
            raise ConnectionError("network lost")
        return real_upload(self, filename, **kw)

    monkeypatch.setattr(Blob, "upload_from_filename", upload)
    with pytest.raises(ConnectionError):
        publish_outputs(_sources(tmp_path / "b"), uri, run_id="new")
    assert json.loads(bucket.blob(f"embeddings/crash/{MANIFEST}").download_as_bytes()) == old
    # the half-uploaded set is gone; the current one is whole
    assert {n.split("/")[1] for n in _blobs(bucket, "embeddings/crash/") if "/" in n} == \
        {old["set"].split("/")[1]}
    monkeypatch.setattr(Blob, "upload_from_filename", real_upload)
    assert verify_outputs(uri).ok


def test_component_publishes_through_kfp_local(tmp_path):
    """The QA report component publishes (no task of its own only copies files): end to end
    in kfp.local, importers handing it the items and the four step directories."""
    from kfp import dsl, local

    from item_embeddings.components.qa_report import make_component

    full = write_knn(make_output_set(tmp_path / "all"))
    items = write_items(tmp_path / "items.parquet", {
        "asin": [f"B{i:05d}" for i in range(40)], "title": [f"item {i}" for i in range(40)],
        "description": ["a thing"] * 40, "image_url": [None] * 40})
    steps = {"text": ("txt",), "image": ("img",), "fused": ("fused", "fusion"), "knn": ("knn",)}
    dirs = {}
    for step, prefixes in steps.items():
        dirs[step] = tmp_path / "steps" / step
        dirs[step].mkdir(parents=True)
        for f in full.iterdir():
            if f.name.startswith(prefixes):
                f.rename(dirs[step] / f.name)
    dest = tmp_path / "published"
    report_op = make_component("python:3.11")

    @dsl.pipeline(name="publish-test")
    def pipe(publish_uri: str) -> str:
        imported = [dsl.importer(artifact_uri=str(d), artifact_class=dsl.Dataset).output
                    for d in (items, *dirs.values())]
        return report_op(items=imported[0], text_embeddings=imported[1],
                         image_embeddings=imported[2], fused_embeddings=imported[3],
                         knn_graphs=imported[4], publish_uri=publish_uri,
                         run_id="local-1").outputs["Output"]

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "kfp"))
    assert pipe(publish_uri=str(dest)).output == str(dest / MANIFEST)
    manifest = json.loads((dest / MANIFEST).read_text())
    # text 3, image 4, fused 5, kNN 5 files and the report the task just rendered with its
    # record (report_meta.json)
    assert manifest["run_id"] == "local-1" and len(manifest["files"]) == 19
    assert QA_REPORT in manifest["files"]
    assert manifest["extra"]["sources"]["text"] == str(dirs["text"])
    assert verify_outputs(str(dest)).ok
    # Empty publish_uri = publishing off: nothing happens, "" comes back.
    assert pipe(publish_uri="").output == ""


# ----------------------------------------------------------------------------- concurrent runs

def _during_first(monkeypatch, owner, name: str, action):
    """Run ``action`` once, the first time ``owner.name`` is called (inside a publish)."""
    real, done = getattr(owner, name), []

    def hooked(*args, **kwargs):
        if not done:
            done.append(True)
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, hooked)


def test_local_publish_that_loses_the_race_is_refused_and_removed(tmp_path, monkeypatch):
    """Two publishers on one local prefix: B starts, A publishes whole while B copies its
    files; B's swap sees the pointer moved (under the lock), removes its set and says so;
    A's set stays current and whole."""
    dest = tmp_path / "published"
    first = publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="first")
    won = {}
    _during_first(monkeypatch, publish_mod.shutil, "copyfile", lambda: won.update(
        publish_outputs(_sources(tmp_path / "a"), str(dest), run_id="a")))
    with pytest.raises(PublishError, match=r"another run published to .* while this one was "
                                           r"publishing \(it now names .*-a-"):
        publish_outputs(_sources(tmp_path / "b", with_images=False), str(dest), run_id="b")
    assert json.loads((dest / MANIFEST).read_text()) == won
    assert sorted(p.name for p in (dest / SETS_DIR).iterdir()) == sorted(
        m["set"].split("/")[1] for m in (first, won))  # B's set removed, nothing half-made
    assert verify_outputs(str(dest)).ok


def test_local_concurrent_publishers_and_a_reader(tmp_path):
    """Real threads: four publishers, three publishes each, on one local prefix while a reader
    resolves the pointer and checks every file of the set it names against the pointer's
    hashes. Every publish either becomes current or is refused as a lost race; the reader never
    meets a missing or mixed file; old sets are pruned to KEEP_SETS."""
    import threading

    dest = tmp_path / "published"
    sources = [_sources(tmp_path / f"s{i}", with_images=i % 2 == 0) for i in range(4)]
    outcomes, problems, stop = [], [], threading.Event()

    def publisher(i):
        for round_ in range(3):
            try:
                publish_outputs(sources[i], str(dest), run_id=f"p{i}-{round_}")
                outcomes.append("published")
            except PublishError as exc:
                assert "another run published" in str(exc)
                outcomes.append("lost")

    def reader():
        reads = 0
        while (not stop.is_set() or reads == 0) and reads < 10_000:
            if (dest / MANIFEST).exists():
                found = resolve(str(dest))
                for name, entry in found.manifest["files"].items():
                    path = Path(found.root) / name
                    if not path.is_file() or sha256_file(path) != entry["sha256"]:
                        problems.append((found.root, name))
                reads += 1

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watcher.join(timeout=120)
    assert problems == [] and len(outcomes) == 12 and "published" in outcomes
    current = json.loads((dest / MANIFEST).read_text())
    assert verify_outputs(str(dest / current["set"])).ok
    sets = sorted(p.name for p in (dest / SETS_DIR).iterdir())
    assert current["set"].split("/")[1] in sets and len(sets) <= KEEP_SETS
    assert not [p for p in (dest / SETS_DIR).iterdir() if p.name.startswith(".")]


def test_a_run_made_from_an_older_set_does_not_replace_a_newer_one(tmp_path):
    """The nightly and the weekly retrain both start from set S0 of one prefix; the weekly
    publishes S1 first; the nightly, made from S0 (its text meta records the set the run read),
    is refused before it uploads anything."""
    dest = tmp_path / "published"
    s0 = publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="s0")
    publish_outputs(_sources(tmp_path / "weekly"), str(dest), run_id="weekly")
    nightly = _sources(tmp_path / "nightly")
    meta_path = nightly[0] / TXT_META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "previous_uri": str(dest / s0["set"])}))
    before = sorted((dest / SETS_DIR).iterdir())
    with pytest.raises(PublishError, match=r"now names set .*-weekly-.*, not .*-s0-.* that this "
                                           r"run started from"):
        publish_outputs(nightly, str(dest), run_id="nightly")
    assert sorted((dest / SETS_DIR).iterdir()) == before
    # a run made from the current set publishes
    meta_path.write_text(json.dumps({**meta, "previous_uri": resolve(str(dest)).root}))
    assert publish_outputs(nightly, str(dest), run_id="nightly")["run_id"] == "nightly"


def test_a_reader_keeps_its_set_while_later_publishes_come_and_go(tmp_path):
    """A reader that resolved the prefix reads that set to the end, whatever is published
    meanwhile, until KEEP_SETS newer publishes have pruned it."""
    dest = tmp_path / "published"
    publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="r0")
    pinned = resolve(str(dest))
    for i in range(1, KEEP_SETS):
        publish_outputs(_sources(tmp_path / str(i), with_images=False), str(dest), run_id=f"r{i}")
        assert resolve(str(dest)).root != pinned.root
        assert verify_outputs(pinned.root).ok  # still whole
    publish_outputs(_sources(tmp_path / "last", with_images=False), str(dest), run_id="last")
    assert not Path(pinned.root).exists()  # KEEP_SETS newer sets: pruned


def test_sets_never_made_current_are_left_alone_a_day_then_removed(tmp_path):
    """A set folder no pointer ever named is a publish under way (newer: untouched) or the
    leftover of a killed one (more than a day before the current set: removed)."""
    dest = tmp_path / "published"
    publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="r0")
    killed = dest / SETS_DIR / "20200101T000000Z-killed-00000000"
    under_way = dest / SETS_DIR / "29991231T235959Z-busy-00000000"
    for folder in (killed, under_way):
        folder.mkdir()
        (folder / TXT_ARRAY).write_bytes(b"half")
    current = publish_outputs(_sources(tmp_path / "1"), str(dest), run_id="r1")
    names = {p.name for p in (dest / SETS_DIR).iterdir()}
    assert under_way.name in names and killed.name not in names
    assert {s.split("/")[1] for s in current["history"]} <= names


def test_gcs_publish_that_loses_the_race_is_refused_and_removed(bucket, preconditions, tmp_path,
                                                                 monkeypatch):
    """Two publishers on one gs:// prefix: B reads the pointer's generation, A publishes whole
    while B uploads; B's pointer write carries if_generation_match of what it read, so GCS
    refuses it (412): B removes its set and says so; A's set stays current."""
    uri = f"gs://{BUCKET}/embeddings/race"
    first = publish_outputs(_sources(tmp_path / "0"), uri, run_id="first")
    won = {}
    _during_first(monkeypatch, Blob, "upload_from_filename", lambda: won.update(
        publish_outputs(_sources(tmp_path / "a"), uri, run_id="a")))
    with pytest.raises(PublishError, match=r"another run published to gs://.* while this one "
                                           r"was publishing \(it now names .*-a-"):
        publish_outputs(_sources(tmp_path / "b", with_images=False), uri, run_id="b")
    assert json.loads(bucket.blob(f"embeddings/race/{MANIFEST}").download_as_bytes()) == won
    assert {n.split("/")[1] for n in _blobs(bucket, "embeddings/race/") if "/" in n} == \
        {m["set"].split("/")[1] for m in (first, won)}  # B's set removed
    assert verify_outputs(uri).ok


def test_gcs_pointer_and_set_files_are_never_overwritten(bucket, preconditions, tmp_path):
    """The requests themselves: the set's files are created with if_generation_match=0 and the
    pointer with the generation read before (0 for the first publish), so a write that finds
    another there fails instead of overwriting."""
    from google.api_core.exceptions import PreconditionFailed

    uri = f"gs://{BUCKET}/embeddings/cas"
    manifest = publish_outputs(_sources(tmp_path / "0"), uri, run_id="r0")
    pointer = bucket.get_blob(f"embeddings/cas/{MANIFEST}")
    with pytest.raises(PreconditionFailed):  # what a second first publish would send
        bucket.blob(f"embeddings/cas/{MANIFEST}").upload_from_string(b"{}", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob(f"embeddings/cas/{manifest['set']}{TXT_ARRAY}").upload_from_string(
            b"x", if_generation_match=0)
    second = publish_outputs(_sources(tmp_path / "1"), uri, run_id="r1")
    assert bucket.get_blob(f"embeddings/cas/{MANIFEST}").generation != pointer.generation
    with pytest.raises(PreconditionFailed):  # the generation r1 replaced is stale now
        bucket.blob(f"embeddings/cas/{MANIFEST}").upload_from_string(
            b"{}", if_generation_match=pointer.generation)
    assert resolve(uri).manifest == second


# ----------------------------------------------------------------------------- what a reader sees


def test_manifest_records_format_uri_time_and_the_counts_present(tmp_path):
    import datetime as dt

    text, image, fused, _ = _sources(tmp_path)
    dest = str(tmp_path / "published")
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    manifest = publish_outputs([image, fused], dest)  # no text group, no run id
    published_at = dt.datetime.fromisoformat(manifest["published_at"])
    assert published_at.utcoffset() == dt.timedelta(0)  # UTC, whole seconds
    assert before <= published_at <= dt.datetime.now(dt.timezone.utc)
    assert manifest["published_at"].endswith("+00:00") and "." not in manifest["published_at"]
    assert manifest["format"] == publish_mod.MANIFEST_FORMAT == 2
    assert manifest["publish_uri"] == dest and manifest["run_id"] == ""
    assert "-run-" in manifest["set"]  # no run id: the set is named after "run"
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


def test_manifest_uri_is_beside_the_sets():
    assert publish_mod.manifest_uri("gs://b/embeddings/") == "gs://b/embeddings/manifest.json"
    assert publish_mod.manifest_uri("gs://b/embeddings") == "gs://b/embeddings/manifest.json"
    assert publish_mod.manifest_uri("/data/out/") == "/data/out/manifest.json"
    assert publish_mod.manifest_uri("gs://b/v2/X") == "gs://b/v2/X/manifest.json"  # verbatim


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
    assert names == sorted([prefix + MANIFEST, *(prefix + manifest["set"] + name
                                                 for name in [*manifest["files"], MANIFEST])])


def test_gcs_publish_requests(bucket, tmp_path, monkeypatch):
    """What goes over the wire: the set's uploads never overwrite (ifGenerationMatch=0, which
    also makes them safe to retry) and carry a crc32c the server checks; the pointer is one
    upload conditioned on the generation it replaces, readable JSON with its content type."""
    import requests

    real_request, uploads = requests.Session.request, []

    def request(self, method, url, *args, **kwargs):
        if "/upload/storage/v1/" in url:
            body = kwargs.get("data") or b""
            meta = json.loads(body.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0])
            uploads.append((url, meta))
        return real_request(self, method, url, *args, **kwargs)

    uri = f"gs://{BUCKET}/embeddings/wire"
    first = publish_outputs(_sources(tmp_path / "a"), uri, run_id="run-1")
    generation = bucket.get_blob(f"embeddings/wire/{MANIFEST}").generation
    monkeypatch.setattr(requests.Session, "request", request)
    manifest = publish_outputs(_sources(tmp_path / "b"), uri, run_id="run-2")

    in_set = [(url, meta) for url, meta in uploads
              if meta["name"].startswith(f"embeddings/wire/{manifest['set']}")]
    assert sorted(meta["name"].rsplit("/", 1)[1] for _, meta in in_set) == sorted(
        [*manifest["files"], MANIFEST])
    for url, meta in in_set:
        assert "ifGenerationMatch=0" in url, url
        assert meta.get("crc32c") or meta["name"].endswith(MANIFEST), meta
    (pointer_url,) = [url for url, meta in uploads if meta["name"] == f"embeddings/wire/{MANIFEST}"]
    assert f"ifGenerationMatch={generation}" in pointer_url
    blob = bucket.get_blob(f"embeddings/wire/{MANIFEST}")
    assert blob.content_type == "application/json"
    own = bucket.get_blob(f"embeddings/wire/{manifest['set']}{MANIFEST}")
    assert own.content_type == "application/json"  # the set's manifest reads as JSON too
    assert blob.download_as_bytes().decode() == json.dumps(manifest, indent=2,
                                                           sort_keys=True) + "\n"
    assert manifest["history"] == [manifest["set"], first["set"]]


# ----------------------------------------------------------------------- names, logs, messages


@pytest.mark.parametrize("run_id, part", [
    ("  Nightly run #3!", "Nightly-run-3"),       # other characters become one '-', ends trimmed
    ("X-ray_2", "X-ray_2"),
    ("a" * 60, "a" * 48),                          # at most 48 characters of the run id
    ("///", "run"),                                # nothing left: "run"
])
def test_set_names_carry_the_utc_time_and_a_readable_run_id(tmp_path, monkeypatch, run_id, part):
    import datetime as dt
    import re
    import time

    monkeypatch.setenv("TZ", "America/New_York")  # a machine whose local time is not UTC
    time.tzset()
    try:
        before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
        manifest = publish_outputs(_sources(tmp_path, with_images=False),
                                   str(tmp_path / "dest"), run_id=run_id)
        after = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    match = re.fullmatch(rf"{SETS_DIR}/(\d{{8}}T\d{{6}}Z)-(.+)-([0-9a-f]{{8}})/", manifest["set"])
    assert match, manifest["set"]
    assert before <= dt.datetime.strptime(match[1], "%Y%m%dT%H%M%SZ") <= after
    assert match[2] == part


def test_publish_logs_what_it_published(tmp_path, caplog):
    sources = _sources(tmp_path, with_images=False)
    dest = str(tmp_path / "dest")
    with caplog.at_level("INFO", logger=publish_mod.__name__):
        manifest = publish_outputs(sources, dest, run_id="r")
    size = sum(f["size"] for f in manifest["files"].values())
    assert [r.getMessage() for r in caplog.records if r.name == publish_mod.__name__] == [
        f"published {len(manifest['files'])} files ({size:,d} bytes) to {dest} as "
        f"{manifest['set'].rstrip('/')}"]


def test_publish_creates_missing_parent_folders(tmp_path):
    dest = tmp_path / "a" / "b" / "published"
    manifest = publish_outputs(_sources(tmp_path, with_images=False), str(dest))
    assert resolve(str(dest)).manifest == manifest


def _refusal_tail() -> str:
    return "(publish to one prefix from one run at a time; docs/operations.md, Publishing)"


def _started_from(source: Path, previous_uri: str) -> None:
    meta_path = source / TXT_META
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()),
                                     "previous_uri": previous_uri}))


def test_refusals_name_the_prefix_the_sets_and_where_to_read_more(tmp_path, monkeypatch):
    dest = tmp_path / "published"
    s0 = publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="s0")
    s1 = publish_outputs(_sources(tmp_path / "1"), str(dest), run_id="s1")
    late = _sources(tmp_path / "late")
    _started_from(late[0], str(dest / s0["set"]))
    with pytest.raises(PublishError) as exc:
        publish_outputs(late, str(dest), run_id="late")
    assert str(exc.value) == (
        f"{dest} now names set {dest / s1['set'].rstrip('/')}, not {dest / s0['set']} that this "
        "run started from: another run published meanwhile; not replacing a newer set with one "
        f"made from an older one {_refusal_tail()}")

    won = {}
    _during_first(monkeypatch, publish_mod.shutil, "copyfile", lambda: won.update(
        publish_outputs(_sources(tmp_path / "a"), str(dest), run_id="a")))
    with pytest.raises(PublishError) as exc:
        publish_outputs(_sources(tmp_path / "b"), str(dest), run_id="b")
    assert str(exc.value) == (
        f"another run published to {dest} while this one was publishing (it now names "
        f"{dest / won['set'].rstrip('/')}); this run's set was removed, the other's stays "
        f"current {_refusal_tail()}")


def test_a_run_from_another_prefix_or_without_text_publishes_over_a_current_set(tmp_path):
    """Only a run made from a set of this prefix is checked against its pointer: one that read
    its previous set elsewhere, or one without a text step (nothing recorded), publishes."""
    dest, other = tmp_path / "published", tmp_path / "other"
    elsewhere = publish_outputs(_sources(tmp_path / "e"), str(other), run_id="e")
    publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="s0")
    moved = _sources(tmp_path / "moved")
    _started_from(moved[0], str(other / elsewhere["set"]))
    assert publish_outputs(moved, str(dest), run_id="moved")["run_id"] == "moved"
    _text, *others = _sources(tmp_path / "no-text")
    assert publish_outputs(others, str(dest), run_id="images")["run_id"] == "images"


def test_a_flat_set_appearing_while_publishing_is_a_lost_race(tmp_path, monkeypatch):
    """An older version publishes flat (files beside manifest.json, no set folder) to a new
    prefix while this run copies its set: the pointer is not overwritten."""
    dest = tmp_path / "published"
    flat = make_output_set(tmp_path / "flat", with_images=False)

    def publish_flat():
        dest.mkdir(parents=True, exist_ok=True)
        for f in flat.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
        (dest / MANIFEST).write_text(json.dumps({"format": 1, "files": {
            f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in flat.iterdir()}}))

    _during_first(monkeypatch, publish_mod.shutil, "copyfile", publish_flat)
    with pytest.raises(PublishError, match="another run published"):
        publish_outputs(_sources(tmp_path / "b"), str(dest), run_id="b")
    assert json.loads((dest / MANIFEST).read_text())["format"] == 1
    assert not any((dest / SETS_DIR).iterdir())


# ----------------------------------------------------------------------------- upgrades, pruning


def _flat_manifest(files: dict[str, bytes]) -> dict:
    import hashlib

    return {"format": 1, "run_id": "flat", "files": {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()}}


def test_a_flat_prefix_of_an_older_version_is_replaced_by_a_set(tmp_path):
    """A prefix an older version published flat: the new set becomes current and the flat
    files go; a name that is no plain file name of the prefix (a path) is never deleted, and a
    listed file already gone is no error."""
    dest = tmp_path / "published"
    dest.mkdir()
    flat = {TXT_ARRAY: b"old vectors", TXT_ITEMS: b"old ids", QA_REPORT: b"<html></html>"}
    for name, data in flat.items():
        (dest / name).write_bytes(data)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the prefix's")
    listed = {**flat, "gone.bin": b"x", "../outside.txt": b"not the prefix's", MANIFEST: b"{}"}
    (dest / MANIFEST).write_text(json.dumps(_flat_manifest(listed)))
    manifest = publish_outputs(_sources(tmp_path, with_images=False), str(dest), run_id="new")
    assert {p.name for p in dest.iterdir()} == {MANIFEST, SETS_DIR, LOCK_FILE}
    assert outside.read_text() == "not the prefix's"
    assert resolve(str(dest)).manifest == manifest and manifest["history"] == [manifest["set"]]


def test_a_pointer_without_history_keeps_the_set_it_named(tmp_path):
    """A pointer written before pointers carried a history: the set it named is kept as the
    one before the new set."""
    dest = tmp_path / "published"
    first = publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="r0")
    (dest / MANIFEST).write_text(json.dumps({k: v for k, v in first.items() if k != "history"}))
    second = publish_outputs(_sources(tmp_path / "1"), str(dest), run_id="r1")
    assert second["history"] == [second["set"], first["set"]]
    assert verify_outputs(str(dest / first["set"])).ok


def test_leftovers_are_removed_only_when_a_day_older_than_the_new_set(tmp_path):
    """A set folder no pointer named is removed when its time is more than a day before the
    new set's (to the second); a younger one may be a publish under way."""
    import datetime as dt

    dest = tmp_path / "published"
    publish_outputs(_sources(tmp_path / "0"), str(dest), run_id="r0")
    day_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    stamps = {(day_ago + dt.timedelta(seconds=s)).strftime("%Y%m%dT%H%M%SZ")
              for s in range(-3, 40)}
    stamps.add((day_ago + dt.timedelta(hours=12)).strftime("%Y%m%dT%H%M%SZ"))
    for stamp in stamps:
        (dest / SETS_DIR / f"{stamp}-left-00000000").mkdir()
    current = publish_outputs(_sources(tmp_path / "1"), str(dest), run_id="r1")
    new = dt.datetime.strptime(current["set"].split("/")[1][:16], "%Y%m%dT%H%M%SZ")
    names = {p.name for p in (dest / SETS_DIR).iterdir()}
    for stamp in stamps:
        kept = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ") >= new - dt.timedelta(days=1)
        assert (f"{stamp}-left-00000000" in names) is kept, (stamp, current["set"])
    assert any(n.startswith(new.strftime("%Y%m%dT%H%M%SZ")) for n in names)


# ----------------------------------------------------------------------------- gs:// protocol


def test_gcs_run_made_from_an_older_set_is_refused(bucket, tmp_path):
    uri = f"gs://{BUCKET}/embeddings/older"
    s0 = publish_outputs(_sources(tmp_path / "0"), uri, run_id="s0")
    s1 = publish_outputs(_sources(tmp_path / "1"), uri, run_id="s1")
    late = _sources(tmp_path / "late")
    _started_from(late[0], f"{uri}/{s0['set']}")  # as recorded: with its trailing '/'
    with pytest.raises(PublishError) as exc:
        publish_outputs(late, uri, run_id="late")
    assert str(exc.value).startswith(
        f"{uri} now names set {uri}/{s1['set'].rstrip('/')}, not {uri}/{s0['set']} that")
    assert resolve(uri).manifest == s1
    _started_from(late[0], f"{uri}/{s1['set']}")  # made from the current set: published
    assert publish_outputs(late, uri, run_id="late")["run_id"] == "late"


def test_gcs_flat_prefix_is_replaced_and_old_sets_pruned(bucket, tmp_path):
    """gs:// as locally: the flat files of an older version go, the sets beyond KEEP_SETS and
    a leftover older than a day are removed, the kept ones stay whole."""
    prefix = "embeddings/prune/"
    uri = f"gs://{BUCKET}/{prefix}".rstrip("/")
    flat = {TXT_ARRAY: b"old vectors", TXT_ITEMS: b"old ids"}
    for name, data in flat.items():
        bucket.blob(prefix + name).upload_from_string(data)
    bucket.blob(prefix + MANIFEST).upload_from_string(
        json.dumps(_flat_manifest({**flat, "sub/keep.bin": b"k"})))
    bucket.blob(prefix + "sub/keep.bin").upload_from_string(b"k")
    leftover = f"{prefix}{SETS_DIR}/20200101T000000Z-killed-00000000/{TXT_ARRAY}"
    bucket.blob(leftover).upload_from_string(b"half")
    published = [publish_outputs(_sources(tmp_path / str(i), with_images=False), uri,
                                 run_id=f"r{i}") for i in range(KEEP_SETS + 1)]
    assert _blobs(bucket, prefix) == sorted(
        [MANIFEST, "sub/keep.bin", *(f"{m['set']}{n}" for m in published[1:]
                                     for n in [*m["files"], MANIFEST])])
    assert resolve(uri).manifest == published[-1]


def test_gcs_leftovers_that_cannot_be_deleted_are_logged(bucket, tmp_path, monkeypatch, caplog):
    """A failed publish removes its set; a file it cannot delete is named in a warning and
    the publish's own error is what the caller sees."""
    uri = f"gs://{BUCKET}/embeddings/undeletable"
    real_upload, real_delete = Blob.upload_from_filename, Blob.delete

    def upload(self, filename, **kw):
        if self.name.endswith(TXT_ITEMS):
            raise ConnectionError("network lost")
        return real_upload(self, filename, **kw)

    def delete(self, *args, **kwargs):
        if self.name.endswith(TXT_ARRAY):
            raise PermissionError("403 no delete permission")
        return real_delete(self, *args, **kwargs)

    monkeypatch.setattr(Blob, "upload_from_filename", upload)
    monkeypatch.setattr(Blob, "delete", delete)
    with caplog.at_level("WARNING", logger=publish_mod.__name__), \
            pytest.raises(ConnectionError, match="network lost"):
        publish_outputs(_sources(tmp_path, with_images=False), uri, run_id="r")
    (left,) = [n for n in _blobs(bucket, "embeddings/undeletable/")]
    assert left.endswith(TXT_ARRAY)
    assert [r.getMessage() for r in caplog.records if r.name == publish_mod.__name__] == [
        f"could not delete embeddings/undeletable/{left}: 403 no delete permission"]


def test_files_beside_the_pointer_of_a_sets_prefix_are_left_alone(tmp_path):
    """Only a prefix published flat has its files beside the pointer removed: in a prefix of
    sets, a file there that happens to share a name with the set's files is not the set's."""
    dest = tmp_path / "published"
    publish_outputs(_sources(tmp_path / "0", with_images=False), str(dest), run_id="r0")
    (dest / QA_REPORT).write_text("the operator's copy")
    (dest / TXT_ARRAY).write_bytes(b"not a published file")
    publish_outputs(_sources(tmp_path / "1", with_images=False), str(dest), run_id="r1")
    assert (dest / QA_REPORT).read_text() == "the operator's copy"
    assert (dest / TXT_ARRAY).read_bytes() == b"not a published file"
