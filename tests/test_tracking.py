import json
import re

import pytest

from item_embeddings.tracking import (
    LocalTracker,
    NullTracker,
    VertexTracker,
    list_local_runs,
    make_tracker,
    run_name,
    tracked_run,
)


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
    # kfp.local nests the tasks of a loop (the fan-out workers) one folder deeper
    assert run_id_from_output_uri("/o/.kfp/item-embeddings-2026-12-04/for-loop-1-iteration-3/"
                                  "embed-text/text_shards") == "item-embeddings-2026-12-04"


def test_local_tracker_records_a_run(tmp_path):
    tracker = LocalTracker(tmp_path, "exp")
    with tracked_run(tracker, "embed-text-1"):
        tracker.log_params({"model_name": "m", "batch_size": 8})
        tracker.log_metrics({"count": 3})
        tracker.log_artifact("text_embeddings", "/x/y")
    record = json.loads((tmp_path / "exp" / "embed-text-1.json").read_text())
    assert record["status"] == "COMPLETE" and record["params"] == {"model_name": "m",
                                                                   "batch_size": 8}
    assert record["metrics"] == {"count": 3.0}
    assert record["artifacts"] == {"text_embeddings": "/x/y"}
    assert record["start_time"] <= record["end_time"]
    assert [r["run_name"] for r in list_local_runs(tmp_path)] == ["embed-text-1"]


def test_failed_run_is_marked(tmp_path):
    tracker = LocalTracker(tmp_path, "exp")
    with pytest.raises(ValueError):
        with tracked_run(tracker, "r"):
            raise ValueError("x")
    assert json.loads((tmp_path / "exp" / "r.json").read_text())["status"] == "FAILED"


