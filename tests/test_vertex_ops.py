"""Submit, schedule and upload against the real aiplatform / kfp SDKs, network intercepted.

The aiplatform SDK builds real request protos and calls its GAPIC clients; the tests replace the
GAPIC client methods (the transport boundary) with an in-memory Vertex AI that records each
request and answers like the service. Anything not intercepted goes to a closed loopback port,
so a missed call fails instead of reaching the internet. kfp's RegistryClient is intercepted at
``requests``' HTTP adapter. The fake service is tests/vertex_fake.py; the ``fake``, ``registry``
and ``template`` fixtures come from conftest.
"""


import dataclasses
import io
import re
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud.aiplatform.utils import yaml_utils
from google.cloud.aiplatform_v1.types import schedule as gca_schedule
from kfp.registry import ApiAuth

from item_embeddings.config import PARAM_FIELDS, ConfigError
from item_embeddings.ops import schedules, vertex
from vertex_fake import PARENT, PROJECT, REGION, S

SA = "runner@test-proj.iam.gserviceaccount.com"
NETWORK = "projects/123/global/networks/vpc"
ROOT = "gs://bucket/pipeline-root"


def _submit(template, **kw):
    run_fields = {f.name for f in dataclasses.fields(vertex.RunSettings)}
    run = dict(project=PROJECT, region=REGION, template=template, pipeline_root=ROOT,
               parameter_values={"items_uri": "gs://data/items.parquet", "text_batch_size": 64},
               credentials=AnonymousCredentials())
    run.update({k: v for k, v in kw.items() if k in run_fields})
    return vertex.submit_pipeline(vertex.RunSettings(**run),
                                  **{k: v for k, v in kw.items() if k not in run_fields})


KMS_KEY = f"projects/{PROJECT}/locations/{REGION}/keyRings/ring/cryptoKeys/key"


def test_submit_sends_template_parameters_and_run_settings(fake, template):
    result = _submit(template, service_account=SA, network=NETWORK,
                     labels={"team": "recsys", "env": "dev"}, enable_caching=False,
                     encryption_key=KMS_KEY, experiment="recsys-dev",
                     job_id="item-embeddings-t1")

    (_, create), = [c for c in fake.calls if c[0] == "create_pipeline_job"]
    job = create["pipeline_job"]
    assert create["parent"] == PARENT and create["pipeline_job_id"] == "item-embeddings-t1"
    assert job.pipeline_spec["pipelineInfo"]["name"] == "item-embeddings"
    assert job.runtime_config.gcs_output_directory == ROOT
    params = job.runtime_config.parameter_values
    assert params["items_uri"] == "gs://data/items.parquet"
    assert params["text_batch_size"] == 64
    assert "publish_uri" not in params  # not given: the template default applies
    assert job.service_account == SA and job.network == NETWORK
    assert job.encryption_spec.kms_key_name == KMS_KEY
    assert dict(job.labels) == {"team": "recsys", "env": "dev"}
    # enable_caching=False is written into every task of the submitted spec.
    tasks = job.pipeline_spec["root"]["dag"]["tasks"]
    assert tasks and all(t["cachingOptions"].get("enableCache", False) is False
                         for t in tasks.values())
    assert fake.buckets == [ROOT]
    # The experiment is created (it did not exist) and the run's context is added to it.
    (_, ctx), = [c for c in fake.calls if c[0] == "create_context"]
    assert ctx["context_id"] == "recsys-dev"
    assert ctx["context"].schema_title == "system.Experiment"
    exp_name = f"{PARENT}/metadataStores/default/contexts/recsys-dev"
    assert fake.children[exp_name] == [
        f"{PARENT}/metadataStores/default/contexts/item-embeddings-t1"]
    assert result.job_name == f"{PARENT}/pipelineJobs/item-embeddings-t1"
    assert "console.cloud.google.com" in result.dashboard_uri


def test_submit_without_experiment_makes_no_metadata_calls(fake, template):
    _submit(template)
    assert fake.names() == ["create_pipeline_job"]


def test_submit_wait_polls_until_succeeded(fake, template):
    seen = []
    result = _submit(template, wait=True, poll_interval_s=0, on_state=seen.append)
    assert seen == ["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"]
    assert result.state == "PIPELINE_STATE_SUCCEEDED"
    assert fake.names().count("get_pipeline_job") == 2


