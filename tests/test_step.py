"""The step skeleton: the meta file written last records what the step wrote, with hashes."""

from __future__ import annotations

import json

import numpy as np

from item_embeddings.step import step_run
from item_embeddings.storage import sha256_file, write_json_atomic


def test_finish_records_size_and_sha256_of_the_files_the_step_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.bin").write_bytes(b"left by another step")   # not this step's
    (out / "rewritten.bin").write_bytes(b"old")
    (out / "old_meta.json").write_text("{}")
    with step_run("demo", out, params={}, artifact="demo", run_id="r1") as run:
        np.save(out / "data.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
        (out / "rewritten.bin").write_bytes(b"new content")
        (out / ".tmp-partial").write_bytes(b"temporary of an atomic write")
        (out / "shards").mkdir()
        (out / "shards" / "shard-0.parquet").write_bytes(b"durable shard")
        write_json_atomic(out / "demo_meta.json", {"stale": True})  # replaced by finish
        meta = run.finish("demo_meta.json", {"count": 2}, metrics={})
    assert set(meta["files"]) == {"data.npy", "rewritten.bin"}
    for name, record in meta["files"].items():
        assert record == {"size": (out / name).stat().st_size,
                          "sha256": sha256_file(out / name)}
    assert json.loads((out / "demo_meta.json").read_text()) == meta
    assert meta["count"] == 2 and meta["run_id"] == "r1" and meta["wall_time_sec"] >= 0


def test_meta_keys_of_the_step_are_kept(tmp_path):
    with step_run("demo", tmp_path, params={}, artifact="demo") as run:
        meta = run.finish("m.json", {"count": 0, "embed_dim": 8}, metrics={})
    assert meta["files"] == {} and meta["embed_dim"] == 8 and len(meta["run_id"]) == 12
    assert "item-embeddings" in meta["versions"]

