import os
import json

import numpy as np
import pytest

from item_embeddings import storage
from item_embeddings.outputs import META_FILES


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
    (dest / "txt_meta.json").write_text('{"count": 1}')  # an earlier run's meta
    for name in ("txt.npy", "txt_items.parquet", "txt_meta.json"):
        (src / name).write_text(name)
    order = []
    real = storage.atomic_path

    def spy(path):
        order.append((path.name, (dest / "txt_meta.json").exists()))
        return real(path)

    monkeypatch.setattr(storage, "atomic_path", spy)
    placed = storage.place_files(sorted(src.iterdir()), dest, META_FILES)
    assert [name for name, _ in order][-1] == "txt_meta.json"
    assert not any(meta_present for _, meta_present in order)  # old meta gone before data moved
    assert set(placed) == {"txt.npy", "txt_items.parquet", "txt_meta.json"}
    assert (dest / "txt_meta.json").read_text() == "txt_meta.json"
    # copies, not links: writing into a placed file leaves its source as it was
    for name in placed:
        assert os.stat(dest / name).st_ino != os.stat(src / name).st_ino
    with open(dest / "txt.npy", "r+") as fh:
        fh.write("edited")
    assert (src / "txt.npy").read_text() == "txt.npy"


def test_outputs_on_gcsfuse_are_staged_locally_and_inputs_copied(tmp_path, monkeypatch):
    mount = tmp_path / "gcs"
    monkeypatch.setattr(storage, "FUSE_MOUNTS", (f"{mount}/",))
    artifact = mount / "bucket" / "run" / "task" / "out"
    with storage.staged_output_dir(artifact, META_FILES) as out:
        assert not str(out).startswith(str(mount))
        np.save(out / "fused.npy", np.ones((2, 3), np.float32))
        (out / "fusion_config.json").write_text("{}")
        assert not artifact.exists()  # nothing reaches the mount before success
    assert sorted(p.name for p in artifact.iterdir()) == ["fused.npy", "fusion_config.json"]
    with storage.local_input_dir(artifact) as local:
        assert not str(local).startswith(str(mount))
        np.testing.assert_array_equal(np.load(local / "fused.npy"), np.ones((2, 3)))
    plain = tmp_path / "plain"
    with storage.staged_output_dir(plain, META_FILES) as out:
        assert out == plain
    with pytest.raises(ValueError):
        with storage.staged_output_dir(mount / "failed", META_FILES) as out:
            (out / "fused.npy").write_text("partial")
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
        (src / "txt_meta.json").write_text("{}")
        storage.place_files([src / "txt_meta.json"], tmp_path / "placed", META_FILES)
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "a.npy", tmp_path / "placed" / "txt_meta.json"):
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
    assert storage.list_files(uri) == ["a.json", "b.npy"]
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
    assert storage.record_problems(files, {"a.npy": "x"}, "m.json") == [
        "m.json: 'files' is not a mapping of file name to size and sha256"]