def test_submit_wait_raises_when_run_fails(fake, template):
    fake.job_states = [S.PIPELINE_STATE_RUNNING, S.PIPELINE_STATE_FAILED]
    with pytest.raises(vertex.PipelineRunFailed, match="FAILED: embed-images: out of memory"):
        _submit(template, wait=True, poll_interval_s=0)


def test_submit_wait_timeout_names_the_run(fake, template):
    fake.job_states = [S.PIPELINE_STATE_RUNNING] * 50
    with pytest.raises(vertex.VertexOpsError, match="still PIPELINE_STATE_RUNNING"):
        _submit(template, wait=True, poll_interval_s=0.01, timeout_s=0.05)


def test_submit_rejects_parameters_the_template_does_not_declare(fake, template):
    with pytest.raises(ConfigError, match="fusion_epochs"):
        _submit(template, parameter_values={"items_uri": "gs://x", "fusion_epochs": 3})
    with pytest.raises(ConfigError, match="items_uri is required"):
        _submit(template, parameter_values={})
    with pytest.raises(ConfigError, match="template file not found"):
        _submit("/nonexistent/t.yaml")
    assert "create_pipeline_job" not in fake.names()


def test_submit_compiles_the_real_pipeline_on_the_fly(fake):
    image = "us-docker.pkg.dev/test-proj/ie/item-embeddings:1.0"
    gpu_image = "us-docker.pkg.dev/test-proj/ie/item-embeddings-gpu:1.0"
    vertex.submit_pipeline(vertex.RunSettings(
        project=PROJECT, region=REGION, template=None,
        images=vertex.Images(cpu=image, gpu=gpu_image), pipeline_root=ROOT,
        credentials=AnonymousCredentials(),
        parameter_values={"items_uri": "gs://d/items/", "seed": 7,
                          "publish_uri": "gs://out/emb"}))
    (_, create), = [c for c in fake.calls if c[0] == "create_pipeline_job"]
    spec = create["pipeline_job"].pipeline_spec
    assert spec["pipelineInfo"]["name"] == "item-embeddings"
    # Every pipeline parameter of the real template is a PipelineParams field.
    declared = set(spec["root"]["inputDefinitions"]["parameters"])
    assert declared == set(PARAM_FIELDS)
    # Every task is a custom job (its own machine): the executors run GCPC's launcher, and
    # both project images are inside the jobs' worker pool specs.
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()
              if "container" in e}
    assert images and all("google-cloud-pipeline-components" in i for i in images), images
    job_spec = type(create["pipeline_job"]).to_json(create["pipeline_job"])
    assert image in job_spec and gpu_image in job_spec
    assert create["pipeline_job"].runtime_config.parameter_values["seed"] == 7


@pytest.fixture(scope="module")
def real_template(tmp_path_factory) -> str:
    """The project's pipeline compiled for Vertex, as `item-embeddings compile` writes it."""
    from item_embeddings.pipeline import compile_pipeline

    return str(compile_pipeline(tmp_path_factory.mktemp("real") / "t.yaml", target="vertex",
                                image="r/cpu:1", gpu_image="r/gpu:1"))


def _task_caching(spec) -> dict[str, bool]:
    """Task name -> whether it is cached, over every DAG of a pipeline spec (loops included)."""
    spec = type(spec).to_dict(spec) if hasattr(type(spec), "to_dict") else spec
    found = {}
    for component in [spec["root"], *spec["components"].values()]:
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            if "componentRef" in task and not name.startswith(("condition-", "for-loop-")):
                found[name] = bool(task.get("cachingOptions", {}).get("enableCache", False))
    return found


NEVER_CACHED = {"fingerprint-inputs", "qa-report"}


@pytest.mark.parametrize("enable", [True, False, None])
def test_caching_flag_never_caches_the_fingerprint_or_publish(fake, real_template, enable):
    """submit and schedule create through the SDK's real PipelineJob (transport intercepted):
    --caching turns on every step but Fingerprint inputs and the QA report (which publishes),
    which stay uncached (else a schedule re-serves old vectors or skips a publish);
    --no-caching turns everything off; no flag keeps the template's own settings, the same two
    off."""
    values = {"items_uri": "gs://d/items/", "publish_uri": "gs://d/out/"}
    _submit(real_template, parameter_values=values, enable_caching=enable)
    schedules.create_schedule(vertex.RunSettings(PROJECT, REGION, values, template=real_template,
                                              enable_caching=enable,
                                              credentials=AnonymousCredentials()),
                           cron="0 3 * * *", display_name="nightly")
    (_, created), = [c for c in fake.calls if c[0] == "create_pipeline_job"]
    (_, scheduled), = [c for c in fake.calls if c[0] == "create_schedule"]
    for job in (created["pipeline_job"],
                scheduled["schedule"].create_pipeline_job_request.pipeline_job):
        caching = _task_caching(job.pipeline_spec)
        assert NEVER_CACHED <= set(caching) and {"embed-text", "embed-images"} <= set(caching)
        assert {name for name, on in caching.items() if on} == (
            set() if enable is False else set(caching) - NEVER_CACHED)


