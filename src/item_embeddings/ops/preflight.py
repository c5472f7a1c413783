"""Preflight: what makes a first Vertex AI run fail, checked before it is submitted, read-only.

Every check is a read (a GET) or a ``testIamPermissions`` call; nothing is created, written or
enabled. ``item-embeddings preflight`` prints one line per check and exits 1 when one fails:

* **APIs**: Service Usage ``services.get`` of each API a run needs (Vertex AI, Cloud Storage,
  Artifact Registry) and of Cloud Quotas (which the quota checks read);
* **storage**: ``buckets.testIamPermissions`` on the pipeline root's bucket (create, get, list
  objects) and on the buckets of ``items_uri`` (get, list) and ``publish_uri`` (create, get,
  list, delete), as the run's service account (its impersonated token, ``--service-account``)
  or else as the caller; a ``previous_uri`` must be an output set (listed and read);
* **images**: the Artifact Registry tag (or digest) of ``--image`` / ``--gpu-image``;
* **quotas**: Cloud Quotas ``quotaInfos`` of ``aiplatform.googleapis.com`` in the region
  against what the parameters ask for at once (:func:`quota_demand`).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..config import IMAGE_ACCELERATOR, PipelineParams
from ..storage import split_gcs_uri

SERVICES = ("aiplatform.googleapis.com", "storage.googleapis.com",
            "artifactregistry.googleapis.com", "cloudquotas.googleapis.com")
WRITE = ("storage.objects.create", "storage.objects.get", "storage.objects.list")
READ = ("storage.objects.get", "storage.objects.list")
PUBLISH = (*WRITE, "storage.objects.delete")  # publish removes old sets
QUOTA_PREFIX = "aiplatform.googleapis.com/"
# Vertex AI custom-training vCPU quotas by machine family (standard scheduling); Spot machines
# of any family count against custom_model_training_preemptible_cpus.
CPU_METRICS = {"n1": "custom_model_training_cpus", "e2": "custom_model_training_cpus",
               "n2": "custom_model_training_n2_cpus", "n2d": "custom_model_training_n2d_cpus",
               "c2": "custom_model_training_c2_cpus", "c2d": "custom_model_training_c2d_cpus",
               "c3": "custom_model_training_c3_cpus", "g2": "custom_model_training_g2_cpus",
               "a2": "custom_model_training_a2_cpus", "a3": "custom_model_training_a3_cpus",
               "m1": "custom_model_training_m1_cpus"}
SPOT_CPUS = "custom_model_training_preemptible_cpus"
GPU_METRICS = {"NVIDIA_TESLA_T4": "nvidia_t4_gpus", "NVIDIA_L4": "nvidia_l4_gpus",
               "NVIDIA_TESLA_V100": "nvidia_v100_gpus", "NVIDIA_TESLA_P100": "nvidia_p100_gpus",
               "NVIDIA_TESLA_P4": "nvidia_p4_gpus", "NVIDIA_TESLA_A100": "nvidia_a100_gpus",
               "NVIDIA_A100_80GB": "nvidia_a100_80gb_gpus",
               "NVIDIA_H100_80GB": "nvidia_h100_gpus"}
_GPU_MACHINE_VCPUS = {"a2-highgpu-1g": 12, "a2-ultragpu-1g": 12, "a3-highgpu-1g": 26}
_AR_IMAGE = re.compile(r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/"
                       r"(?P<repo>[^/]+)/(?P<package>[^:@]+)(?::(?P<tag>[\w][\w.-]*)|"
                       r"@(?P<digest>sha256:[0-9a-f]{64}))?$")


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``ok``, ``fail``, ``warn`` (could not tell) or ``skip``."""

    status: str
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():<5} {self.what}: {self.detail}"


def machine_vcpus(machine_type: str) -> int | None:
    """vCPUs of a machine type from its name (``e2-standard-4`` -> 4), None when unknown."""
    if machine_type in _GPU_MACHINE_VCPUS:
        return _GPU_MACHINE_VCPUS[machine_type]
    found = re.fullmatch(r"[a-z0-9]+-[a-z]+-(\d+)(-[a-z]+)?", machine_type)
    return int(found.group(1)) if found else None


