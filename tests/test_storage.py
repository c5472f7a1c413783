import os
import json

import numpy as np
import pytest

from item_embeddings import storage
from item_embeddings.outputs import (FUSED_ARRAY, FUSION_CONFIG, META_FILES, TXT_ARRAY, TXT_ITEMS,
                                     TXT_META)


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
    placed = storage.place_files(sorted(src.iterdir()), dest, META_FILES, link=True)
    assert [name for name, _ in order][-1] == TXT_META
    assert not any(meta_present for _, meta_present in order)  # old meta gone before data moved
    assert set(placed) == {TXT_ARRAY, TXT_ITEMS, TXT_META}
    assert (dest / TXT_META).read_text() == TXT_META


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