def test_compiling_for_vertex_needs_both_images(fake):
    for images, missing in ((vertex.Images(), "--image and --gpu-image"),
                            (vertex.Images(cpu="r/cpu:1"), "--gpu-image")):
        with pytest.raises(ConfigError, match=f"needs {missing} URI"):
            _submit(None, images=images)
    with pytest.raises(ConfigError, match="a --template already names its images"):
        _submit("t.yaml", images=vertex.Images(cpu="r/cpu:1"))
    with pytest.raises(ConfigError, match="must look like projects/P/locations/L/keyRings"):
        _submit(None, images=vertex.Images(cpu="r/c:1", gpu="r/g:1"), encryption_key="k1")
    assert "create_pipeline_job" not in fake.names()


@pytest.mark.parametrize("name,value", [("text_batch_size", 0), ("image_strategy", "spot"),
                                        ("download_timeout_s", -1.0)])
def test_submit_and_schedule_refuse_bad_values_before_sending(fake, template, name, value):
    values = {"items_uri": "gs://d/i.parquet", name: value}
    with pytest.raises(ConfigError, match=f"parameter '{name}' must be"):
        _submit(template, parameter_values=values)
    with pytest.raises(ConfigError, match=f"parameter '{name}' must be"):
        schedules.create_schedule(vertex.RunSettings(PROJECT, REGION, values, template=template,
                                                  credentials=AnonymousCredentials()),
                               cron="0 3 * * *", display_name="n")
    assert fake.names() == []


@pytest.mark.parametrize("values, message", [
    ({"text_accelerator": "T4"}, "parameter 'text_accelerator' must be one of '' (empty), "
                                 "NVIDIA_TESLA_T4,"),
    ({"text_accelerator": "NVIDIA_TESLA_T4"}, "parameter 'text_accelerator' NVIDIA_TESLA_T4 "
                                              "attaches to n1 machine types only, but "
                                              "text_machine_type is 'e2-standard-4'"),
    ({"text_accelerator": "NVIDIA_L4", "text_machine_type": "n1-standard-8"},
     "NVIDIA_L4 attaches to g2-standard machine types of 4 to 32 vCPUs only"),
    ({"fusion_machine_type": "g2-standard-8"}, "parameter 'fusion_machine_type' 'g2-standard-8' "
                                               "is a GPU machine type"),
    ({"image_machine_type": "c3-standard-8"}, "parameter 'image_machine_type' 'c3-standard-8' "
                                              "cannot take the image workers' NVIDIA_TESLA_T4"),
])
def test_submit_and_schedule_refuse_machines_vertex_would_not_pair(fake, template, values,
                                                                   message):
    """The machines a run asks for are checked before anything is sent (they failed at the
    custom job's creation, minutes into the run); a T4 on n1 is sent."""
    values = {"items_uri": "gs://d/i.parquet", **values}
    with pytest.raises(ConfigError, match=re.escape(message)):
        _submit(template, parameter_values=values)
    with pytest.raises(ConfigError, match=re.escape(message)):
        schedules.create_schedule(vertex.RunSettings(PROJECT, REGION, values, template=template,
                                                  credentials=AnonymousCredentials()),
                               cron="0 3 * * *", display_name="n")
    assert fake.names() == []


def test_submit_from_artifact_registry_url(fake, template, monkeypatch):
    url = f"https://{REGION}-kfp.pkg.dev/{PROJECT}/pipelines/item-embeddings/v1"
    fetched = []

    def urlopen(req):  # the SDK downloads AR templates with urllib
        fetched.append(req.full_url)
        return io.BytesIO(Path(template).read_bytes())

    monkeypatch.setattr(yaml_utils.request, "urlopen", urlopen)
    _submit(url)
    assert fetched == [url]
    (_, create), = [c for c in fake.calls if c[0] == "create_pipeline_job"]
    # template_uri keeps the link to the registry version: the UI can rerun from it.
    assert create["pipeline_job"].template_uri == url