def quota_demand(params: PipelineParams) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """What a run asks Vertex for at once, per quota metric: (amount, why), and what cannot be
    counted. The text and image workers run side by side (W = min(shards,
    max_parallel_shards) of each); fusion and the kNN graphs, one machine each, come after."""
    workers = min(params.shards, params.max_parallel_shards)
    unknown: list[str] = []

    def machines(what: str, count: int, machine: str, spot: bool, accelerator: str = ""):
        vcpus, family = machine_vcpus(machine), machine.split("-")[0]
        metric = SPOT_CPUS if spot else CPU_METRICS.get(family)
        if vcpus is None or metric is None:
            unknown.append(f"{what} on {machine}: no known vCPU count or quota for it")
            return []
        asks = [(metric, count * vcpus, f"{count} {what} x {vcpus} vCPUs ({machine})")]
        if accelerator:
            gpu = GPU_METRICS[accelerator]
            asks.append((f"custom_model_training_{'preemptible_' if spot else ''}{gpu}", count,
                         f"{count} {what} x 1 {accelerator}"))
        return asks

    phases = [
        machines("image workers", workers, params.image_machine_type,
                 params.image_strategy == "SPOT", IMAGE_ACCELERATOR)
        + machines("text workers", workers, params.text_machine_type,
                   params.text_strategy == "SPOT", params.text_accelerator),
        machines("fusion machine", 1, params.fusion_machine_type, False),
        machines("kNN machine", 1, params.knn_machine_type, False),
    ]
    demand: dict[str, tuple[int, str]] = {}
    for phase in phases:
        at_once: dict[str, tuple[int, list[str]]] = {}
        for metric, amount, why in phase:
            total, whys = at_once.get(metric, (0, []))
            at_once[metric] = (total + amount, [*whys, why])
        for metric, (amount, whys) in at_once.items():
            if amount > demand.get(metric, (0, ""))[0]:
                demand[metric] = (amount, " + ".join(whys))
    return demand, unknown


class Preflight:
    """The checks of one project and region; ``get``/``post`` are the HTTP calls (an
    ``AuthorizedSession`` of the caller, and one of the service account when given)."""

    def __init__(self, project: str, region: str, session, sa_session=None,
                 service_account: str | None = None):
        self.project, self.region = project, region
        self.session, self.sa_session = session, sa_session or session
        self.identity = service_account or "you (the caller; give --service-account for the " \
                                           "run's own)"

    def apis(self) -> list[Check]:
        checks = []
        for service in SERVICES:
            resp = self.session.get(f"https://serviceusage.googleapis.com/v1/projects/"
                                    f"{self.project}/services/{service}")
            if resp.status_code != 200:
                checks.append(_unknown(f"API {service}", resp))
                continue
            state = resp.json().get("state", "?")
            checks.append(Check("ok", f"API {service}", "enabled") if state == "ENABLED" else
                          Check("fail", f"API {service}",
                                f"{state}: gcloud services enable {service} "
                                f"--project {self.project}"))
        return checks

    def bucket(self, what: str, uri: str, permissions: Iterable[str]) -> Check:
        from google.auth.exceptions import RefreshError

        bucket, _ = split_gcs_uri(uri)
        query = urllib.parse.urlencode([("permissions", p) for p in permissions])
        label = f"{what} {uri}"
        try:
            resp = self.sa_session.get(f"https://storage.googleapis.com/storage/v1/b/{bucket}/"
                                       f"iam/testPermissions?{query}")
        except RefreshError as exc:  # no token of the service account for the caller
            return Check("warn", label, f"could not act as {self.identity} to check ({exc}); "
                                        "that needs roles/iam.serviceAccountTokenCreator on it")
        if resp.status_code == 404:
            return Check("fail", label, f"bucket {bucket} does not exist")
        if resp.status_code != 200:
            return _unknown(label, resp)
        missing = sorted(set(permissions) - set(resp.json().get("permissions", [])))
        if missing:
            return Check("fail", label, f"{self.identity} lacks {', '.join(missing)} on bucket "
                                        f"{bucket} (e.g. roles/storage.objectAdmin)")
        return Check("ok", label, f"{self.identity} has {', '.join(sorted(permissions))}")

    def image(self, uri: str) -> Check:
        found = _AR_IMAGE.match(uri)
        if not found:
            return Check("skip", f"image {uri}", "not an Artifact Registry docker image "
                                                 "(REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG)")
        parts = found.groupdict()
        package = urllib.parse.quote(parts["package"], safe="")
        base = (f"https://artifactregistry.googleapis.com/v1/projects/{parts['project']}/"
                f"locations/{parts['location']}/repositories/{parts['repo']}/packages/{package}")
        url = (f"{base}/versions/{parts['digest']}" if parts["digest"]
               else f"{base}/tags/{parts['tag'] or 'latest'}")
        resp = self.session.get(url)
        if resp.status_code == 404:
            return Check("fail", f"image {uri}", "not found in Artifact Registry (build and push "
                                                 "it: cloudbuild.yaml)")
        if resp.status_code != 200:
            return _unknown(f"image {uri}", resp)
        return Check("ok", f"image {uri}", "present in Artifact Registry")

    def quotas(self, params: PipelineParams) -> list[Check]:
        limits = self._quota_limits()
        if isinstance(limits, Check):
            return [limits]
        demand, unknown = quota_demand(params)
        checks = [Check("skip", "quota", why) for why in unknown]
        for metric, (amount, why) in sorted(demand.items()):
            label = f"quota {metric} in {self.region}"
            limit = limits.get(QUOTA_PREFIX + metric)
            if limit is None:
                checks.append(Check("warn", label, f"not found in Cloud Quotas; the run asks for "
                                                   f"{amount} ({why})"))
            elif limit >= 0 and amount > limit:
                checks.append(Check("fail", label, f"the run asks for {amount} at once ({why}), "
                                                   f"the limit is {limit}: lower "
                                                   "max_parallel_shards, or ask for more quota"))
            else:
                shown = "unlimited" if limit < 0 else str(limit)
                checks.append(Check("ok", label, f"{amount} of {shown} ({why})"))
        return checks

    def _quota_limits(self) -> dict[str, int] | Check:
        """Metric -> this region's limit (-1: unlimited), from every Vertex AI QuotaInfo."""
        url = (f"https://cloudquotas.googleapis.com/v1/projects/{self.project}/locations/global/"
               "services/aiplatform.googleapis.com/quotaInfos")
        limits: dict[str, int] = {}
        token = ""
        for _ in range(50):  # pages; bounded
            resp = self.session.get(url, params={"pageSize": 1000, "pageToken": token})
            if resp.status_code != 200:
                return _unknown("quotas of aiplatform.googleapis.com", resp)
            body = resp.json()
            for info in body.get("quotaInfos", []):
                limit = _region_limit(info.get("dimensionsInfos", []), self.region)
                if limit is not None and "region" in info.get("dimensions", ["region"]):
                    limits[info.get("metric", "")] = limit
            token = body.get("nextPageToken", "")
            if not token:
                break
        return limits


