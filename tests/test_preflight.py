"""`item-embeddings preflight` against Google's APIs, the HTTP transport intercepted.

Every request the command makes goes through ``requests``' HTTP adapter, which the tests replace
with an in-memory Google: Service Usage, Cloud Storage's testIamPermissions, Artifact Registry,
Cloud Quotas and IAM Credentials (the service account's token). It answers per bearer token, so
a check made as the service account is told apart from one made as the caller; it records every
request, so the tests can prove that preflight only reads.
"""

import io
import json
import urllib.parse

import pytest
import requests

from item_embeddings.config import PipelineParams
from item_embeddings.ops.cli import main
from item_embeddings.ops.preflight import quota_demand

PROJECT, REGION = "test-proj", "us-central1"
SA = "runner@test-proj.iam.gserviceaccount.com"
AR = f"{REGION}-docker.pkg.dev/{PROJECT}/item-embeddings"
IMAGE, GPU_IMAGE = f"{AR}/item-embeddings:abc1234", f"{AR}/item-embeddings-gpu:abc1234"
ALL = ["storage.objects.create", "storage.objects.delete", "storage.objects.get",
       "storage.objects.list"]


class FakeGoogle:
    """The read APIs preflight calls, in memory."""

    def __init__(self):
        self.requests: list[tuple[str, str, str]] = []  # method, url, bearer token
        self.services = {s: "ENABLED" for s in (
            "aiplatform.googleapis.com", "storage.googleapis.com",
            "artifactregistry.googleapis.com", "cloudquotas.googleapis.com")}
        # token -> bucket -> granted permissions
        self.granted = {"user-token": {"b-root": ALL, "b-items": ALL, "b-out": ALL},
                        "sa-token": {"b-root": ALL, "b-items": ALL, "b-out": ALL}}
        self.tags = {("item-embeddings", "abc1234"), ("item-embeddings-gpu", "abc1234")}
        self.limits = {  # metric -> {region or "" (the default): limit}
            "custom_model_training_cpus": {"": 24, REGION: 200},
            "custom_model_training_preemptible_cpus": {"": 24, REGION: 100},
            "custom_model_training_nvidia_t4_gpus": {"": 1},
            "custom_model_training_preemptible_nvidia_t4_gpus": {"": 1, REGION: 16},
        }
        self.token_creator = True

    def answer(self, method: str, url: str, token: str, body: bytes | None):
        parts = urllib.parse.urlsplit(url)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        if parts.netloc == "iamcredentials.googleapis.com":
            if not self.token_creator:
                return 403, {"error": {"code": 403, "message": "Permission "
                                       "'iam.serviceAccounts.getAccessToken' denied"}}
            assert SA in path and path.endswith(":generateAccessToken")
            return 200, {"accessToken": "sa-token", "expireTime": "2099-01-01T00:00:00Z"}
        assert method == "GET", (method, url)  # preflight only reads
        if parts.netloc == "serviceusage.googleapis.com":
            service = path.rsplit("/", 1)[1]
            return 200, {"name": path, "state": self.services.get(service, "DISABLED")}
        if parts.netloc == "storage.googleapis.com":
            bucket = path.split("/b/", 1)[1].split("/", 1)[0]
            granted = self.granted.get(token, {})
            if bucket not in granted:
                return 404, {"error": {"code": 404, "message": "Not Found"}}
            return 200, {"permissions": [p for p in query["permissions"]
                                         if p in granted[bucket]]}
        if parts.netloc == "artifactregistry.googleapis.com":
            package = urllib.parse.unquote(path.split("/packages/", 1)[1].split("/", 1)[0])
            tag = path.rsplit("/", 1)[1]
            if (package, tag) in self.tags:
                return 200, {"name": path}
            return 404, {"error": {"code": 404, "message": "not found"}}
        if parts.netloc == "cloudquotas.googleapis.com":
            infos = [{"metric": f"aiplatform.googleapis.com/{metric}", "dimensions": ["region"],
                      "dimensionsInfos": [
                          {"dimensions": {"region": r} if r else {},
                           "details": {"value": str(v)}} for r, v in regions.items()]}
                     for metric, regions in self.limits.items()]
            page = query.get("pageToken", [""])[0]  # two pages: the paging is followed
            half = len(infos) // 2
            if not page:
                return 200, {"quotaInfos": infos[:half], "nextPageToken": "p2"}
            return 200, {"quotaInfos": infos[half:]}
        raise AssertionError(f"unexpected request {method} {url}")


@pytest.fixture
def google(monkeypatch):
    import google.auth
    import google.oauth2.credentials

    fake = FakeGoogle()

    def send(adapter, request, **kwargs):
        token = (request.headers.get("authorization") or "").removeprefix("Bearer ")
        fake.requests.append((request.method, request.url, token))
        status, payload = fake.answer(request.method, request.url, token, request.body)
        resp = requests.Response()
        resp.status_code, resp.url, resp.request = status, request.url, request
        resp.headers["content-type"] = "application/json"
        resp.raw = io.BytesIO(json.dumps(payload).encode())
        return resp

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (
        google.oauth2.credentials.Credentials("user-token"), PROJECT))
    return fake


def _preflight(*extra):
    return main(["preflight", "--project", PROJECT, "--region", REGION,
                 "--pipeline-root", "gs://b-root/pipeline-root", "--image", IMAGE,
                 "--gpu-image", GPU_IMAGE, "--service-account", SA,
                 "--set", "items_uri=gs://b-items/items/", "--set", "publish_uri=gs://b-out/emb",
                 *extra])