def test_submit_from_gcs_template(fake, template, gcs):
    # gcs: conftest's real GCS emulator on loopback; the SDK reads the template from it.
    bucket = gcs.lookup_bucket("templates") or gcs.create_bucket("templates")
    bucket.blob("t/item_embeddings.yaml").upload_from_filename(template)
    _submit("gs://templates/t/item_embeddings.yaml")
    (_, create), = [c for c in fake.calls if c[0] == "create_pipeline_job"]
    assert create["pipeline_job"].pipeline_spec["pipelineInfo"]["name"] == "item-embeddings"
    with pytest.raises(ConfigError, match="expected a local file, a gs:// file or an Artifact"):
        _submit("https://example.com/template")


def test_create_schedule_request(fake, template):
    name = schedules.create_schedule(
        vertex.RunSettings(project=PROJECT, region=REGION, template=template, pipeline_root=ROOT,
                           parameter_values={"items_uri": "gs://data/items.parquet"},
                           service_account=SA, network=NETWORK, encryption_key=KMS_KEY,
                           labels={"team": "recsys"}, enable_caching=False,
                           credentials=AnonymousCredentials()),
        display_name="nightly", cron="0 3 * * *", time_zone="Europe/Berlin",
        start_time="2026-12-01T00:00:00+01:00", end_time="2027-06-01T00:00:00Z",
        max_concurrent_runs=2, max_runs=100)

    (_, req), = [c for c in fake.calls if c[0] == "create_schedule"]
    sched = req["schedule"]
    assert req["parent"] == PARENT and name == f"{PARENT}/schedules/1"
    assert sched.display_name == "nightly"
    assert sched.cron == "TZ=Europe/Berlin 0 3 * * *"
    assert sched.max_concurrent_run_count == 2 and sched.max_run_count == 100
    assert sched.start_time.isoformat() == "2026-11-30T23:00:00+00:00"
    assert sched.end_time.isoformat() == "2027-06-01T00:00:00+00:00"
    job = sched.create_pipeline_job_request.pipeline_job
    assert sched.create_pipeline_job_request.parent == PARENT
    assert job.service_account == SA and job.network == NETWORK
    assert job.encryption_spec.kms_key_name == KMS_KEY
    assert dict(job.labels) == {"team": "recsys"}  # a scheduled run keeps the labels
    tasks = job.pipeline_spec["root"]["dag"]["tasks"]  # ...and the caching setting
    assert tasks and all(t["cachingOptions"].get("enableCache", False) is False
                         for t in tasks.values())
    assert job.runtime_config.parameter_values["items_uri"] == "gs://data/items.parquet"
    assert job.pipeline_spec["pipelineInfo"]["name"] == "item-embeddings"


def test_schedule_list_pause_resume_delete(fake, template):
    name = schedules.create_schedule(
        vertex.RunSettings(project=PROJECT, region=REGION, template=template, pipeline_root=ROOT,
                           parameter_values={"items_uri": "gs://d/i.parquet"},
                           credentials=AnonymousCredentials()),
        display_name="nightly", cron="30 2 * * 1")
    creds = dict(project=PROJECT, region=REGION, credentials=AnonymousCredentials())

    rows = schedules.list_schedules(filter='display_name="nightly"', **creds)
    assert [(r["name"], r["cron"], r["state"]) for r in rows] == [(name, "30 2 * * 1", "ACTIVE")]
    (_, listed), = [c for c in fake.calls if c[0] == "list_schedules"]
    assert listed["request"]["filter"] == 'display_name="nightly"'

    schedules.pause_schedule("1", **creds)  # a bare id is expanded to the full resource name
    assert fake.schedules[name].state == gca_schedule.Schedule.State.PAUSED
    schedules.resume_schedule(name, catch_up=True, **creds)
    assert fake.schedules[name].state == gca_schedule.Schedule.State.ACTIVE
    assert ("resume_schedule", {"name": name, "catch_up": True}) in fake.calls
    schedules.delete_schedule(name, **creds)
    assert fake.schedules == {}
    with pytest.raises(vertex.VertexOpsError, match="not found"):
        schedules.pause_schedule(name, **creds)