def _region_limit(infos: list[dict[str, Any]], region: str) -> int | None:
    """The limit of ``region`` among a quota's dimension infos (the one without dimensions is
    the default of the regions not listed)."""
    chosen = next((i for i in infos if i.get("dimensions", {}).get("region") == region),
                  next((i for i in infos if not i.get("dimensions")), None))
    if chosen is None:
        return None
    return int(chosen.get("details", {}).get("value", 0))


def _unknown(what: str, resp) -> Check:
    try:
        message = resp.json().get("error", {}).get("message", "")
    except ValueError:
        message = resp.text[:200]
    return Check("warn", what, f"could not check (HTTP {resp.status_code}{': ' if message else ''}"
                               f"{message})")


def run_preflight(project: str, region: str, params: PipelineParams, *,
                  pipeline_root: str | None = None, images: Iterable[str] = (),
                  service_account: str | None = None, credentials=None,
                  on_check: Callable[[Check], None] = lambda check: None) -> list[Check]:
    """Every check for a run of ``params`` in ``project``/``region``, in order; each is
    handed to ``on_check`` as it is made."""
    import google.auth
    from google.auth import impersonated_credentials
    from google.auth.transport.requests import AuthorizedSession

    from ..incremental import PreviousSetError, check_previous_set

    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
    if credentials is None:
        credentials, _ = google.auth.default(scopes=scopes)
    sa_session = None
    if service_account:
        sa_session = AuthorizedSession(impersonated_credentials.Credentials(
            source_credentials=credentials, target_principal=service_account,
            target_scopes=scopes))
    checks = Preflight(project, region, AuthorizedSession(credentials), sa_session,
                       service_account)
    done: list[Check] = []

    def add(*found: Check) -> None:
        for check in found:
            done.append(check)
            on_check(check)

    add(*checks.apis())
    paths = [("pipeline root", pipeline_root, WRITE), ("items_uri", params.items_uri, READ),
             ("publish_uri", params.publish_uri, PUBLISH)]
    for what, uri, permissions in paths:
        if uri and uri.startswith("gs://"):
            add(checks.bucket(what, uri, permissions))
        elif what == "pipeline root" and not uri:
            add(Check("skip", what, "none given (--pipeline-root): the template's default"))
    if params.previous_uri:
        try:
            check_previous_set(params.previous_uri)
            add(Check("ok", f"previous_uri {params.previous_uri}", "an output set"))
        except PreviousSetError as exc:
            add(Check("fail", "previous_uri", str(exc)))
    for image in images:
        add(checks.image(image))
    add(*checks.quotas(params))
    return done
