"""The ops CLI: help texts, argument errors, and submit/schedule/upload through the real SDKs."""

import json

import google.auth
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.oauth2.credentials import Credentials

from item_embeddings.ops.cli import main
from vertex_fake import PARENT, S

# Every test of the ops CLI runs behind the Vertex AI transport interceptor (a regression that
# made a call where none is expected reaches the in-memory fake, never Google).
pytestmark = pytest.mark.usefixtures("fake")

COMMANDS = [["submit"], ["schedule"], ["schedule", "create"], ["schedule", "list"],
            ["schedule", "pause"], ["schedule", "resume"], ["schedule", "delete"], ["upload"],
            ["verify"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: item-embeddings " + " ".join(command))
    if command[-1] in ("submit", "create"):
        assert "examples:" in out and "text_batch_size (int, default 128)" in out
        assert "--set NAME=VALUE" in out and "--config FILE.yaml" in out


def test_help_lists_ops_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("submit", "schedule", "upload", "verify"):
        assert name in out


@pytest.mark.parametrize("argv,message", [
    (["submit", "--bogus"], "unrecognized arguments: --bogus"),
    (["submit", "--template", "t.yaml", "--image", "img"], "not allowed with argument"),
    (["submit", "--caching", "--no-caching"], "not allowed with argument"),
    (["schedule"], "required: ACTION"),
    (["schedule", "create", "--project", "p"], "the following arguments are required: --cron"),
    (["schedule", "create", "--cron", "0 3 * * *", "--max-concurrent-runs", "two"],
     "invalid int value: 'two'"),
    (["schedule", "pause"], "required: SCHEDULE"),
    (["verify"], "required: DIR_OR_URI"),
])
def test_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _submit_args(template, *extra):
    return ["submit", "--project", "test-proj", "--region", "us-central1", "--template", template,
            "--pipeline-root", "gs://bucket/root", *extra]


def test_config_errors_exit_2_with_message(anonymous, template, tmp_path, capsys):
    cases = [
        (_submit_args(template, "--config", str(tmp_path / "missing.yaml")),
         "config file not found"),
        (_submit_args(template, "--set", "text_batch_sise=3"),
         "unknown parameter 'text_batch_sise' (did you mean text_batch_size"),
        (_submit_args(template, "--set", "text_batch_size=lots"),
         "parameter 'text_batch_size' expects int"),
        (_submit_args(template, "--items", "gs://d/i", "--label", "Bad Label=x"),
         "invalid labels"),
        (_submit_args(str(tmp_path / "none.yaml"), "--items", "gs://d/i"),
         "template file not found"),
        (_submit_args(template), "items_uri is required"),
        (["schedule", "create", "--project", "test-proj", "--template", template, "--items", "x",
          "--cron", "0 3 * * *", "--time-zone", "Nowhere/City"], "unknown time zone"),
        (["upload", "--template", template], "--host"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"item-embeddings {argv[0]}: error: ") and message in err, err
    assert "create_pipeline_job" not in anonymous.names()


def test_missing_project(fake, monkeypatch, capsys):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    assert main(["schedule", "list"]) == 2
    assert "--project is required" in capsys.readouterr().err
    assert fake.calls == []  # refused before any call (a regression would reach the fake)


@pytest.fixture
def anonymous(fake):
    aiplatform.init(credentials=AnonymousCredentials())
    yield fake
    aiplatform.initializer.global_config._credentials = None


def test_submit_cli_sends_config_and_overrides(anonymous, template, tmp_path, capsys):
    config = tmp_path / "prod.yaml"
    config.write_text("parameters:\n  items_uri: gs://data/items/\n  text_batch_size: 32\n")
    argv = _submit_args(template, "--config", str(config), "--set", "text_batch_size=64",
                        "--set", "publish_uri=gs://out/embeddings", "--experiment", "exp-a",
                        "--service-account", "sa@p.iam.gserviceaccount.com", "--label", "team=rs",
                        "--no-caching", "--wait", "--poll-interval", "0")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "state: PIPELINE_STATE_SUCCEEDED" in out and "experiment: exp-a" in out
    (_, create), = [c for c in anonymous.calls if c[0] == "create_pipeline_job"]
    job = create["pipeline_job"]
    assert dict(job.runtime_config.parameter_values) == {
        "items_uri": "gs://data/items/", "text_batch_size": 64.0,
        "publish_uri": "gs://out/embeddings", "experiment": "exp-a"}
    assert job.service_account == "sa@p.iam.gserviceaccount.com" and job.labels["team"] == "rs"
    assert any(c[0] == "create_context" and c[1]["context_id"] == "exp-a"
               for c in anonymous.calls)


def test_submit_cli_failed_run_exits_1(anonymous, template, capsys):
    anonymous.job_states = [S.PIPELINE_STATE_FAILED]
    assert main(_submit_args(template, "--items", "gs://d/i", "--no-experiment", "--wait",
                             "--poll-interval", "0")) == 1
    err = capsys.readouterr().err
    assert "item-embeddings submit: error: pipeline run" in err and "PIPELINE_STATE_FAILED" in err
    assert "metadata" not in " ".join(anonymous.names())


def test_schedule_cli_lifecycle(anonymous, template, capsys):
    where = ["--project", "test-proj", "--region", "us-central1"]
    assert main(["schedule", "create", *where, "--template", template, "--items", "gs://d/i",
                 "--cron", "0 3 * * *", "--time-zone", "Europe/Berlin",
                 "--max-concurrent-runs", "2", "--display-name", "nightly"]) == 0
    name = f"{PARENT}/schedules/1"
    assert f"created schedule {name}" in capsys.readouterr().out
    assert anonymous.schedules[name].cron == "TZ=Europe/Berlin 0 3 * * *"
    assert main(["schedule", "list", *where]) == 0
    assert "nightly  ACTIVE  cron 'TZ=Europe/Berlin 0 3 * * *'" in capsys.readouterr().out
    assert main(["schedule", "list", *where, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == name and row["max_concurrent_run_count"] == 2
    for action in ("pause", "resume", "delete"):
        assert main(["schedule", action, *where, "1"]) == 0
    assert anonymous.schedules == {}
    assert main(["schedule", "pause", *where, "1"]) == 1
    assert "schedule '1' not found" in capsys.readouterr().err


def test_upload_cli(registry, template, monkeypatch, capsys):
    monkeypatch.setattr(google.auth, "default",
                        lambda *a, **k: (Credentials(token="adc-token"), "test-proj"))
    assert main(["upload", "--project", "test-proj", "--region", "us-central1",
                 "--repository", "pipelines", "--template", template, "--tag", "v1"]) == 0
    out = capsys.readouterr().out
    assert "https://us-central1-kfp.pkg.dev/test-proj/pipelines/item-embeddings/v1" in out
    (req,) = registry.seen
    assert req.headers["authorization"] == "Bearer adc-token"


def test_compiling_for_vertex_without_an_image_is_refused(fake, capsys, tmp_path):
    rc = main(["submit", "--project", "test-proj", "--region", "us-central1", "--items", "gs://b/i"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs --image and --gpu-image URI" in err
    assert err.rstrip().endswith("or pass --template FILE_OR_URL of a compiled template")
    assert fake.calls == [] and fake.buckets == []
    out = tmp_path / "t.yaml"
    assert main(["compile", "--output", str(out)]) == 2  # --target vertex is the default
    err = capsys.readouterr().err
    assert "needs --image and --gpu-image URI" in err
    # compile has no --template: its hint is the option it does have
    assert "--template" not in err and "or --target local for a template that kfp.local runs" in err
    assert main(["compile", "--output", str(out), "--image", "r/cpu:1"]) == 2
    assert "needs --gpu-image URI" in capsys.readouterr().err
    assert not out.exists()
    assert main(["compile", "--output", str(out), "--target", "local"]) == 0  # kfp.local: fine
    assert main(["compile", "--output", str(out), "--image", "r/cpu:1", "--gpu-image",
                 "r/gpu:1", "--pipeline-root", "gs://b/root"]) == 0
    assert "defaultPipelineRoot: gs://b/root" in out.read_text()