@pytest.mark.parametrize("cron,tz,msg", [
    ("0 3 * *", None, "5 fields"),
    ("0 3 * * *", "Mars/Olympus", "unknown time zone"),
    ("TZ=UTC 0 3 * * *", "UTC", "either"),
])
def test_cron_validation(cron, tz, msg):
    with pytest.raises(ConfigError, match=msg):
        schedules.cron_with_time_zone(cron, tz)


def test_cron_time_zone_prefix_kept():
    assert schedules.cron_with_time_zone("CRON_TZ=America/New_York 0 1 * * *", None) == \
        "TZ=America/New_York 0 1 * * *"


def test_schedule_rejects_bad_times(fake, template):
    run = vertex.RunSettings(project=PROJECT, region=REGION, template=template,
                             parameter_values={"items_uri": "gs://d/i"},
                             credentials=AnonymousCredentials())
    common = dict(cron="0 3 * * *", display_name="n")
    with pytest.raises(ConfigError, match="UTC offset"):
        schedules.create_schedule(run, start_time="2026-12-01T00:00:00", **common)
    with pytest.raises(ConfigError, match="not after"):
        schedules.create_schedule(run, start_time="2026-12-02T00:00:00Z",
                               end_time="2026-12-01T00:00:00Z", **common)
    assert "create_schedule" not in fake.names()


def test_upload_template_with_tags(registry, template):
    host = f"https://{REGION}-kfp.pkg.dev/{PROJECT}/pipelines"
    result = vertex.upload_template(host, template=template, tags=["v1.2.0", "latest"],
                                    auth=ApiAuth("tok"))
    (req,) = registry.seen
    assert req.method == "POST" and req.url == host
    assert req.headers["authorization"] == "Bearer tok"
    body = req.body.decode("latin-1")
    assert 'name="tags"' in body and "v1.2.0,latest" in body
    assert "pipelineInfo" in body and "item-embeddings" in body  # the template file itself
    assert result.package == "item-embeddings"
    assert result.version_url == f"{host}/item-embeddings/sha256:{'ab' * 32}"
    assert result.tag_urls["v1.2.0"] == f"{host}/item-embeddings/v1.2.0"


def test_upload_errors(registry, template):
    host = f"https://{REGION}-kfp.pkg.dev/{PROJECT}/pipelines"
    registry.status = 403
    with pytest.raises(vertex.VertexOpsError, match="403.*denied"):
        vertex.upload_template(host, template=template, auth=ApiAuth("tok"))
    with pytest.raises(ConfigError, match="REGION-kfp.pkg.dev"):
        vertex.upload_template("https://example.com/x", template=template, auth=ApiAuth("t"))
    with pytest.raises(ConfigError, match="invalid tag"):
        vertex.upload_template(host, template=template, tags=["Bad Tag"], auth=ApiAuth("t"))


def test_upload_refuses_a_template_with_the_placeholder_image(registry, tmp_path):
    from item_embeddings.pipeline import compile_pipeline

    host = f"https://{REGION}-kfp.pkg.dev/{PROJECT}/pipelines"
    placeholder = compile_pipeline(tmp_path / "p.yaml", target="vertex")  # no images given
    with pytest.raises(ConfigError, match="names the placeholder image"):
        vertex.upload_template(host, template=str(placeholder), auth=ApiAuth("t"))
    assert registry.seen == []
    good = compile_pipeline(tmp_path / "g.yaml", target="vertex", image="r/cpu:1",
                            gpu_image="r/gpu:1")
    vertex.upload_template(host, template=str(good), auth=ApiAuth("t"))
    assert len(registry.seen) == 1



def _console(job_id: str) -> str:
    return (f"https://console.cloud.google.com/vertex-ai/locations/{REGION}/pipelines/runs/"
            f"{job_id}?project={PROJECT}")


def test_submit_result_and_request_defaults(fake, template):
    """What submit prints (the run's console link) and what it sends when only the template,
    the parameters and the root are given: the default display name, no labels, no CMEK."""
    result = _submit(template, job_id="item-embeddings-t2")
    assert result.dashboard_uri == _console("item-embeddings-t2")
    assert (result.job_id, result.template) == ("item-embeddings-t2", template)
    assert result.state == "PIPELINE_STATE_PENDING"
    (_, create), = [c for c in fake.calls if c[0] == "create_pipeline_job"]
    job = create["pipeline_job"]
    assert job.display_name == "item-embeddings"
    assert dict(job.labels) == {} and job.encryption_spec.kms_key_name == ""
    assert job.service_account == "" and job.network == ""
    _submit(template, display_name="nightly-run", job_id="item-embeddings-t3")
    assert [c for c in fake.calls if c[0] == "create_pipeline_job"][1][1][
        "pipeline_job"].display_name == "nightly-run"


