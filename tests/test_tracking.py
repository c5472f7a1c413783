import json

import pytest

from item_embeddings.tracking import (LocalTracker, NullTracker, VertexTracker, list_local_runs,
                                      make_tracker, run_name, tracked_run)


def test_run_names_are_vertex_safe():
    assert run_name("embed-text", "Job_ABC.123") == "embed-text-job-abc-123"
    assert len(run_name("embed-text", "x" * 300)) <= 128


def test_run_id_from_output_uri():
    from item_embeddings.tracking import run_id_from_output_uri

    assert run_id_from_output_uri(
        "gs://root/123456/item-embeddings-20261125101010/embed-text_-42/text_embeddings") == \
        "item-embeddings-20261125101010"
    assert run_id_from_output_uri(
        "/out/.kfp/item-embeddings-2026-11-25-19-40-12-081839/embed-text/text_embeddings") == \
        "item-embeddings-2026-11-25-19-40-12-081839"
    assert run_id_from_output_uri("x") == ""


def test_local_tracker_records_a_run(tmp_path):
    tracker = LocalTracker(tmp_path, "exp")
    with tracked_run(tracker, "embed-text-1"):
        tracker.log_params({"model_name": "m", "batch_size": 8})
        tracker.log_metrics({"count": 3})
        tracker.log_artifact("text_embeddings", "/x/y")
    record = json.loads((tmp_path / "exp" / "embed-text-1.json").read_text())
    assert record["status"] == "COMPLETE" and record["params"] == {"model_name": "m",
                                                                   "batch_size": 8}
    assert record["metrics"] == {"count": 3.0} and record["artifacts"] == {"text_embeddings": "/x/y"}
    assert record["start_time"] <= record["end_time"]
    assert [r["run_name"] for r in list_local_runs(tmp_path)] == ["embed-text-1"]


def test_failed_run_is_marked(tmp_path):
    tracker = LocalTracker(tmp_path, "exp")
    with pytest.raises(ValueError):
        with tracked_run(tracker, "r"):
            raise ValueError("x")
    assert json.loads((tmp_path / "exp" / "r.json").read_text())["status"] == "FAILED"


def test_backend_selection(tmp_path):
    assert isinstance(make_tracker("auto", experiment="e", tracking_dir=str(tmp_path)), LocalTracker)
    assert isinstance(make_tracker("auto", experiment="e"), NullTracker)
    # An unresolved KFP placeholder (local runner) is not a project.
    assert isinstance(make_tracker("auto", experiment="e",
                                   project="{{$.pipeline_google_cloud_project_id}}",
                                   tracking_dir=str(tmp_path)), LocalTracker)
    assert isinstance(make_tracker("auto", experiment="e", project="p", location="us-central1"),
                      VertexTracker)
    with pytest.raises(ValueError, match="needs a Google Cloud project"):
        make_tracker("vertex", experiment="e")
    with pytest.raises(ValueError, match="needs tracking_dir"):
        make_tracker("local", experiment="e")
    with pytest.raises(ValueError, match="unknown tracking_backend"):
        make_tracker("mlflow", experiment="e")


def test_vertex_tracker_drives_the_aiplatform_api(monkeypatch):
    from google.cloud import aiplatform

    calls = []
    monkeypatch.setattr(aiplatform, "init", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(aiplatform, "start_run",
                        lambda name, resume=False: calls.append(("start_run", name)))
    monkeypatch.setattr(aiplatform, "log_params", lambda p: calls.append(("log_params", p)))
    monkeypatch.setattr(aiplatform, "log_metrics", lambda m: calls.append(("log_metrics", m)))
    monkeypatch.setattr(aiplatform, "end_run", lambda state: calls.append(("end_run", state.name)))
    tracker = make_tracker("vertex", experiment="recsys-dev", project="proj", location="europe-west4")
    with tracked_run(tracker, "embed-text-9"):
        tracker.log_params({"model_name": "m", "batch_size": 128, "shape": [1, 2]})
        tracker.log_metrics({"count": 5})
    assert calls == [
        ("init", {"project": "proj", "location": "europe-west4", "experiment": "recsys-dev"}),
        ("start_run", "embed-text-9"),
        ("log_params", {"model_name": "m", "batch_size": 128, "shape": "[1, 2]"}),
        ("log_metrics", {"count": 5.0}),
        ("end_run", "COMPLETE"),
    ]


def test_vertex_tracker_resumes_the_run_of_a_retried_task(monkeypatch):
    from google.cloud import aiplatform

    existing, calls = set(), []

    def start_run(name, resume=False):
        if name in existing and not resume:
            raise RuntimeError(f"Experiment Run with name {name} already exists")
        existing.add(name)
        calls.append((name, resume))

    monkeypatch.setattr(aiplatform, "init", lambda **kw: None)
    monkeypatch.setattr(aiplatform, "start_run", start_run)
    monkeypatch.setattr(aiplatform, "end_run", lambda state: None)
    for _attempt in range(2):
        tracker = make_tracker("vertex", experiment="e", project="p", location="us-central1")
        with tracked_run(tracker, "embed-image-job-1"):
            pass
    assert calls == [("embed-image-job-1", False), ("embed-image-job-1", True)]
