import json
import os
from pathlib import Path

import numpy as np
import pytest

from item_embeddings import storage
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSION_CONFIG,
    META_FILES,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "a.json"
    storage.write_json_atomic(dest, {"v": 1})
    with pytest.raises(RuntimeError):
        with storage.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(dest.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_place_files_puts_the_meta_last_and_replaces_an_old_one(tmp_path, monkeypatch):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (dest / TXT_META).write_text('{"count": 1}')  # an earlier run's meta
    for name in (TXT_ARRAY, TXT_ITEMS, TXT_META):
        (src / name).write_text(name)
    order = []
    real = storage.atomic_path

    def spy(path):
        order.append((path.name, (dest / TXT_META).exists()))
        return real(path)

    monkeypatch.setattr(storage, "atomic_path", spy)
    placed = storage.place_files(sorted(src.iterdir()), dest, META_FILES)
    assert [name for name, _ in order][-1] == TXT_META
    assert not any(meta_present for _, meta_present in order)  # old meta gone before data moved
    assert placed == {name: dest / name for name in (TXT_ARRAY, TXT_ITEMS, TXT_META)}
    assert (dest / TXT_META).read_text() == TXT_META
    # copies, not links: writing into a placed file leaves its source as it was
    for name in placed:
        assert os.stat(dest / name).st_ino != os.stat(src / name).st_ino
    with open(dest / TXT_ARRAY, "r+") as fh:
        fh.write("edited")
    assert (src / TXT_ARRAY).read_text() == TXT_ARRAY


def test_outputs_on_gcsfuse_are_staged_locally_and_inputs_copied(tmp_path, monkeypatch):
    mount = tmp_path / "gcs"
    monkeypatch.setattr(storage, "FUSE_MOUNTS", (f"{mount}/",))
    artifact = mount / "bucket" / "run" / "task" / "out"
    with storage.staged_output_dir(artifact, META_FILES) as out:
        assert not str(out).startswith(str(mount))
        np.save(out / FUSED_ARRAY, np.ones((2, 3), np.float32))
        (out / FUSION_CONFIG).write_text("{}")
        assert not artifact.exists()  # nothing reaches the mount before success
    assert sorted(p.name for p in artifact.iterdir()) == [FUSED_ARRAY, FUSION_CONFIG]
    with storage.local_input_dir(artifact) as local:
        assert not str(local).startswith(str(mount))
        np.testing.assert_array_equal(np.load(local / FUSED_ARRAY), np.ones((2, 3)))
    plain = tmp_path / "plain"
    with storage.staged_output_dir(plain, META_FILES) as out:
        assert out == plain
    with pytest.raises(ValueError):
        with storage.staged_output_dir(mount / "failed", META_FILES) as out:
            (out / FUSED_ARRAY).write_text("partial")
            raise ValueError("step failed")
    assert not (mount / "failed").exists()


def test_written_files_are_readable_like_ordinary_files(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        storage.write_json_atomic(tmp_path / "a.json", {"v": 1})
        with storage.atomic_npy(tmp_path / "a.npy", (2, 3)) as array:
            array[:] = 1
        src = tmp_path / "src"
        src.mkdir()
        (src / TXT_META).write_text("{}")
        storage.place_files([src / TXT_META], tmp_path / "placed", META_FILES)
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "a.npy", tmp_path / "placed" / TXT_META):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_set_is_read_the_same_way_wherever_it_is(where, tmp_path, request):
    """read_bytes, list_files and local_folder on a local folder and on a gs:// prefix (the
    GCS emulator): the files directly in the folder, not a sub-folder's, nor a neighbour's that
    shares the prefix."""
    files = {"a.json": b'{"x": 1}', "b.npy": b"\x93NUMPY", "sub/c.txt": b"nested"}
    if where == "local":
        root = tmp_path / "set"
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        (tmp_path / "set-2").mkdir()
        (tmp_path / "set-2" / "d.txt").write_bytes(b"neighbour")
        uri = str(root)
    else:
        import uuid

        bucket = request.getfixturevalue("gcs").create_bucket(f"read-{uuid.uuid4().hex[:8]}")
        for name, data in files.items():
            bucket.blob(f"sets/set/{name}").upload_from_string(data)
        bucket.blob("sets/set-2/d.txt").upload_from_string(b"neighbour")
        uri = f"gs://{bucket.name}/sets/set/"
        # before any read: pyarrow's C++ client talks to the emulator only (_gcs_endpoint)
        host = os.environ["STORAGE_EMULATOR_HOST"].split("://")[1]
        assert _gcs_endpoint(storage.arrow_filesystem(uri)[0]) == (host, True)
    assert storage.list_files(uri) == ["a.json", "b.npy"]
    assert storage.list_files(f"{uri.rstrip('/')}-missing") == []  # no folder: no files
    assert storage.read_bytes(f"{uri.rstrip('/')}/a.json") == b'{"x": 1}'
    assert storage.read_bytes(f"{uri.rstrip('/')}/missing.json") is None
    with storage.local_folder(uri, ["b.npy", "missing.json"]) as folder:
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == (
            ["a.json", "b.npy"] if where == "local" else ["b.npy"])  # local: the folder itself
        assert (folder / "b.npy").read_bytes() == b"\x93NUMPY"
    if where == "gs":
        assert not folder.exists()  # the temporary copy is removed
        assert storage.gcs_prefix(uri) == (bucket.name, "sets/set/")
        assert storage.gcs_prefix(f"gs://{bucket.name}") == (bucket.name, "")


def test_record_problems_names_each_file_that_is_not_as_recorded(tmp_path):
    for name, data in {"a.npy": b"aaaa", "b.npy": b"bbbb", "c.npy": b"cc"}.items():
        (tmp_path / name).write_bytes(data)
    records = {name: storage.file_record(tmp_path / name) for name in ("a.npy", "b.npy", "c.npy")}
    files = {p.name: p for p in tmp_path.iterdir()}
    assert storage.record_problems(files, records, "m.json") == []
    (tmp_path / "b.npy").write_bytes(b"bbbB")          # same size, other bytes
    (tmp_path / "c.npy").write_bytes(b"ccc")           # other size
    del files["a.npy"]                                  # missing
    assert storage.record_problems(files, records, "m.json", required=["d.npy"]) == [
        "m.json records no size and sha256 of d.npy: it cannot be verified",
        "m.json lists a.npy but it is missing",
        "b.npy: content does not match m.json (same size, sha256 differs): changed after it was "
        "written, or from another run",
        "c.npy: content does not match m.json (size 3, recorded 2): changed after it was "
        "written, or from another run"]
    # a file as recorded does not end the check: the ones after it are still compared
    (tmp_path / "b.npy").write_bytes(b"bbbb")
    files["a.npy"] = tmp_path / "a.npy"
    assert storage.record_problems(files, records, "m.json") == [
        "c.npy: content does not match m.json (size 3, recorded 2): changed after it was "
        "written, or from another run"]
    assert storage.record_problems(files, {"a.npy": "x"}, "m.json") == [
        "m.json: 'files' is not a mapping of file name to size and sha256"]


# ----------------------------------------------------------------------------- gs:// URIs


def test_gcs_uris_split_into_bucket_and_object_path():
    assert storage.is_gcs_uri("gs://b/x") and not storage.is_gcs_uri("/data/gs://b")
    assert storage.split_gcs_uri("gs://bucket/models/clip/") == ("bucket", "models/clip/")
    assert storage.gcs_prefix("gs://bucket/v2/X") == ("bucket", "v2/X/")  # names kept verbatim
    assert storage.gcs_prefix("gs://bucket//X//") == ("bucket", "X/")
    with pytest.raises(ValueError) as exc:
        storage.split_gcs_uri("/data/items.parquet")
    assert str(exc.value) == "not a gs:// URI: '/data/items.parquet'"
    with pytest.raises(ValueError) as exc:
        storage.split_gcs_uri("gs:///items.parquet")
    assert str(exc.value) == "gs:// URI without a bucket: 'gs:///items.parquet'"


def test_gcs_client_talks_to_the_emulator_without_credentials(gcs, monkeypatch):
    # Anonymous (no credentials lookup, which would try the metadata server): the bucket
    # operations below work against the emulator as they do against Cloud Storage.
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    client = storage.gcs_client()
    assert client.project == "local"
    client.create_bucket("client-check").blob("a.txt").upload_from_string(b"x")
    assert [b.name for b in client.list_blobs("client-check")] == ["a.txt"]
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project")
    assert storage.gcs_client().project == "my-project"


def _gcs_endpoint(fs) -> tuple[str, bool]:
    """Where a pyarrow GcsFileSystem sends its requests, and whether anonymously. Checked before
    any read: pyarrow's C++ client is out of the network guard's reach, so a test must not let
    it talk to anything but the emulator."""
    options = fs.__reduce__()[1][0]
    return options["endpoint_override"], options["anonymous"]


def test_arrow_filesystem_reads_local_paths_and_gcs_objects(gcs, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    monkeypatch.setenv("HOME", str(tmp_path))
    fs, path = storage.arrow_filesystem("~/items.parquet")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "items.parquet")
    table = pa.table({"asin": ["B1", "B2"]})
    pq.write_table(table, tmp_path / "items.parquet")
    gcs.create_bucket("arrow-check").blob("data/items.parquet").upload_from_filename(
        str(tmp_path / "items.parquet"))
    for uri, want in [("gs://arrow-check/data/items.parquet", "arrow-check/data/items.parquet"),
                      ("gs://arrow-check/data/", "arrow-check/data"),
                      ("gs://arrow-check/BOX/", "arrow-check/BOX")]:  # names kept verbatim
        fs, path = storage.arrow_filesystem(uri)
        assert isinstance(fs, pafs.GcsFileSystem) and path == want
    host = os.environ["STORAGE_EMULATOR_HOST"].split("://")[1]
    fs, path = storage.arrow_filesystem("gs://arrow-check/data/items.parquet")
    assert _gcs_endpoint(fs) == (host, True)
    assert pq.read_table(path, filesystem=fs).equals(table)  # through the emulator
    # An emulator address without a scheme is plain http, as the storage client takes it.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    fs, path = storage.arrow_filesystem("gs://arrow-check/data/items.parquet")
    assert _gcs_endpoint(fs) == (host, True)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # Without the emulator: Cloud Storage with the machine's credentials (looked up on first
    # use, so nothing is contacted here).
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    fs, path = storage.arrow_filesystem("gs://arrow-check/data/items.parquet")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "arrow-check/data/items.parquet"
    assert _gcs_endpoint(fs) == ("", False)


def _upload(bucket, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        bucket.blob(name).upload_from_string(data)


def test_download_gcs_prefix_copies_the_folder_and_nothing_beside_it(gcs, tmp_path):
    bucket = gcs.create_bucket("folders")
    _upload(bucket, {"models/clip-X/config.json": b"{}",
                     "models/clip-X/weights/fp32/w.bin": b"w" * 10,
                     "models/clip-X/": b"",  # the folder placeholder some tools write
                     "models/clip-X-v2/config.json": b"other model",
                     "models/text/config.json": b"{}"})
    cache = tmp_path / "cache" / "models"  # created on the way
    dest = storage.download_gcs_prefix("gs://folders/models/clip-X", cache / "clip")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["config.json", "weights/fp32/w.bin"]
    assert (dest / "weights" / "fp32" / "w.bin").read_bytes() == b"w" * 10
    # a second model beside it (the cache folder exists now)
    storage.download_gcs_prefix("gs://folders/models/text/", cache / "text")
    assert sorted(p.name for p in cache.iterdir()) == ["clip", "text"]  # no work folder left
    with pytest.raises(FileNotFoundError) as exc:
        storage.download_gcs_prefix("gs://folders/models/none", tmp_path / "none")
    assert str(exc.value) == "nothing found under gs://folders/models/none"


def test_an_interrupted_folder_download_leaves_no_folder(gcs, tmp_path, monkeypatch):
    from google.cloud.storage import Blob

    bucket = gcs.create_bucket("interrupted")
    _upload(bucket, {"m/a.bin": b"a", "m/b.bin": b"b"})
    real, calls = Blob.download_to_filename, []

    def download(self, filename, *args, **kwargs):
        # Downloaded beside the destination in a hidden folder, then renamed: the rename is
        # atomic (same filesystem) and a lister of the cache never sees a half model.
        calls.append(Path(filename).relative_to(tmp_path / "cache").parts[0])
        if len(calls) == 2:
            raise ConnectionError("connection reset")
        return real(self, filename, *args, **kwargs)

    monkeypatch.setattr(Blob, "download_to_filename", download)
    with pytest.raises(ConnectionError):
        storage.download_gcs_prefix("gs://interrupted/m", tmp_path / "cache" / "m")
    # Never a half folder that a later run would take for a cached model.
    assert list((tmp_path / "cache").iterdir()) == []
    assert calls[0] == calls[1] and calls[0].startswith(".m.")


def _logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "item_embeddings.storage"]


def test_cached_gcs_copy_downloads_once_into_the_cache(gcs, tmp_path, monkeypatch, caplog):
    import hashlib
    import logging

    monkeypatch.setenv("ITEM_EMBEDDINGS_CACHE", str(tmp_path / "cache"))
    bucket = gcs.create_bucket("cached")
    _upload(bucket, {"ckpt/tiny.pt": b"weights", "cfg/model-X/config.json": b"{}"})
    uri = "gs://cached/ckpt/tiny.pt"
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with caplog.at_level(logging.INFO, logger="item_embeddings.storage"):
        path = storage.cached_gcs_copy(uri, "image_checkpoints")
    assert path == tmp_path / "cache" / "image_checkpoints" / key / "tiny.pt"
    assert path.read_bytes() == b"weights"
    assert _logged(caplog) == [f"downloading {uri} to {path}"]
    bucket.blob("ckpt/tiny.pt").delete()  # a second call must not ask the bucket again
    caplog.clear()
    assert storage.cached_gcs_copy(uri, "image_checkpoints") == path and not _logged(caplog)
    with pytest.raises(FileNotFoundError) as exc:
        storage.cached_gcs_copy("gs://cached/ckpt/missing.pt", "image_checkpoints")
    assert str(exc.value) == "image_checkpoints not found: gs://cached/ckpt/missing.pt"

    folder = "gs://cached/cfg/model-X/"  # a folder: the same cache entry with or without "/"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="item_embeddings.storage"):
        root = storage.cached_gcs_copy(folder, "models", folder=True)
    key = hashlib.sha256(folder.rstrip("/").encode()).hexdigest()[:16]
    assert root == tmp_path / "cache" / "models" / key
    assert (root / "config.json").read_bytes() == b"{}"
    assert _logged(caplog) == [f"downloading {folder} to {root}"]
    bucket.blob("cfg/model-X/config.json").delete()
    assert storage.cached_gcs_copy(folder.rstrip("/"), "models", folder=True) == root


# ----------------------------------------------------------------------------- local files


def test_files_follow_the_umask_also_without_proc(tmp_path, monkeypatch):
    """Where /proc is missing (macOS) the umask is read by setting it; it is restored."""
    real_read_text = storage.Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == "/proc/self/status":
            raise FileNotFoundError(self)
        return real_read_text(self, *args, **kwargs)

    old = os.umask(0o027)
    try:
        storage.write_json_atomic(tmp_path / "with-proc.json", {})
        monkeypatch.setattr(storage.Path, "read_text", read_text)
        storage.write_json_atomic(tmp_path / "without-proc.json", {})
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(old)
    for name in ("with-proc.json", "without-proc.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_json_files_are_indented_sorted_and_end_with_a_newline(tmp_path):
    storage.write_json_atomic(tmp_path / "meta.json", {"b": 1, "a": Path("/data/items")})
    assert (tmp_path / "meta.json").read_text() == '{\n  "a": "/data/items",\n  "b": 1\n}\n'


def test_parquet_files_are_written_whole(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["B1", "B2"], "row": [0, 1]})
    storage.write_parquet_atomic(tmp_path / TXT_ITEMS, table)
    assert pq.read_table(tmp_path / TXT_ITEMS).equals(table)
    assert [p.name for p in tmp_path.iterdir()] == [TXT_ITEMS]


def test_file_record_is_size_and_sha256_of_the_whole_file(tmp_path):
    import hashlib

    data = os.urandom((1 << 20) * 2 + 123)  # over two read chunks
    (tmp_path / TXT_ARRAY).write_bytes(data)
    assert storage.file_record(tmp_path / TXT_ARRAY) == {
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert storage.sha256_file(tmp_path / TXT_ARRAY, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_hashing_streams_the_file(tmp_path):
    """A multi-gigabyte array is hashed in 1 MiB reads, never held whole in memory."""
    import hashlib
    import tracemalloc

    data = os.urandom(16 << 20)
    (tmp_path / TXT_ARRAY).write_bytes(data)
    tracemalloc.start()
    try:
        digest = storage.sha256_file(tmp_path / TXT_ARRAY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(data).hexdigest()
    assert peak < 4 << 20, f"peak {peak:,d} bytes while hashing a 16 MiB file"
