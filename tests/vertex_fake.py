"""An in-memory Vertex AI and Artifact Registry for the ops tests (a fake service, as
``image_server`` is a fake image host): the aiplatform SDK builds real request protos and calls
its GAPIC clients, which :func:`install_fake_vertex` points at :class:`FakeVertex`; kfp's
RegistryClient is answered at ``requests``' HTTP adapter. conftest's ``fake``, ``registry`` and
``template`` fixtures use it.
"""

# No `from __future__ import annotations` here: kfp reads the component's annotations as types.
import io

import requests
from google.api_core import exceptions, operation
from google.cloud import aiplatform
from google.cloud.aiplatform.utils import gcs_utils
from google.cloud.aiplatform_v1.services.metadata_service import MetadataServiceClient
from google.cloud.aiplatform_v1.services.pipeline_service import PipelineServiceClient
from google.cloud.aiplatform_v1.services.schedule_service import ScheduleServiceClient
from google.cloud.aiplatform_v1.types import context as gca_context
from google.cloud.aiplatform_v1.types import metadata_store as gca_store
from google.cloud.aiplatform_v1.types import pipeline_job as gca_job
from google.cloud.aiplatform_v1.types import pipeline_state
from google.cloud.aiplatform_v1.types import schedule as gca_schedule
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from kfp import compiler, dsl

PROJECT, REGION = "test-proj", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
S = pipeline_state.PipelineState


@dsl.component(base_image="python:3.11")
def _echo(items_uri: str, batch: int) -> str:
    return f"{items_uri}:{batch}"


@dsl.pipeline(name="item-embeddings")
def _pipeline(items_uri: str = "", text_batch_size: int = 128, experiment: str = "recsys-dev",
              publish_uri: str = ""):
    _echo(items_uri=items_uri, batch=text_batch_size)


def compile_template(path) -> str:
    """A real compiled KFP template with the pipeline's name and some of its real parameters."""
    compiler.Compiler().compile(_pipeline, str(path))
    return str(path)