def test_everything_in_place_passes_with_one_line_per_check(google, capsys):
    assert _preflight("--set", "shards=16") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"preflight of a run in {PROJECT}/{REGION} (read-only)"
    for service in google.services:
        assert f"OK    API {service}: enabled" in lines
    assert (f"OK    pipeline root gs://b-root/pipeline-root: {SA} has storage.objects.create, "
            "storage.objects.get, storage.objects.list") in lines
    assert f"OK    image {GPU_IMAGE}: present in Artifact Registry" in lines
    # 16 image workers on Spot n1-standard-4 + T4, 16 text workers on e2-standard-4 (standard)
    assert ("OK    quota custom_model_training_preemptible_nvidia_t4_gpus in us-central1: 16 of "
            "16 (16 image workers x 1 NVIDIA_TESLA_T4)") in lines
    assert ("OK    quota custom_model_training_preemptible_cpus in us-central1: 64 of 100 (16 "
            "image workers x 4 vCPUs (n1-standard-4))") in lines
    assert ("OK    quota custom_model_training_cpus in us-central1: 64 of 200 (16 text workers "
            "x 4 vCPUs (e2-standard-4))") in lines
    assert lines[-1].endswith("0 failed, 0 could not tell, 0 skipped")
    # read-only: GETs, and the service account's token
    assert {m for m, _, _ in google.requests} == {"GET", "POST"}
    assert [u for m, u, _ in google.requests if m == "POST"] == [
        f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}"
        ":generateAccessToken"]
    # the buckets are checked as the service account, everything else as the caller
    hosts = {host: {t for _, u, t in google.requests if urllib.parse.urlsplit(u).netloc == host}
             for host in ("storage.googleapis.com", "cloudquotas.googleapis.com",
                          "serviceusage.googleapis.com", "artifactregistry.googleapis.com")}
    assert hosts.pop("storage.googleapis.com") == {"sa-token"}
    assert all(tokens == {"user-token"} for tokens in hosts.values()), hosts


def test_what_would_fail_a_first_run_fails_the_preflight(google, capsys):
    google.services["artifactregistry.googleapis.com"] = "DISABLED"
    google.granted["sa-token"]["b-root"] = ["storage.objects.get", "storage.objects.list"]
    google.granted["sa-token"].pop("b-out")
    google.tags.discard(("item-embeddings-gpu", "abc1234"))
    google.limits["custom_model_training_preemptible_nvidia_t4_gpus"][REGION] = 4
    assert _preflight("--set", "shards=32", "--set", "max_parallel_shards=16") == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert ("FAIL  API artifactregistry.googleapis.com: DISABLED: gcloud services enable "
            f"artifactregistry.googleapis.com --project {PROJECT}") in lines
    # the caller could write the pipeline root; the service account the run uses cannot
    assert (f"FAIL  pipeline root gs://b-root/pipeline-root: {SA} lacks storage.objects.create "
            "on bucket b-root (e.g. roles/storage.objectAdmin)") in lines
    assert "FAIL  publish_uri gs://b-out/emb: bucket b-out does not exist" in lines
    assert (f"FAIL  image {GPU_IMAGE}: not found in Artifact Registry (build and push it: "
            "cloudbuild.yaml)") in lines
    assert ("FAIL  quota custom_model_training_preemptible_nvidia_t4_gpus in us-central1: the "
            "run asks for 16 at once (16 image workers x 1 NVIDIA_TESLA_T4), the limit is 4: "
            "lower max_parallel_shards, or ask for more quota") in lines
    assert "5 failed" in lines[-1]


def test_a_service_account_that_cannot_be_impersonated_is_said(google, capsys):
    google.token_creator = False
    assert _preflight() == 0  # nothing failed: the bucket checks could not tell
    out = capsys.readouterr().out
    assert (f"WARN  pipeline root gs://b-root/pipeline-root: could not act as {SA} to check"
            in out) and "roles/iam.serviceAccountTokenCreator" in out
    assert "3 could not tell" in out.splitlines()[-1]


def test_a_bad_parameter_is_refused_before_any_request(google, capsys):
    assert _preflight("--set", "text_accelerator=NVIDIA_TESLA_T4") == 2
    assert "attaches to n1 machine types only" in capsys.readouterr().err
    assert google.requests == []


def test_quota_demand_follows_the_parameters():
    demand, unknown = quota_demand(PipelineParams(
        shards=40, max_parallel_shards=8, text_machine_type="n1-standard-8",
        text_accelerator="NVIDIA_TESLA_T4", text_strategy="SPOT", image_strategy="STANDARD",
        knn_machine_type="n2-highmem-32"))
    assert demand["custom_model_training_preemptible_nvidia_t4_gpus"][0] == 8    # text
    assert demand["custom_model_training_nvidia_t4_gpus"][0] == 8                # images
    assert demand["custom_model_training_preemptible_cpus"][0] == 64             # 8 x 8
    assert demand["custom_model_training_cpus"][0] == 32   # 8 image x 4 (fusion's 4 later)
    assert demand["custom_model_training_n2_cpus"][0] == 32                      # kNN, after
    assert unknown == []
    _, unknown = quota_demand(PipelineParams(fusion_machine_type="z9-weird-8"))
    assert unknown == ["fusion machine on z9-weird-8: no known vCPU count or quota for it"]
