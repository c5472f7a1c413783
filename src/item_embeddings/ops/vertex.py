"""Vertex AI operations: submit a pipeline run, manage schedules, upload templates.

Plain functions over ``google-cloud-aiplatform`` and ``kfp.registry``; the CLI
(``vertex_commands``) is a thin layer over them. A template is one of:

* ``None``: the pipeline is compiled on the fly (``compile_pipeline(target="vertex")``);
* a local ``.yaml``/``.json`` file produced by ``item-embeddings compile``;
* an Artifact Registry URL ``https://REGION-kfp.pkg.dev/PROJECT/REPO/PACKAGE/TAG_OR_VERSION``
  (what :func:`upload_template` prints). Runs created from such a URL keep the link to the
  template, so the Vertex AI UI can rerun them with changed parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PARAM_FIELDS, ConfigError, PipelineParams, check_value, machine_problems
from ..errors import ItemEmbeddingsError
from ..pipeline import PIPELINE_NAME

_AR_URL = re.compile(r"^https://[\w-]+-kfp\.pkg\.dev/", re.IGNORECASE)
_AR_HOST = re.compile(r"^https://[\w-]+-kfp\.pkg\.dev/[^/]+/[^/]+/?$")  # .../PROJECT/REPO
# Artifact Registry tags: lower-case letters, digits, '-', '.', '_' (no leading punctuation).
_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_KMS_KEY = re.compile(r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$")
_TERMINAL_OK = {"PIPELINE_STATE_SUCCEEDED"}
_TERMINAL_BAD = {"PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED"}


class VertexOpsError(ItemEmbeddingsError, RuntimeError):
    """A Vertex AI operation that did not succeed (failed run, unknown schedule, upload error)."""


class PipelineRunFailed(VertexOpsError):
    """The submitted run ended FAILED or CANCELLED (``--wait``)."""


@dataclass(frozen=True)
class SubmitResult:
    job_name: str          # projects/P/locations/R/pipelineJobs/ID
    job_id: str
    dashboard_uri: str
    state: str             # last state seen (PIPELINE_STATE_...)
    template: str          # what the job was created from (path or registry URL)


def is_registry_url(template: str) -> bool:
    return bool(_AR_URL.match(template))


def console_url(job_name: str) -> str:
    """Console page of ``projects/P/locations/R/pipelineJobs/ID``."""
    parts = job_name.split("/")
    project, region, job_id = parts[1], parts[3], parts[5]
    return (f"https://console.cloud.google.com/vertex-ai/locations/{region}/pipelines/runs/"
            f"{job_id}?project={project}")


@contextlib.contextmanager
def template_source(template: str | None, images: Images | None = None) -> Iterator[str]:
    """Yield a template path/URL usable as ``PipelineJob(template_path=...)``.

    ``None`` compiles the pipeline into a temporary file (removed afterwards); that needs both
    images (builds of the Dockerfiles pushed to your registry): the placeholder default cannot
    run on Vertex.
    """
    if template is None:
        from ..pipeline import compile_pipeline

        images = images or Images()
        images.require()
        with tempfile.TemporaryDirectory(prefix="item-embeddings-") as tmp:
            path = Path(tmp) / f"{PIPELINE_NAME}.yaml"
            compile_pipeline(str(path), target="vertex", image=images.cpu,
                             gpu_image=images.gpu, pipeline_root=images.pipeline_root)
            yield str(path)
        return
    if images and (images.cpu or images.gpu):
        raise ConfigError("--image/--gpu-image are for compiling the pipeline now; a --template "
                          "already names its images")
    if is_registry_url(template) or template.startswith("gs://"):
        yield template  # the SDK downloads it
        return
    if template.startswith(("http://", "https://")):
        raise ConfigError(f"template {template!r}: expected a local file, a gs:// file or an "
                          "Artifact Registry URL "
                          "https://REGION-kfp.pkg.dev/PROJECT/REPO/PACKAGE/TAG")
    if not Path(template).is_file():
        raise ConfigError(f"template file not found: {template}")
    yield template


@dataclass(frozen=True)
class Images:
    """The container images a template is compiled with (and its default pipeline root)."""

    cpu: str | None = None          # every CPU step (the slim Dockerfile)
    gpu: str | None = None          # the T4 image step (Dockerfile.gpu: CUDA 12.x torch)
    pipeline_root: str | None = None

    def require(self, instead: str = "pass --template FILE_OR_URL of a compiled template"
                ) -> None:
        """Both images must be given to compile for Vertex; ``instead`` is the other way the
        command offers (``compile`` has no ``--template``)."""
        missing = [flag for flag, value in (("--image", self.cpu), ("--gpu-image", self.gpu))
                   if not value]
        if missing:
            raise ConfigError(
                f"compiling the pipeline for Vertex needs {' and '.join(missing)} URI (the "
                "project's Dockerfile and Dockerfile.gpu built and pushed to your registry, "
                f"e.g. with cloudbuild.yaml), or {instead}")


@dataclass(frozen=True)
class RunSettings:
    """What one pipeline run is: submit and schedules take the same settings.

    Attributes:
        project: Google Cloud project id.
        region: Vertex AI region, e.g. ``us-central1``.
        parameter_values: Pipeline parameters to set (the rest keep the template defaults).
        template: Local template file, ``gs://`` file, Artifact Registry URL, or ``None`` to
            compile now with ``images``.
        images: The images (and default pipeline root) to compile with when ``template`` is
            None.
        pipeline_root: ``gs://`` prefix for the run's artifacts (default: the template's).
        service_account: Service account the run's tasks, and the T4 custom job, run as.
        network: VPC network ``projects/NUMBER/global/networks/NAME`` the run (and the T4 job)
            is peered with.
        encryption_key: Cloud KMS key (CMEK) ``projects/P/locations/L/keyRings/R/cryptoKeys/K``
            for the run's resources, the T4 job included.
        labels: Labels on the run (Vertex propagates them to the T4 custom job).
        enable_caching: ``False`` turns caching off for every task; ``True`` on for every task
            but those the template compiled uncached (the inputs' fingerprint, publish);
            ``None`` keeps the template's per-task setting (cached steps are keyed by the
            items' contents).
        credentials: Explicit credentials (default: application default credentials).
    """

    project: str
    region: str
    parameter_values: Mapping[str, Any]
    template: str | None = None
    images: Images = Images()
    pipeline_root: str | None = None
    service_account: str | None = None
    network: str | None = None
    encryption_key: str | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    enable_caching: bool | None = None
    credentials: Any = None


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    """``["team=recsys", "env=dev"]`` -> a dict, checked against Google Cloud's label rules."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label expects key=value, got {pair!r}")
        # The SDK only checks types; the API would reject these after the template upload.
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ConfigError(f"invalid labels: {pair!r} (keys: lower-case letter first, then "
                              "lower-case letters, digits, '_' or '-', at most 63; values the "
                              "same, may be empty or start with any of them)")
        labels[key] = value
    if len(labels) > 64:
        raise ConfigError(f"invalid labels: {len(labels)} given, at most 64 allowed")
    return labels


def make_job(template_path: str, run: RunSettings, *, display_name: str | None,
              job_id: str | None):
    from google.cloud import aiplatform

    # Values are checked here, before anything is sent: on Vertex a bad one would fail a task
    # (or the custom job's creation) minutes later, and be retried.
    problems = [p for name, value in run.parameter_values.items()
                if name in PARAM_FIELDS and (p := check_value(name, value))]
    if not problems:  # the given values with the defaults: machines Vertex would not pair
        problems = machine_problems(PipelineParams(**{
            k: v for k, v in run.parameter_values.items() if k in PARAM_FIELDS}))
    if problems:
        raise ConfigError("; ".join(problems))
    if run.encryption_key and not _KMS_KEY.match(run.encryption_key):
        raise ConfigError(f"encryption key {run.encryption_key!r} must look like "
                          "projects/P/locations/L/keyRings/R/cryptoKeys/K")
    try:
        job = aiplatform.PipelineJob(
            display_name=display_name or PIPELINE_NAME,
            template_path=template_path,
            job_id=job_id,
            pipeline_root=run.pipeline_root,
            parameter_values=dict(run.parameter_values),
            enable_caching=None,  # the SDK's would set every task alike: see _set_caching
            encryption_spec_key_name=run.encryption_key or None,
            labels=dict(run.labels) or None,
            credentials=run.credentials,
            project=run.project,
            location=run.region,
        )
    except ValueError as exc:
        # The SDK validates parameter names and types against the template here.
        raise ConfigError(f"template {template_path}: {exc}") from None
    _require_items_uri(job, run.parameter_values)
    _set_caching(job, run.enable_caching)
    return job


def _set_caching(job, enable: bool | None) -> None:
    """``--caching`` / ``--no-caching`` applied task by task to the job's pipeline spec (which a
    schedule copies into every run it starts).

    Off turns every task off. On turns on the tasks the template compiled cached and never the
    ones it compiled uncached: *Fingerprint and plan*, whose fresh hash of the items is what
    keeps cached steps from serving old contents, and the *QA report*, which publishes. The SDK's
    ``PipelineJob(enable_caching=True)`` would cache those too, and a nightly schedule would
    re-serve old vectors. None keeps the template as it is.
    """
    if enable is None:
        return
    from google.protobuf import json_format

    # the job's request before it is sent (gca_resource refuses access until it is created);
    # PipelineJobSchedule reads the same _gca_resource
    resource = job._gca_resource
    spec = json_format.MessageToDict(resource._pb.pipeline_spec)
    for component in [spec["root"], *spec.get("components", {}).values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            compiled = task.get("cachingOptions")
            # a DAG task (a loop, a condition) has no options; a task compiled uncached has
            # them empty (enableCache false is the proto default)
            cached = compiled is None or bool(compiled.get("enableCache"))
            task["cachingOptions"] = {"enableCache": enable and cached}
    resource.pipeline_spec = spec


def _require_items_uri(job, parameter_values: Mapping[str, Any]) -> None:
    """A run without ``items_uri`` would fail minutes later inside the first step: refuse it now."""
    if parameter_values.get("items_uri"):
        return
    spec = job.pipeline_spec
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    if "items_uri" in declared and not declared["items_uri"].get("defaultValue"):
        raise ConfigError("items_uri is required: pass --set items_uri=gs://... or put it in "
                          "--config")


def submit_pipeline(
    run: RunSettings,
    *,
    experiment: str | None = None,
    display_name: str | None = None,
    job_id: str | None = None,
    wait: bool = False,
    poll_interval_s: float = 30.0,
    timeout_s: float | None = None,
    on_state: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Create a Vertex AI pipeline run, optionally wait for it to finish.

    Args:
        run: What the run is (project, template, parameters, identity, network, CMEK, ...).
        experiment: Vertex AI Experiments experiment the run is linked to (``None``: not linked).
        display_name: Name shown in the console (default ``item-embeddings``).
        job_id: Explicit job id (default: ``item-embeddings-<timestamp>``).
        wait: Poll the run's state until it ends; raise :class:`PipelineRunFailed` if it fails.
        poll_interval_s: Seconds between state polls.
        timeout_s: Give up waiting after this long (the run itself keeps going).
        on_state: Called with each new state name while waiting (progress output).

    Returns:
        The job's resource name, id, console link and last known state.
    """
    with template_source(run.template, run.images) as template_path:
        job = make_job(template_path, run, display_name=display_name, job_id=job_id)
        job.submit(service_account=run.service_account, network=run.network,
                   experiment=experiment or None)
    result = SubmitResult(job_name=job.resource_name, job_id=job.job_id,
                          dashboard_uri=console_url(job.resource_name),
                          state=job.gca_resource.state.name, template=run.template or "compiled")
    if not wait:
        return result
    state = wait_for_job(job, poll_interval_s=poll_interval_s, timeout_s=timeout_s,
                         on_state=on_state)
    return dataclasses.replace(result, state=state)


def wait_for_job(job, *, poll_interval_s: float = 30.0, timeout_s: float | None = None,
                 on_state: Callable[[str], None] | None = None) -> str:
    """Poll ``job.state`` until it is terminal; return it, raise if the run failed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        state = job.state.name  # one GetPipelineJob call
        if state != last:
            last = state
            if on_state:
                on_state(state)
        if state in _TERMINAL_OK:
            return state
        if state in _TERMINAL_BAD:
            error = job.gca_resource.error
            detail = f": {error.message}" if error and error.message else ""
            raise PipelineRunFailed(f"pipeline run {job.resource_name} ended {state}{detail} "
                                    f"(see {console_url(job.resource_name)})")
        if deadline is not None and time.monotonic() >= deadline:
            raise VertexOpsError(f"gave up waiting after {timeout_s:g}s; run {job.resource_name}"
                                 f" is still {state} (see {console_url(job.resource_name)})")
        time.sleep(poll_interval_s)


# ---------------------------------------------------------------------------------------------
# Artifact Registry templates


@dataclass(frozen=True)
class UploadResult:
    package: str
    version: str                  # sha256:...
    version_url: str              # immutable: runs always get exactly this template
    tag_urls: dict[str, str]      # moving: e.g. .../latest


def _refuse_placeholder_image(template_path: str) -> None:
    """A template naming the placeholder image cannot run anywhere: never publish one."""
    from ..components import DEFAULT_IMAGE

    if DEFAULT_IMAGE in Path(template_path).read_text():
        raise ConfigError(f"template {template_path} names the placeholder image "
                          f"{DEFAULT_IMAGE}: compile it with --image and --gpu-image (your "
                          "builds of Dockerfile and Dockerfile.gpu) before uploading")


def registry_host(region: str, project: str, repository: str) -> str:
    return f"https://{region}-kfp.pkg.dev/{project}/{repository}"


def upload_template(host: str, *, template: str | None = None, images: Images | None = None,
                    tags: Sequence[str] = ("latest",), auth=None) -> UploadResult:
    """Push a compiled template to an Artifact Registry KFP repository with version tags.

    Args:
        host: ``https://REGION-kfp.pkg.dev/PROJECT/REPO`` (the repository must exist, format KFP).
        template: Local template file; ``None`` compiles the pipeline now.
        images: The images (and default pipeline root) when compiling now.
        tags: Tags to attach (e.g. ``v1.2.0``, ``latest``); a tag already on another version
            moves to this one.
        auth: ``requests`` auth or google credentials (default: application default credentials).

    Returns:
        Package, version and the URLs to pass as ``--template`` (or pick in the Vertex UI).
    """
    import requests
    from kfp.registry import RegistryClient

    if not _AR_HOST.match(host.rstrip("/") + "/"):
        raise ConfigError(f"registry host {host!r} must look like "
                          "https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY")
    bad = [t for t in tags if not _TAG.match(t)]
    if bad:
        raise ConfigError(f"invalid tag(s) {bad}: use lower-case letters, digits, '.', '_', '-'")
    if template is not None and is_registry_url(template):
        raise ConfigError("upload needs a local template file (or none, to compile now)")
    host = host.rstrip("/")
    client = RegistryClient(host=host, auth=auth)
    with template_source(template, images) as path:
        _refuse_placeholder_image(path)
        try:
            package, version = client.upload_pipeline(file_name=path, tags=list(tags) or None)
        except requests.HTTPError as exc:
            body = exc.response.text[:500] if exc.response is not None else ""
            raise VertexOpsError(f"upload to {host} failed: {exc} {body}".rstrip()) from None
    return UploadResult(package=package, version=version,
                        version_url=f"{host}/{package}/{version}",
                        tag_urls={t: f"{host}/{package}/{t}" for t in tags})