def test_waiting_reports_the_end_of_a_run_word_for_word(fake, template):
    fake.job_states = [S.PIPELINE_STATE_RUNNING, S.PIPELINE_STATE_FAILED]
    with pytest.raises(vertex.PipelineRunFailed) as failed:
        _submit(template, wait=True, poll_interval_s=0, job_id="j-failed")
    assert str(failed.value) == (f"pipeline run {PARENT}/pipelineJobs/j-failed ended "
                                 "PIPELINE_STATE_FAILED: embed-images: out of memory (see "
                                 f"{_console('j-failed')})")
    fake.job_states = [S.PIPELINE_STATE_CANCELLED]  # no error message: none is shown
    with pytest.raises(vertex.PipelineRunFailed) as cancelled:
        _submit(template, wait=True, poll_interval_s=0, job_id="j-cancelled")
    assert str(cancelled.value) == (f"pipeline run {PARENT}/pipelineJobs/j-cancelled ended "
                                    f"PIPELINE_STATE_CANCELLED (see {_console('j-cancelled')})")
    fake.job_states = [S.PIPELINE_STATE_RUNNING] * 50
    with pytest.raises(vertex.VertexOpsError) as waited:
        _submit(template, wait=True, poll_interval_s=0.01, timeout_s=0.05, job_id="j-slow")
    assert str(waited.value) == (f"gave up waiting after 0.05s; run {PARENT}/pipelineJobs/j-slow"
                                 f" is still PIPELINE_STATE_RUNNING (see {_console('j-slow')})")
    # each state is reported once while waiting, however many polls see it
    fake.job_states = [S.PIPELINE_STATE_RUNNING] * 3 + [S.PIPELINE_STATE_SUCCEEDED]
    seen = []
    result = _submit(template, wait=True, poll_interval_s=0, on_state=seen.append, job_id="j-ok")
    assert seen == ["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"]
    assert result.state == "PIPELINE_STATE_SUCCEEDED"
    assert result.dashboard_uri == _console("j-ok")


def test_template_and_image_refusals_word_for_word(fake, template, tmp_path):
    with pytest.raises(ConfigError) as missing:
        _submit(None, images=vertex.Images(gpu="r/g:1"))
    assert str(missing.value) == (
        "compiling the pipeline for Vertex needs --image URI (the project's Dockerfile and "
        "Dockerfile.gpu built and pushed to your registry, e.g. with cloudbuild.yaml), or pass "
        "--template FILE_OR_URL of a compiled template")
    with pytest.raises(ConfigError) as both:
        _submit(template, images=vertex.Images(gpu="r/g:1"))
    assert str(both.value) == ("--image/--gpu-image are for compiling the pipeline now; a "
                               "--template already names its images")
    _submit(template, images=vertex.Images(pipeline_root="gs://b/root"))  # no image: accepted
    with pytest.raises(ConfigError) as http:
        _submit("http://example.com/t.yaml")
    assert str(http.value) == ("template 'http://example.com/t.yaml': expected a local file, a "
                               "gs:// file or an Artifact Registry URL "
                               "https://REGION-kfp.pkg.dev/PROJECT/REPO/PACKAGE/TAG")
    with pytest.raises(ConfigError) as absent:
        _submit(str(tmp_path))  # a folder is not a template file
    assert str(absent.value) == f"template file not found: {tmp_path}"
    with pytest.raises(ConfigError) as key:
        _submit(template, encryption_key="projects/p/keyRings/r/cryptoKeys/k")
    assert str(key.value) == ("encryption key 'projects/p/keyRings/r/cryptoKeys/k' must look "
                              "like projects/P/locations/L/keyRings/R/cryptoKeys/K")
    with pytest.raises(ConfigError, match=rf"^template {re.escape(template)}: .*fusion_epochs"):
        _submit(template, parameter_values={"items_uri": "gs://x", "fusion_epochs": 3})
    with pytest.raises(ConfigError) as no_items:
        _submit(template, parameter_values={"text_batch_size": 8})
    assert str(no_items.value) == ("items_uri is required: pass --set items_uri=gs://... or put "
                                   "it in --config")
    assert [n for n in fake.names() if n == "create_pipeline_job"] == ["create_pipeline_job"]
    assert vertex.is_registry_url("HTTPS://us-central1-KFP.pkg.dev/p/r/pkg/v1")
    assert not vertex.is_registry_url(" https://us-central1-kfp.pkg.dev/p/r/pkg/v1")
    assert not vertex.is_registry_url("https://evil.com/us-kfp.pkg.dev/p/r/pkg/v1")


