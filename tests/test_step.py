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



def test_a_step_kind_logs_its_settings_and_the_metrics_of_its_meta(tmp_path):
    """A step states once which settings are its run's parameters and which meta keys are its
    metrics; what the run logs is derived from the settings and the meta as written, and the
    component reports the same metrics (StepKind.metrics)."""
    from item_embeddings.step import StepKind
    from item_embeddings.tracking import LocalTracker

    kind = StepKind("demo", artifact="demo_out", meta_file="demo_meta.json",
                    metric_keys=("count", "loss", "wall_time_sec"),
                    logged_params={"model_name": "encoder_name", "batch_size": "batch_size"},
                    nested_metrics=lambda meta: {f"part_{k}": v
                                                 for k, v in meta["parts"].items()})
    tracker = LocalTracker(tmp_path / "runs", "exp")
    settings = {"encoder_name": "m", "batch_size": 8, "items_uri": "x.parquet"}
    with kind.run(tmp_path / "out", settings, run_id="r1", tracker=tracker, shards=2) as run:
        meta = run.finish_step({**settings, "count": 3, "loss": None, "parts": {"a": 0.5}})
    record = json.loads((tmp_path / "runs" / "exp" / "demo-r1.json").read_text())
    assert record["params"] == {"model_name": "m", "batch_size": 8, "shards": 2}
    # a key the step's mode did not produce (None) is left out; wall time is the meta's own
    assert record["metrics"] == {"count": 3.0, "wall_time_sec": meta["wall_time_sec"],
                                 "part_a": 0.5}
    assert kind.metrics(meta) == record["metrics"]
    assert json.loads((tmp_path / "out" / "demo_meta.json").read_text()) == meta
    assert record["artifacts"] == {"demo_out": str(tmp_path / "out")}