def test_backend_selection(tmp_path):
    assert isinstance(make_tracker("auto", experiment="e", tracking_dir=str(tmp_path)),
                      LocalTracker)
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
    tracker = make_tracker("vertex", experiment="recsys-dev", project="proj",
                           location="europe-west4")
    with tracked_run(tracker, "embed-text-9"):
        tracker.log_params({"model_name": "m", "batch_size": 128, "shape": [1, 2]})
        tracker.log_metrics({"count": 5})
    assert calls == [
        ("init", {"project": "proj", "location": "europe-west4", "experiment": "recsys-dev",
                  "experiment_tensorboard": False}),
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


@pytest.fixture
def metadata_service(monkeypatch):
    """Vertex AI's metadata service in memory, behind the real SDK's GAPIC clients; any
    TensorBoard service call is recorded and refused (none may happen)."""
    import google.auth
    from google.api_core import exceptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform
    from google.cloud.aiplatform_v1.services.metadata_service import MetadataServiceClient
    from google.cloud.aiplatform_v1.services.tensorboard_service import TensorboardServiceClient
    from google.cloud.aiplatform_v1.types import context as gca_context

    from vertex_fake import FakeVertex

    backend = FakeVertex()
    backend.updates, backend.tensorboard_calls, backend.race_on = [], [], set()
    create = backend.create_context

    def create_context(parent, context, context_id, **kw):
        created = create(parent, context, context_id, **kw)
        if context_id in backend.race_on:  # another step created it first
            backend.race_on.discard(context_id)
            raise exceptions.AlreadyExists(f"context {context_id} already exists")
        return created

    def update_context(context, **_):
        backend.updates.append((context.name, dict(context.metadata)))
        backend.contexts[context.name] = gca_context.Context(context)
        return backend.contexts[context.name]

    backend.create_context, backend.update_context = create_context, update_context
    for name in ("get_metadata_store", "get_context", "create_context", "add_context_children",
                 "update_context"):
        monkeypatch.setattr(MetadataServiceClient, name,
                            lambda self, *a, _m=getattr(backend, name), **k: _m(*a, **k))
    for name in dir(TensorboardServiceClient):
        if name.split("_")[0] in ("create", "get", "list", "update", "delete", "write", "read",
                                  "batch") and not name.startswith(("get_transport", "get_mtls")):
            def refuse(self, *a, _n=name, **k):
                backend.tensorboard_calls.append(_n)
                raise RuntimeError(f"unexpected TensorBoard call {_n}")
            monkeypatch.setattr(TensorboardServiceClient, name, refuse)
    monkeypatch.setattr(google.auth, "default",
                        lambda *a, **k: (AnonymousCredentials(), "test-proj"))
    aiplatform.init(api_endpoint="127.0.0.1:9")  # anything else: a closed loopback port
    yield backend
    aiplatform.initializer.global_config._api_endpoint = None


@pytest.mark.parametrize("race", [False, True])
def test_vertex_tracker_through_the_sdk_creates_no_tensorboard(metadata_service, race):
    """The real SDK against an in-memory metadata service: the experiment and its run are
    created and updated, no TensorBoard resource is touched, and an experiment created by a
    step that started at the same moment (AlreadyExists on create) is simply used."""
    if race:
        metadata_service.race_on.add("exp-a")
    tracker = make_tracker("vertex", experiment="exp-a", project="test-proj",
                           location="us-central1")
    with tracked_run(tracker, "embed-text-run-1"):
        tracker.log_params({"items_uri": "gs://b/items/", "batch_size": 64})
        tracker.log_metrics({"count": 40})
    assert metadata_service.tensorboard_calls == []
    store = "projects/test-proj/locations/us-central1/metadataStores/default/contexts"
    assert f"{store}/exp-a" in metadata_service.contexts
    assert metadata_service.children[f"{store}/exp-a"] == [f"{store}/exp-a-embed-text-run-1"]
    logged = {}
    for name, metadata in metadata_service.updates:
        assert name == f"{store}/exp-a-embed-text-run-1"
        logged.update(metadata)
    assert logged["_params"]["items_uri"] == "gs://b/items/"
    assert logged["_metrics"]["count"] == 40.0
    assert logged["_state"] == "COMPLETE"


def test_long_job_ids_give_run_names_within_vertex_limit():
    """Vertex keeps a run as ``<experiment>-<run name>``, at most 121 characters: a long
    pipeline job id (``submit --job-id``, 128 allowed) is shortened deterministically, keeping
    the step, the shard and a hash of the whole name."""
    from google.cloud.aiplatform.metadata import experiment_run_resource as sdk

    from item_embeddings.config import check_value

    experiment = "e" * 64  # the longest the experiment parameter allows
    assert check_value("experiment", experiment) is None
    assert "at most 64" in check_value("experiment", "e" * 65)
    job = "item-embeddings-" + "x" * 112  # a 128-character job id
    names = {run_name("embed-text", f"{job}-shard-{k:05d}", experiment) for k in range(3)}
    names.add(run_name("embed-image", f"{job}-shard-00000", experiment))
    assert len(names) == 4
    for name in names:
        resource = sdk._format_experiment_run_resource_id(experiment, name)
        sdk.ExperimentRun._validate_run_id(resource)  # the SDK's own check: raises if too long
        assert len(resource) <= 121 and re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", name)
    shortened = run_name("embed-text", f"{job}-shard-00002", experiment)
    assert shortened == run_name("embed-text", f"{job}-shard-00002", experiment)  # a retry
    assert shortened.startswith("embed-text-item-embeddings-") and \
        shortened.endswith("-shard-00002")
    # short names are left as they were
    assert run_name("embed-text", "job-1", experiment) == "embed-text-job-1"


def test_a_step_of_a_long_job_id_logs_its_run_through_the_sdk(metadata_service, tmp_path):
    """The path a step takes (step_run -> VertexTracker -> aiplatform.start_run) with a
    128-character job id: the SDK accepts the run (it raised ValueError before)."""
    from item_embeddings.step import step_run

    job = "item-embeddings-" + "y" * 112
    tracker = make_tracker("vertex", experiment="recsys-dev", project="test-proj",
                           location="us-central1")
    with step_run("embed-text", tmp_path, params={"batch": 1}, artifact="a", run_id=job,
                  tracker=tracker):
        pass
    store = "projects/test-proj/locations/us-central1/metadataStores/default/contexts"
    (run,) = metadata_service.children[f"{store}/recsys-dev"]
    assert len(run.rsplit("/", 1)[1]) <= 121 and metadata_service.updates