def test_labels_follow_google_clouds_rules():
    key63, value63 = "k" + "a" * 62, "v" * 63
    assert vertex.parse_labels(["team=recsys", "env=", f"{key63}={value63}", "a_b-1=x-9_z",
                                "team=ads"]) == {"team": "ads", "env": "", key63: value63,
                                                 "a_b-1": "x-9_z"}
    for pair in ("team", "=x"):
        with pytest.raises(ConfigError) as bad:
            vertex.parse_labels([pair])
        assert str(bad.value) == f"--label expects key=value, got {pair!r}"
    for pair in ("Team=x", "1team=x", "team=X", "t.m=x", "team=a.b", f"{key63}x=v",
                 f"k={value63}v", "team=x y", "_t=x"):
        with pytest.raises(ConfigError) as bad:
            vertex.parse_labels([pair])
        assert str(bad.value) == (
            f"invalid labels: {pair!r} (keys: lower-case letter first, then lower-case letters, "
            "digits, '_' or '-', at most 63; values the same, may be empty or start with any of "
            "them)")
    assert len(vertex.parse_labels([f"k{i}=v" for i in range(64)])) == 64
    with pytest.raises(ConfigError) as many:
        vertex.parse_labels([f"k{i}=v" for i in range(65)])
    assert str(many.value) == "invalid labels: 65 given, at most 64 allowed"


def test_upload_urls_defaults_and_refusals_word_for_word(registry, template):
    host = vertex.registry_host(REGION, PROJECT, "pipelines")
    assert host == f"https://{REGION}-kfp.pkg.dev/{PROJECT}/pipelines"
    result = vertex.upload_template(host + "/", template=template, auth=ApiAuth("tok"))
    (req,) = registry.seen
    assert req.url == host  # the trailing slash is dropped
    assert 'name="tags"' in req.body.decode("latin-1")
    assert result.version == f"sha256:{'ab' * 32}"
    assert result.tag_urls == {"latest": f"{host}/item-embeddings/latest"}  # the default tag
    assert result.version_url == f"{host}/item-embeddings/sha256:{'ab' * 32}"
    with pytest.raises(ConfigError) as url:
        vertex.upload_template(host, template=f"{host}/item-embeddings/v1", auth=ApiAuth("t"))
    assert str(url.value) == "upload needs a local template file (or none, to compile now)"
    with pytest.raises(ConfigError) as tag:
        vertex.upload_template(host, template=template, tags=["ok", "-x", "A"], auth=ApiAuth("t"))
    assert str(tag.value) == ("invalid tag(s) ['-x', 'A']: use lower-case letters, digits, '.', "
                              "'_', '-'")
    with pytest.raises(ConfigError) as bad_host:
        vertex.upload_template(host + "/extra", template=template, auth=ApiAuth("t"))
    assert str(bad_host.value) == (f"registry host '{host}/extra' must look like "
                                   "https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY")
    registry.status = 403
    with pytest.raises(vertex.VertexOpsError) as denied:
        vertex.upload_template(host, template=template, auth=ApiAuth("tok"))
    assert str(denied.value).startswith(f"upload to {host} failed: 403")
    assert len(registry.seen) == 2


def test_upload_compiles_the_pipeline_now_with_the_images_given(registry):
    host = vertex.registry_host(REGION, PROJECT, "pipelines")
    result = vertex.upload_template(host, images=vertex.Images(cpu="r/cpu:1", gpu="r/gpu:1"),
                                    tags=["v2"], auth=ApiAuth("t"))
    (req,) = registry.seen
    body = req.body.decode("latin-1")
    assert "pipelineInfo" in body and "r/cpu:1" in body and "r/gpu:1" in body
    assert result.tag_urls == {"v2": f"{host}/item-embeddings/v2"}
