"""Every command README.md and docs/operations.md show runs as shown, so the docs stay true.

The commands are read from the docs' fenced ``bash`` blocks (continuation lines joined, comments
dropped, ``a && b`` as two commands) and from ``$ command`` lines of plain blocks, whose lines
below are the output the docs show. Each command is either run (``RUN``, in the order the docs
show them, in one working folder, so ``verify out/`` checks what ``run-local ... out/`` wrote)
or listed in ``SKIP`` with the reason it cannot run here; a command the docs show that is in
neither list fails ``test_every_command_shown_is_run_or_listed``, and so does a stale entry.

What "as shown" allows: an ``[--optional part]`` is given (its brackets dropped), the files a
command names (``items.parquet``, ``params.yaml``, ``dev.yaml``) are small ones this test
writes, ``SUBSTITUTE`` replaces paths of the user's machine, and ``ADAPT`` lists, with a reason,
the few commands run with an addition. The two ``run-local`` commands write ``out/`` with the
same parameters, so the second is served from the cache of the first (checked): one pipeline
run, plus the demo's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from item_embeddings.outputs import GROUPS, KNN_META, META_FILES, QA_REPORT

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/operations.md")

VERTEX = ("Vertex AI: needs a Google Cloud project, credentials and the network (the same code "
          "runs against an in-memory Vertex AI in test_vertex_ops.py and test_cli_ops.py)")
GCLOUD = "the gcloud CLI against a Google Cloud project (one-time setup, image builds)"
SHELL = "sets shell variables for the Google Cloud commands around it"
INSTALL = "installs the package: this test runs in the installed package"
SKIP = {
    "pip install .": INSTALL,
    'pip install -e ".[test]"': INSTALL,
    "python -m pytest -q": "the test suite itself, of which this test is a part",
    "item-embeddings run-local --items items.parquet --output-dir out2/ --previous out/":
        "runs with the default image weights (CLIP ViT-B/32 'openai'), a model hub download; "
        "the incremental path runs in test_pipeline_local.py (test_incremental_nightly_run_...)",
    "gcloud builds submit --config cloudbuild.yaml "
    "--substitutions=SHORT_SHA=$(git rev-parse --short=7 HEAD) .": GCLOUD,
    "item-embeddings preflight --project P --region R --image CPU_IMAGE --gpu-image GPU_IMAGE "
    "--pipeline-root gs://B/root": VERTEX + " (read-only checks of a project)",
    "item-embeddings submit --project P --region R --image CPU_IMAGE --gpu-image GPU_IMAGE "
    "--pipeline-root gs://B/root --items gs://B/items/ [--wait]": VERTEX,
    "item-embeddings schedule create|list|pause|resume|delete ...": VERTEX,
    "item-embeddings upload --host https://REGION-kfp.pkg.dev/PROJECT/REPO --image CPU_IMAGE "
    "--gpu-image GPU_IMAGE --tag v1": VERTEX + " (Artifact Registry)",
    "PROJECT=my-project REGION=us-central1 BUCKET=my-bucket": SHELL,
    "gcloud services enable aiplatform.googleapis.com artifactregistry.googleapis.com "
    "cloudbuild.googleapis.com": GCLOUD,
    "gcloud storage buckets create gs://$BUCKET --location=$REGION": GCLOUD,
    "gcloud artifacts repositories create item-embeddings --repository-format=docker "
    "--location=$REGION": GCLOUD,
    "SHA=$(git rev-parse --short=7 HEAD)": SHELL,
    "gcloud builds submit --config cloudbuild.yaml "
    "--substitutions=_REGION=$REGION,_REPO=item-embeddings,SHORT_SHA=$SHA .": GCLOUD,
    "item-embeddings preflight --project $PROJECT --region $REGION $IMAGES --pipeline-root "
    "gs://$BUCKET/pipeline-root --service-account runner@$PROJECT.iam.gserviceaccount.com "
    "--config prod.yaml": VERTEX + " (read-only checks of a project)",
    "gcloud artifacts repositories create pipelines --repository-format=kfp --location=$REGION":
        GCLOUD,
    'IMAGES="--image $REGION-docker.pkg.dev/$PROJECT/item-embeddings/item-embeddings:$SHA '
    '--gpu-image $REGION-docker.pkg.dev/$PROJECT/item-embeddings/item-embeddings-gpu:$SHA"':
        SHELL,
    "item-embeddings submit --project $PROJECT --region $REGION $IMAGES --pipeline-root "
    "gs://$BUCKET/pipeline-root --service-account runner@$PROJECT.iam.gserviceaccount.com "
    "--network projects/123456789/global/networks/my-vpc --encryption-key "
    "projects/$PROJECT/locations/$REGION/keyRings/ml/cryptoKeys/embeddings --config prod.yaml "
    "--set text_batch_size=64 --label team=recsys --label env=prod --experiment recsys-prod "
    "--wait": VERTEX,
    "item-embeddings upload --project $PROJECT --region $REGION --repository pipelines $IMAGES "
    "--compile-pipeline-root gs://$BUCKET/pipeline-root --tag v1.2.0 --tag latest":
        VERTEX + " (Artifact Registry)",
    "item-embeddings schedule create --project $PROJECT --region $REGION --template "
    "https://$REGION-kfp.pkg.dev/$PROJECT/pipelines/item-embeddings/latest --pipeline-root "
    "gs://$BUCKET/pipeline-root --service-account runner@$PROJECT.iam.gserviceaccount.com "
    "--config prod.yaml --display-name nightly-embeddings --cron \"0 3 * * *\" --time-zone "
    "Europe/Berlin --start-time 2026-12-01T00:00:00Z --end-time 2027-12-01T00:00:00Z "
    "--max-concurrent-runs 1": VERTEX,
    "item-embeddings schedule list --project $PROJECT --filter "
    "'display_name=\"nightly-embeddings\"'": VERTEX,
    "item-embeddings schedule pause --project $PROJECT SCHEDULE_ID": VERTEX,
    "item-embeddings schedule resume --project $PROJECT SCHEDULE_ID [--catch-up]": VERTEX,
    "item-embeddings schedule delete --project $PROJECT SCHEDULE_ID": VERTEX,
    "item-embeddings submit ... --set items_uri=gs://my-bucket/items/ "
    "--set publish_uri=gs://my-bucket/embeddings/": VERTEX,
    "item-embeddings schedule create ... --config nightly.yaml --display-name nightly "
    "--cron \"0 3 * * 1-6\"": VERTEX,
    "item-embeddings schedule create ... --config nightly.yaml --set fusion_mode=train "
    "--display-name weekly-retrain --cron \"0 3 * * 0\"": VERTEX,
}
DEMO = "item-embeddings demo --output-dir demo_out"
RUN_LOCAL = ("item-embeddings run-local --items items.parquet --output-dir out/ "
             "[--config params.yaml] [--set text_batch_size=64]...")
RUN_LOCAL_DEV = ("item-embeddings run-local --items items.parquet --output-dir out/ --config "
                 "dev.yaml --set image_pretrained=/models/clip.pt --set tracking_dir=out/runs")
RUN = [
    DEMO,
    RUN_LOCAL,
    "item-embeddings runs --output-dir out/",
    "item-embeddings verify out/",
    "item-embeddings params",
    "item-embeddings estimate --items 500k --shards 4",
    "item-embeddings compile --output item_embeddings.yaml --image CPU_IMAGE --gpu-image "
    "GPU_IMAGE [--pipeline-root gs://B/root]",
    RUN_LOCAL_DEV,
    "item-embeddings estimate --items 500k --shards 16",
    "item-embeddings estimate --items 500k --shards 4 --changed-fraction 0.02 --set "
    "previous_uri=gs://b/embeddings/ --set fusion_mode=apply --set publish_uri=gs://b/embeddings/",
    "item-embeddings estimate --items 10M --max-items 0 --shards 64 --max-parallel-shards 32 "
    "--fusion-machine-type e2-highmem-8 --knn-machine-type e2-highmem-8 --set "
    "publish_uri=gs://b/embeddings/",
    "item-embeddings estimate --items 10M --shards 64 --max-parallel-shards 32 --changed-fraction "
    "0.02 --knn-machine-type e2-highmem-8 --set previous_uri=gs://b/embeddings/ --set "
    "fusion_mode=apply",
    "item-embeddings estimate --items 10M --shards 64 --max-parallel-shards 32 --changed-fraction "
    "0.02 --knn-machine-type e2-highmem-8 --set previous_uri=gs://b/embeddings/ --set "
    "fusion_mode=apply --set publish_uri=gs://b/embeddings/",
    "item-embeddings estimate --items 500k --shards 16 --changed-fraction 0.02 --set "
    "previous_uri=gs://b/embeddings/ --set fusion_mode=apply --set publish_uri=gs://b/embeddings/",
    "item-embeddings estimate --items 500k --shards 16 --changed-fraction 0.02 --set "
    "previous_uri=gs://b/embeddings/ --set fusion_mode=apply --set publish_uri=gs://b/embeddings/ "
    "--set persistent_resource_id=nightly-pool",
]
ADAPT = {
    # 120 sample items take a minute or more on 2 cores; 12 show every part of the demo.
    DEMO: "--items-count 12",
}


@dataclass(frozen=True)
class Shown:
    doc: str
    line: int
    command: str                  # whitespace collapsed
    output: tuple[str, ...] = ()  # the lines shown below a `$ command`


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _logical_lines(lines: list[tuple[int, str]]):
    """(first line number, text) per command, backslash continuations joined."""
    parts, start = [], None
    for number, raw in lines:
        text = _strip_comment(raw).rstrip()
        start = number if start is None else start
        if text.endswith("\\"):
            parts.append(text[:-1])
            continue
        yield start, " ".join(" ".join(parts + [text]).split())
        parts, start = [], None


def _dollar_commands(doc: str, body: list[tuple[int, str]]) -> list[Shown]:
    found, k = [], 0
    while k < len(body):
        if not body[k][1].startswith("$ "):
            k += 1
            continue
        lines = [(body[k][0], body[k][1][2:])]
        while lines[-1][1].rstrip().endswith("\\"):
            k += 1
            lines.append(body[k])
        number, command = next(_logical_lines(lines))
        output, k = [], k + 1
        while k < len(body) and not body[k][1].startswith("$ "):
            output.append(body[k][1])
            k += 1
        found.append(Shown(doc, number, command, tuple(output)))
    return found


def shown_commands() -> list[Shown]:
    found = []
    for doc in DOCS:
        lines = (ROOT / doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)\s*$", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            body = [(n + 1, lines[n]) for n in range(i + 1, end)]
            if fence.group(1) == "bash":
                for number, text in _logical_lines(body):
                    found += [Shown(doc, number, part.strip())
                              for part in text.split(" && ") if part.strip()]
            elif fence.group(1) in ("", "text"):
                found += _dollar_commands(doc, body)
            i = end + 1
    return found


def test_every_command_shown_is_run_or_listed():
    shown = {s.command: s for s in shown_commands()}
    unlisted = [f"{s.doc}:{s.line}: {s.command}" for s in shown.values()
                if s.command not in RUN and s.command not in SKIP]
    assert not unlisted, ("a command the docs show is neither run nor listed with a reason in "
                          "tests/test_docs_commands.py:\n" + "\n".join(unlisted))
    stale = [c for c in [*RUN, *SKIP] if c not in shown]
    assert not stale, "listed but no longer shown in the docs:\n" + "\n".join(stale)
    assert not set(RUN) & set(SKIP) and set(ADAPT) <= set(RUN)


def test_the_reader_sees_comments_continuations_and_output():
    body = [(1, "$ item-embeddings estimate --items 5 \\"), (2, "    --shards 2  # two"),
            (3, "step   tasks"), (4, "..."), (5, "$ item-embeddings params")]
    first, second = _dollar_commands("x.md", body)
    assert first == Shown("x.md", 1, "item-embeddings estimate --items 5 --shards 2",
                          ("step   tasks", "..."))
    assert second.command == "item-embeddings params" and second.output == ()
    assert list(_logical_lines([(7, 'a --cron "0 3 * * *"   # at 3'), (8, "# only a comment")])
                ) == [(7, 'a --cron "0 3 * * *"'), (8, "")]


def _argv(command: str, substitute: dict[str, str]) -> list[str]:
    text = command.replace("]...", "]")
    text = re.sub(r"\[([^\]|]*)\]", r"\1", text)  # the optional parts are given
    for shown_path, path in substitute.items():
        text = text.replace(shown_path, path)
    if command in ADAPT:
        text += " " + ADAPT[command]
    return shlex.split(text)


def _write_inputs(work: Path, tiny_model, image_base_url: str) -> dict[str, str]:
    """The user's files the commands name, small: a catalogue whose images a server on
    127.0.0.1 serves, and the parameters of a tiny image model (the default CLIP weights are a
    model hub download). params.yaml and dev.yaml with the commands' --set give the two
    run-local commands the same parameters."""
    from item_embeddings.sample import write_sample_catalogue

    config, checkpoint, _ = tiny_model
    write_sample_catalogue(work / "items.parquet", 24, image_base_url)
    common = (f"image_model: {config}\nimage_pretrained: {checkpoint}\nallow_private_hosts: true\n"
              "knn_k: 5\nfusion_epochs: 2\nimage_batch_size: 8\ndownload_retries: 0\n")
    (work / "params.yaml").write_text(common + "tracking_dir: out/runs\n")
    (work / "dev.yaml").write_text(common + "text_batch_size: 64\n")
    return {"/models/clip.pt": str(checkpoint)}


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory, tiny_model):
    """Every command of RUN, in order, in one working folder: command -> (exit status, output)."""
    from item_embeddings.sample import SampleImageServer

    work = tmp_path_factory.mktemp("docs")
    env = dict(os.environ,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               # the demo asks the model hub once; a closed loopback port says "unreachable"
               HF_ENDPOINT="http://127.0.0.1:9",
               ITEM_EMBEDDINGS_CACHE=str(tmp_path_factory.mktemp("cache")))
    results = {}
    with SampleImageServer() as server:
        substitute = _write_inputs(work, tiny_model, server.base_url)
        for command in RUN:
            done = subprocess.run(_argv(command, substitute), cwd=work, env=env, text=True,
                                  capture_output=True, timeout=900)
            results[command] = (done.returncode, done.stdout + done.stderr)
    return work, results


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN)
def test_command_runs_as_shown(docs_run, command):
    work, results = docs_run
    rc, output = results[command]
    assert rc == 0, f"{command}\n{output[-3000:]}"
    shown = next(s for s in shown_commands() if s.command == command)
    # The output the docs show (lines, or "..." for lines left out) appears in this order.
    lines = [" ".join(line.split()) for line in output.splitlines()]
    at = 0
    for expected in (" ".join(line.split()) for line in shown.output):
        if expected in ("", "..."):
            continue
        assert expected in lines[at:], f"{shown.doc}:{shown.line}: shows {expected!r}\n{output}"
        at = lines.index(expected, at) + 1


@pytest.mark.slow
def test_what_the_commands_did(docs_run):
    work, results = docs_run
    out = work / "out"
    assert {n for n in META_FILES if (out / n).is_file()} == set(META_FILES)
    assert (work / "demo_out" / QA_REPORT).is_file()
    assert "VIOLATION" not in results["item-embeddings verify out/"][1]
    runs = results["item-embeddings runs --output-dir out/"][1]
    assert "no local runs" not in runs and "embed-text" in runs
    # The second run-local asked for what the first computed: all of it from the cache.
    assert "reused from the cache of an earlier run" in results[RUN_LOCAL_DEV][1]
    assert "defaultPipelineRoot: gs://B/root" in (work / "item_embeddings.yaml").read_text()


@pytest.mark.slow
def test_every_field_and_column_of_the_outputs_is_documented(docs_run):
    """docs/outputs.md names every key of the meta files and every column of the id files."""
    work, _ = docs_run
    out, documented = work / "out", (ROOT / "docs" / "outputs.md").read_text()
    missing = []
    for name in sorted(META_FILES):
        meta = json.loads((out / name).read_text())
        keys = set(meta) | (set().union(*map(set, meta["spaces"].values()))
                            if name == KNN_META else set())
        missing += [f"{name}: {key}" for key in sorted(keys) if f"`{key}`" not in documented]
    for _, id_file, _, extra in GROUPS.values():
        for file in [id_file, *(f for f in extra if f.endswith(".parquet"))]:
            missing += [f"{file}: {column}" for column in pq.read_schema(out / file).names
                        if f"`{column}`" not in documented]
    assert not missing, "undocumented in docs/outputs.md:\n" + "\n".join(missing)