class FakeVertex:
    """In-memory Vertex AI behind the GAPIC clients: records requests, answers like the service."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.jobs: dict[str, gca_job.PipelineJob] = {}
        self.contexts: dict[str, gca_context.Context] = {}
        self.children: dict[str, list[str]] = {}
        self.schedules: dict[str, gca_schedule.Schedule] = {}
        self.job_states: list[int] = [S.PIPELINE_STATE_RUNNING, S.PIPELINE_STATE_SUCCEEDED]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    # PipelineService
    def create_pipeline_job(self, parent, pipeline_job, pipeline_job_id, **_):
        self.calls.append(("create_pipeline_job", {"parent": parent, "pipeline_job": pipeline_job,
                                                   "pipeline_job_id": pipeline_job_id}))
        job = gca_job.PipelineJob(pipeline_job)
        job.name = f"{parent}/pipelineJobs/{pipeline_job_id}"
        job.state = S.PIPELINE_STATE_PENDING
        job.job_detail.pipeline_run_context = gca_context.Context(
            name=f"{parent}/metadataStores/default/contexts/{pipeline_job_id}",
            schema_title="system.PipelineRun")
        self.jobs[job.name] = job
        return job

    def get_pipeline_job(self, name, **_):
        self.calls.append(("get_pipeline_job", {"name": name}))
        job = self.jobs[name]
        if self.job_states:
            job.state = self.job_states.pop(0)
            if job.state == S.PIPELINE_STATE_FAILED:
                job.error.message = "embed-images: out of memory"
        return job

    # MetadataService (experiments)
    def get_metadata_store(self, name, **_):
        self.calls.append(("get_metadata_store", {"name": name}))
        return gca_store.MetadataStore(name=name)

    def get_context(self, name, **_):
        self.calls.append(("get_context", {"name": name}))
        if name not in self.contexts:
            raise exceptions.NotFound(name)
        return self.contexts[name]

    def create_context(self, parent, context, context_id, **_):
        self.calls.append(("create_context", {"parent": parent, "context": context,
                                              "context_id": context_id}))
        created = gca_context.Context(context)
        created.name = f"{parent}/contexts/{context_id}"
        self.contexts[created.name] = created
        return created

    def add_context_children(self, context, child_contexts, **_):
        self.calls.append(("add_context_children", {"context": context,
                                                    "child_contexts": list(child_contexts)}))
        self.children.setdefault(context, []).extend(child_contexts)

    # ScheduleService
    def create_schedule(self, parent, schedule, **_):
        self.calls.append(("create_schedule", {"parent": parent, "schedule": schedule}))
        created = gca_schedule.Schedule(schedule)
        created.name = f"{parent}/schedules/{len(self.schedules) + 1}"
        created.state = gca_schedule.Schedule.State.ACTIVE
        self.schedules[created.name] = created
        return created

    def get_schedule(self, name, **_):
        self.calls.append(("get_schedule", {"name": name}))
        if name not in self.schedules:
            raise exceptions.NotFound(name)
        return self.schedules[name]

    def list_schedules(self, request, **_):
        self.calls.append(("list_schedules", {"request": request}))
        return list(self.schedules.values())

    def pause_schedule(self, name, **_):
        self.calls.append(("pause_schedule", {"name": name}))
        self.schedules[name].state = gca_schedule.Schedule.State.PAUSED

    def resume_schedule(self, name, catch_up=None, **_):
        self.calls.append(("resume_schedule", {"name": name, "catch_up": catch_up}))
        self.schedules[name].state = gca_schedule.Schedule.State.ACTIVE

    def delete_schedule(self, name, **_):
        self.calls.append(("delete_schedule", {"name": name}))
        del self.schedules[name]
        done = operations_pb2.Operation(name=f"{name}/operations/1", done=True)
        done.response.Pack(empty_pb2.Empty())
        return operation.Operation(done, refresh=lambda: done, cancel=lambda: None,
                                   result_type=empty_pb2.Empty)


def install_fake_vertex(monkeypatch) -> FakeVertex:
    """Put a :class:`FakeVertex` behind the GAPIC clients of the aiplatform SDK (its transport
    boundary); undo with :func:`uninstall_fake_vertex` after the test."""
    backend = FakeVertex()
    for client in (PipelineServiceClient, MetadataServiceClient, ScheduleServiceClient):
        for name in ("create_pipeline_job", "get_pipeline_job", "get_metadata_store",
                     "get_context", "create_context", "add_context_children", "create_schedule",
                     "get_schedule", "list_schedules", "pause_schedule", "resume_schedule",
                     "delete_schedule"):
            if hasattr(client, name):
                method = getattr(backend, name)
                monkeypatch.setattr(client, name,
                                    lambda self, *a, _m=method, **k: _m(*a, **k))
    # The SDK checks/creates the pipeline-root bucket over the GCS API before creating a job.
    buckets = []
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda **kw: buckets.append(kw["output_artifacts_gcs_dir"]))
    backend.buckets = buckets
    # Any call not intercepted above goes to a closed loopback port, never to Google.
    aiplatform.init(api_endpoint="127.0.0.1:9")
    return backend


def uninstall_fake_vertex() -> None:
    aiplatform.initializer.global_config._api_endpoint = None  # init() cannot unset it


class RegistryAdapter(requests.adapters.HTTPAdapter):
    """Answers Artifact Registry's KFP upload API; records every request."""

    seen: list = []
    status = 200

    def send(self, request, **kwargs):
        type(self).seen.append(request)
        resp = requests.Response()
        resp.status_code = self.status
        resp.url = request.url
        resp.request = request
        body = "item-embeddings/sha256:" + "ab" * 32 if self.status == 200 else "denied"
        resp.raw = io.BytesIO(body.encode())
        return resp


def install_fake_registry(monkeypatch) -> type:
    """Answer every ``requests`` call with :class:`RegistryAdapter` (fresh records)."""
    RegistryAdapter.seen = []
    RegistryAdapter.status = 200
    monkeypatch.setattr(requests.Session, "get_adapter", lambda self, url: RegistryAdapter())
    return RegistryAdapter
