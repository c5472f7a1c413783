"""Compile the pipeline and run it whole with kfp.local, as a new user would."""

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import catalogue, check_console_of_a_run, write_items
from item_embeddings.config import PARAM_FIELDS, PipelineParams
from item_embeddings.ops.cli import main
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    FUSION_WEIGHTS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    MANIFEST,
    QA_REPORT,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)

ROOT = Path(__file__).resolve().parents[1]


def test_compile_writes_yaml_that_kfp_loads(tmp_path):
    from kfp import components

    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--output", str(out), "--image", "example.com/img:1",
                 "--gpu-image", "example.com/gpu:1"]) == 0
    spec = yaml.safe_load(out.read_text())
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "item-embeddings"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(PARAM_FIELDS)
    assert params["text_batch_size"]["defaultValue"] == 128
    assert params["id_column"]["defaultValue"] == "asin"
    executors = spec["deploymentSpec"]["executors"]
    containers = [e["container"] for e in executors.values() if "container" in e]
    our_tasks = [c for c in containers if "item_embeddings" in " ".join(c.get("command", []))]
    # Every step is inside a custom job: the first task, the text workers (a CPU and a GPU
    # job), the image workers, fusion, kNN and the report, in our images, nothing installed
    # at task start (the image carries the package).
    assert our_tasks == []
    jobs = [c for c in containers if "--payload" in c.get("args", [])]
    assert len(jobs) == 7
    pools = [c["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]
             for c in spec["components"].values()
             if "worker_pool_specs" in c.get("inputDefinitions", {}).get("parameters", {})]
    assert len(pools) == 7
    images = {s[0]["container_spec"]["image_uri"] for s in pools}
    assert images >= {"example.com/img:1", "example.com/gpu:1"}
    for specs in pools:
        assert not any("pip install" in c for c in specs[0]["container_spec"]["command"])
    text_inputs = spec["root"]["dag"]["tasks"]["fuse-embeddings"]["inputs"]["parameters"]
    assert text_inputs["project"]["runtimeValue"]["constant"] == \
        "{{$.pipeline_google_cloud_project_id}}"


def test_compile_py_is_the_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    subprocess.run([sys.executable, str(ROOT / "compile.py"), "--output", str(out),
                    "--target", "local"], check=True, cwd=tmp_path)
    assert yaml.safe_load(out.read_text())["pipelineInfo"]["name"] == "item-embeddings"


def test_component_python_func(tmp_path, items_path):
    """The text worker (no plan: the whole table as one shard), called as a plain Python
    function, and its shard merged as the fusion task merges it."""
    from kfp import dsl

    from item_embeddings.components.embed_text import embed_text
    from item_embeddings.fanout import WHOLE_TABLE, ShardPlan, merge_text_shards
    from item_embeddings.text.step import TEXT_STEP
    from item_embeddings.tracking import LocalTracker, write_metrics_artifact

    task_dir = tmp_path / "item-embeddings-20261125" / "embed-text"
    shards = dsl.Dataset(name="text_shards", uri=str(task_dir / "text_shards"), metadata={})
    embed_text(items=dsl.Dataset(name="items", uri=str(items_path)), text_shards=shards,
               text_batch_size=32, tracking_backend="local", tracking_dir=str(tmp_path / "runs"),
               log_shard_runs=True)
    assert np.load(task_dir / "text_shards" / "shard-00000" / TXT_ARRAY).shape == (40, 384)
    metrics = dsl.Metrics(name="metrics", uri=str(task_dir / "metrics"), metadata={})
    meta = merge_text_shards([shards.path], ShardPlan.from_workers([WHOLE_TABLE]),
                             task_dir / "text_embeddings", PipelineParams(),
                             run_id="item-embeddings-20261125",
                             tracker=LocalTracker(tmp_path / "runs", "recsys-dev"))
    write_metrics_artifact(metrics, "text", TEXT_STEP.metrics(meta))
    assert np.load(task_dir / "text_embeddings" / TXT_ARRAY).shape == (40, 384)
    assert metrics.metadata["text_count"] == 40
    assert meta["embed_dim"] == 384
    runs = tmp_path / "runs" / "recsys-dev"
    assert (runs / "embed-text-item-embeddings-20261125.json").exists()
    assert (runs / "embed-text-item-embeddings-20261125-shard-00000.json").exists()


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory, tiny_model):
    """The whole DAG with kfp.local: a generated catalogue, images served on 127.0.0.1 (for
    the whole module: some tests run the DAG again)."""
    import pyarrow as pa

    from item_embeddings.sample import SampleImageServer, make_sample_catalogue

    root = tmp_path_factory.mktemp("dag")
    config, checkpoint, _ = tiny_model
    with SampleImageServer() as server:
        table = make_sample_catalogue(36, server.base_url)
        urls = table.column("image_url").to_pylist()
        urls[1] = f"{server.base_url}/img/missing.png"   # 404: a counted failure
        urls[2] = "ftp://example.invalid/x.jpg"          # not http(s): no usable URL
        table = table.set_column(table.schema.get_field_index("image_url"), "image_url",
                                 pa.array(urls))
        items = root / "items.parquet"
        pq.write_table(table, items)
        cfg = root / "cfg.yaml"
        cfg.write_text(f"text_batch_size: 8\nexperiment: test-exp\ntext_backend: torch\n"
                       f"image_model: {config}\nimage_pretrained: {checkpoint}\n"
                       "image_batch_size: 8\nshard_size: 10\ndownload_retries: 0\n"
                       f"fusion_epochs: 2\nfusion_min_steps: 12\n"
                       f"publish_uri: {root / 'published'}\n")
        out = root / "out"
        console, errors = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(console), \
                contextlib.redirect_stderr(errors):
            # as on a user's machine: no hub offline mode, so a task that asked the model hub
            # (the text step's packaged MiniLM must not) would be caught by the network guard
            env.delenv("HF_HUB_OFFLINE", raising=False)
            env.delenv("TRANSFORMERS_OFFLINE", raising=False)
            rc = main(["run-local", "--items", str(items), "--output-dir", str(out),
                       "--config", str(cfg), "--set", "allow_private_hosts=true"])
        assert rc == 0, errors.getvalue()
        # the host stays up for later reruns
        yield items, out, urls, root / "published", console.getvalue() + errors.getvalue()


@pytest.mark.slow
def test_run_local_whole_dag(dag_run, capsys):
    _, out, urls, _, console = dag_run
    n = 36
    expected = {TXT_ARRAY, TXT_ITEMS, TXT_META, IMG_ARRAY, IMG_ITEMS,
                IMG_FAILURES, IMG_META, FUSED_ARRAY, FUSED_ITEMS,
                FUSION_CONFIG, FUSION_WEIGHTS, KNN_TEXT,
                KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES, KNN_META,
                QA_REPORT}
    assert expected <= {p.name for p in out.iterdir()}
    ids = pq.read_table(out / TXT_ITEMS).column("id").to_pylist()
    assert np.load(out / TXT_ARRAY).shape == (n, 384)
    with_url = [u for u in urls if u and u.startswith("http")]
    img = np.load(out / IMG_ARRAY)
    img_meta = json.loads((out / IMG_META).read_text())
    assert img.shape == (len(with_url) - 1, 32)
    assert img_meta["failed_count"] == 1 and img_meta["no_url_count"] == n - len(with_url)
    failures = pq.read_table(out / IMG_FAILURES).to_pylist()
    assert [(f["id"], f["http_status"]) for f in failures] == [(ids[1], 404)]
    fused = np.load(out / FUSED_ARRAY)
    assert fused.shape == (n, 128)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    fused_items = pq.read_table(out / FUSED_ITEMS)
    assert fused_items.column("id").to_pylist() == ids
    assert sum(fused_items.column("has_image").to_pylist()) == img.shape[0]
    # fusion_min_steps from the config file reached the step: 36 items are one batch, so the
    # 2 epochs asked for became 12 (recorded in the config and the experiment run)
    fusion = json.loads((out / FUSION_CONFIG).read_text())
    assert (fusion["epochs"], fusion["min_steps"], fusion["epochs_trained"]) == (2, 12, 12)
    assert len(fusion["loss_history"]) == 12
    assert ("fuse-embeddings | fusion: 36 items make 1 step an epoch; training 12 epochs instead "
            "of 2 for fusion_min_steps=12") in console
    (fuse_run,) = (out / "runs" / "test-exp").glob("fuse-modal-*.json")
    fuse_record = json.loads(fuse_run.read_text())
    assert fuse_record["params"]["min_steps"] == fuse_record["metrics"]["epochs_trained"] == 12
    assert np.load(out / KNN_TEXT).shape == (n, 20)
    assert "<h2" in (out / QA_REPORT).read_text()
    runs = sorted(p.name.split("-item-embeddings")[0] + ("-shard" if "-shard-" in p.name else "")
                  for p in (out / "runs" / "test-exp").glob("*.json"))
    # each step's run, none per shard (log_shard_runs is off): the list a user reads
    assert runs == ["embed-image", "embed-text", "fuse-modal", "knn-graph"]
    for record in (out / "runs" / "test-exp").glob("*.json"):
        assert json.loads(record.read_text())["status"] == "COMPLETE"
    assert main(["runs", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("COMPLETE") == 4


# How far a shards=3 run's floats may be from a shards=1 run's (docs/operations.md, *Many
# workers*): the encoders' per-row results depend on the shape of the batch a row is computed
# in (text padding width, image rows per batch), which shard borders change; measured here:
# text and image vectors 1.1e-7, fused 8.2e-7, kNN scores 3.0e-7.
SHARD_TOLERANCE = 2e-6


def _near_ties(scores: np.ndarray, tolerance: float) -> np.ndarray:
    """[N, k] bool: neighbour positions whose score is within ``tolerance`` of a neighbour
    beside it (their order may swap when the scores move by that much)."""
    close = np.abs(np.diff(scores, axis=1)) <= tolerance
    tied = np.zeros(scores.shape, dtype=bool)
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    return tied


def _fused_by(model_dir: Path, inputs: Path) -> np.ndarray:
    """The fused vectors the fusion model of ``model_dir`` gives the items of ``inputs``."""
    from item_embeddings.fusion.model import load_fusion_model

    ids = pq.read_table(inputs / TXT_ITEMS).column("id").to_pylist()
    img_items = pq.read_table(inputs / IMG_ITEMS)
    row_of = dict(zip(img_items.column("id").to_pylist(), img_items.column("row").to_pylist()))
    img = np.load(inputs / IMG_ARRAY)
    image = np.zeros((len(ids), img.shape[1]), np.float32)
    has = np.array([i in row_of for i in ids])
    image[has] = img[[row_of[i] for i in ids if i in row_of]]
    return load_fusion_model(model_dir).fuse(np.load(inputs / TXT_ARRAY), image, has)


@pytest.mark.slow
def test_each_steps_metrics_artifact_holds_its_experiment_runs_metrics(dag_run):
    """A step's metrics are chosen once (``step.StepKind``): the Metrics artifact the pipeline
    shows and the step's experiment run hold the same keys and values."""
    _, out, _, _, _ = dag_run
    runs = out / "runs" / "test-exp"
    logged = {}
    for task, prefix, run_name in (("fuse-embeddings", "text", "embed-text"),
                                   ("fuse-embeddings", "image", "embed-image"),
                                   ("fuse-embeddings", "fusion", "fuse-modal"),
                                   ("knn-graphs", "knn", "knn-graph")):
        (path,) = [p for p in runs.glob(f"{run_name}-item-embeddings-*.json")
                   if "-shard-" not in p.name]
        record = json.loads(path.read_text())
        pipeline_run = record["run_name"][len(run_name) + 1:]
        artifact = json.loads((out / ".kfp" / pipeline_run / task / "metrics").read_text())
        # the fusion task's Metrics holds the merges' metrics too, each under its prefix
        mine = {k: v for k, v in artifact.items() if k.startswith(f"{prefix}_")}
        assert mine == {f"{prefix}_{k}": v for k, v in record["metrics"].items()}, task
        logged[run_name] = set(record["metrics"])
    # counts that once reached the Metrics artifact only, and times the run only
    assert {"count", "attempted_count", "no_url_count", "failed_count"} <= logged["embed-image"]
    assert {"count", "image_vectors_excluded", "computed_count", "wall_time_sec",
            "best_epoch"} <= logged["fuse-modal"]
    assert {"text_recall_at_k", "text_build_time_sec", "fused_exact"} <= logged["knn-graph"]
    # the shard detail is in the steps' runs (no run per shard by default)
    assert {"fanout_shards", "shard_wall_time_max_sec"} <= logged["embed-text"]
    assert {"fanout_shards", "shard_wall_time_max_sec"} <= logged["embed-image"]


@pytest.mark.slow
def test_three_shards_on_two_workers_equal_one(dag_run, tmp_path, capsys):
    """shards=3 (two workers, one of them running two shards) writes the same files as the
    single shard: the same ids, failures and counts exactly; vectors, scores and what the
    fusion model computes within SHARD_TOLERANCE; the same neighbours but for near-ties."""
    items, out, _, _, _ = dag_run
    sharded = tmp_path / "sharded"
    assert main(["run-local", "--items", str(items), "--output-dir", str(sharded),
                 "--config", str(items.parent / "cfg.yaml"), "--set", "allow_private_hosts=true",
                 "--set", "shards=3", "--set", "max_parallel_shards=2",
                 "--set", "publish_uri="]) == 0
    console = capsys.readouterr().out
    check_console_of_a_run(console, sharded)
    for worker in ("embed-text", "embed-images"):  # two workers each, told apart
        assert re.search(rf"^\d\d:\d\d:\d\d {worker}#2: done in", console, re.M)
        assert re.search(rf"^  {worker}\s+done 2\s+\d+\.\d s$", console, re.M)
    for name in (TXT_ITEMS, IMG_ITEMS, IMG_FAILURES,
                 FUSED_ITEMS):
        one, three = pq.read_table(out / name), pq.read_table(sharded / name)
        assert one.equals(three), name
    for name in (TXT_ARRAY, IMG_ARRAY):
        np.testing.assert_allclose(np.load(sharded / name), np.load(out / name), atol=1e-5)
    for name in (TXT_ARRAY, IMG_ARRAY, FUSED_ARRAY, KNN_TEXT_SCORES,
                 KNN_FUSED_SCORES):
        np.testing.assert_allclose(np.load(sharded / name), np.load(out / name), rtol=0,
                                   atol=SHARD_TOLERANCE, err_msg=name)
    for ids, scores in ((KNN_TEXT, KNN_TEXT_SCORES),
                        (KNN_FUSED, KNN_FUSED_SCORES)):
        one, three = np.load(out / ids), np.load(sharded / ids)
        tied = _near_ties(np.load(out / scores), 2 * SHARD_TOLERANCE)
        assert (one[~tied] == three[~tied]).all(), ids
        assert (np.sort(one, axis=1)[~tied.any(axis=1)] ==
                np.sort(three, axis=1)[~tied.any(axis=1)]).all(), ids
    # the two fusion models compute the same codes (their weights need not be equal
    # elementwise: directions the 36 items do not span are left as PCA happened to start them)
    np.testing.assert_allclose(_fused_by(sharded, out), _fused_by(out, out), rtol=0,
                               atol=SHARD_TOLERANCE)
    one, three = (json.loads((d / IMG_META).read_text()) for d in (out, sharded))
    for key in ("count", "failed_count", "attempted_count", "no_url_count", "capped_count",
                "failures_by_reason", "total_rows"):
        assert one[key] == three[key], key
    assert three["fanout_shards"] == 3
    workers = {p.name for p in (sharded / ".kfp").rglob("shard-0000*") if p.is_dir()
               and p.parent.name == "text_shards"}
    assert workers == {"shard-00000", "shard-00001", "shard-00002"}
    assert main(["verify", str(sharded)]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_run_local_console_summary_and_log(dag_run):
    _, out, _, _, console = dag_run
    check_console_of_a_run(console, out)
    reasons = json.loads((out / IMG_META).read_text())["failures_by_reason"]
    assert list(reasons.values()) == [1]  # the 404
    assert f"failures by reason: {next(iter(reasons))} 1" in console
    assert f"experiment runs: {out / 'runs'} (list them: item-embeddings runs" in console
    assert "did not answer" not in console  # a checkpoint file needs no model hub: no probe


@pytest.mark.slow
def test_second_run_is_served_from_the_cache(dag_run, tmp_path, capsys):
    items, out, _, _, _ = dag_run
    runs_dir = out / "runs" / "test-exp"
    before = sorted(p.name for p in runs_dir.glob("*.json"))
    fused = np.load(out / FUSED_ARRAY)
    args = ["run-local", "--items", str(items), "--output-dir", str(out),
            "--config", str(items.parent / "cfg.yaml"), "--set", "allow_private_hosts=true"]
    assert main(args) == 0  # every step cached: no new experiment runs, same files
    assert sorted(p.name for p in runs_dir.glob("*.json")) == before
    np.testing.assert_array_equal(np.load(out / FUSED_ARRAY), fused)
    console = capsys.readouterr().out
    for task in ("embed-text", "embed-images", "fuse-embeddings"):
        assert f"{task}: reused from the cache of an earlier run" in console
        assert re.search(rf"^  {task}\s+cached$", console, re.M)


@pytest.mark.slow
def test_editing_a_placed_file_cannot_poison_the_cache(dag_run, capsys):
    """The placed files are copies of kfp.local's cached artifacts: a file edited in place
    (as np.memmap or an editor writes) leaves the cache whole, and the next identical run,
    served from the cache, places the right file again."""
    import os

    items, out, _, _, _ = dag_run
    good = {name: (out / name).read_bytes() for name in (TXT_ARRAY, FUSED_ARRAY)}
    for name in good:
        with open(out / name, "r+b") as fh:
            fh.seek(-8, os.SEEK_END)
            fh.write(b"\xff" * 8)
    assert main(["verify", str(out)]) != 0  # damaged
    capsys.readouterr()
    assert main(["run-local", "--items", str(items), "--output-dir", str(out),
                 "--config", str(items.parent / "cfg.yaml"),
                 "--set", "allow_private_hosts=true"]) == 0
    assert "fuse-embeddings: reused from the cache of an earlier run" in capsys.readouterr().out
    for name, data in good.items():
        assert (out / name).read_bytes() == data, name
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_a_catalogue_smaller_than_knn_k_plus_one_gets_k_lowered(tiny_model, tmp_path, capsys):
    """Six items and the default knn_k (20): the run finishes, the kNN step says it lowered k
    to 5 (on the console) and knn_meta.json records k=5 and k_requested=20."""
    from item_embeddings.sample import SampleImageServer, make_sample_catalogue

    config, checkpoint, _ = tiny_model
    out = tmp_path / "out"
    with SampleImageServer() as server:
        items = tmp_path / "items.parquet"
        pq.write_table(make_sample_catalogue(6, server.base_url), items)
        rc = main(["run-local", "--items", str(items), "--output-dir", str(out),
                   "--set", "allow_private_hosts=true", "--set", "text_backend=torch",
                   "--set", f"image_model={config}", "--set", f"image_pretrained={checkpoint}",
                   "--set", "fusion_epochs=2", "--set", "download_retries=0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert re.search(r"^\d\d:\d\d:\d\d knn-graphs \| WARNING knn_k lowered to 5 for 6 items: ",
                     captured.out, re.M)
    meta = json.loads((out / KNN_META).read_text())
    assert (meta["k"], meta["k_requested"], meta["count"]) == (5, 20, 6)
    assert np.load(out / KNN_TEXT).shape == np.load(out / KNN_FUSED).shape == (6, 5)
    assert main(["verify", str(out)]) == 0


@pytest.mark.slow
def test_changed_contents_at_the_same_path_are_recomputed_with_caching_on(dag_run, capsys):
    """A nightly run over the same items_uri whose file changed must not be served the cache."""
    items, out, _, _, _ = dag_run
    runs_dir = out / "runs" / "test-exp"
    before = set(p.name for p in runs_dir.glob("*.json"))
    text_before = np.load(out / TXT_ARRAY)
    table = pq.read_table(items)
    titles = table.column("title").to_pylist()
    titles[0] = "A completely different product: a cast-iron frying pan"
    pq.write_table(table.set_column(table.schema.get_field_index("title"), "title",
                                    pa.array(titles)), items)  # same path, new contents
    args = ["run-local", "--items", str(items), "--output-dir", str(out),
            "--config", str(items.parent / "cfg.yaml"), "--set", "allow_private_hosts=true"]
    assert main(args) == 0  # caching is on (the default)
    text_after = np.load(out / TXT_ARRAY)
    assert not np.array_equal(text_after[0], text_before[0])  # recomputed from the new title
    np.testing.assert_allclose(text_after[1:], text_before[1:], atol=1e-6)
    new_runs = {p.name.split("-item-embeddings")[0]
                for p in runs_dir.glob("*.json") if p.name not in before}
    assert new_runs == {"embed-text", "embed-image", "fuse-modal", "knn-graph"}  # not cached
    capsys.readouterr()


@pytest.mark.slow
def test_verify_passes_on_the_run_and_fails_on_corrupted_copies(dag_run, tmp_path, capsys):
    import shutil

    _, out, _, published, _ = dag_run
    assert main(["verify", str(out)]) == 0
    assert "all checks passed" in capsys.readouterr().out
    # the optional publish step ran (publish_uri set): a complete set with its manifest
    manifest = json.loads((published / MANIFEST).read_text())
    assert {TXT_ARRAY, IMG_ARRAY, FUSED_ARRAY, FUSION_CONFIG} <= set(manifest["files"])
    assert main(["verify", str(published)]) == 0
    assert "all checks passed" in capsys.readouterr().out

    def corrupted(name, change):
        copy = tmp_path / name
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".kfp", "runs"))
        change(copy)
        assert main(["verify", str(copy)]) != 0
        return capsys.readouterr()

    def truncate(d):
        arr = np.load(d / FUSED_ARRAY)
        np.save(d / FUSED_ARRAY, arr[:-3])

    def shuffle_ids(d):
        t = pq.read_table(d / TXT_ITEMS)
        pq.write_table(t.take(np.random.default_rng(0).permutation(t.num_rows)),
                       d / TXT_ITEMS)

    def nan_row(d):
        arr = np.load(d / IMG_ARRAY)
        arr[0] = np.nan
        np.save(d / IMG_ARRAY, arr)

    for name, change, word in [("truncated", truncate, "fused"), ("shuffled", shuffle_ids, "id"),
                               ("nan", nan_row, "NaN")]:
        result = corrupted(name, change)
        assert word in result.out + result.err, name


def test_run_local_bad_table_fails_fast_with_clear_error(tmp_path, capsys):
    cat = catalogue(5)
    cat["asin"][1] = None
    items = write_items(tmp_path / "items.parquet", cat)
    rc = main(["run-local", "--items", str(items), "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'asin' has 1 null id(s), at rows [1]" in err
    assert not (tmp_path / "out" / TXT_ARRAY).exists()


def test_failed_task_is_a_clear_error_without_local_retries(tmp_path, capsys):
    import time

    items = write_items(tmp_path / "items.parquet", catalogue(4))
    started = time.monotonic()
    rc = main(["run-local", "--items", str(items), "--output-dir", str(tmp_path / "out"),
               "--set", "image_pretrained=/nonexistent/weights.pt", "--set", "text_backend=torch"])
    assert rc == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "local pipeline run failed" in err and "embed-images" in err
    # the closing line names the failed task and its exception, not kfp.local's chain
    assert ("item-embeddings run-local: error: local pipeline run failed: task embed-images "
            "failed: ConfigError: image_pretrained '/nonexistent/weights.pt' is neither") in err
    assert " inside '" not in err.splitlines()[-1]
    assert time.monotonic() - started < 120  # no retry backoff locally
    assert not (tmp_path / "out" / FUSED_ARRAY).exists()
    # the console shows the failed task's own error and where the whole log is
    log = tmp_path / "out" / "run.log"
    assert re.search(r"embed-images: FAILED in \d+\.\d s; the last \d+ lines of its output:",
                     err)
    assert ("  | item_embeddings.config.ConfigError: image_pretrained '/nonexistent/weights.pt' "
            "is neither") in err
    assert f"full log: {log}" in err and f"(full log: {log};" in err
    assert "Traceback" in log.read_text() and "executor_input" not in captured.out + err
    assert len((captured.out + err).splitlines()) <= 60


def test_machines_a_rerun_cannot_have_stop_the_run_at_its_first_task(tmp_path, capfd):
    """The pipeline called with parameters the CLI would refuse (as a Vertex UI rerun passes
    them, no CLI in between): the machine parameters reach the first task, which fails with
    the pairing named; no other task starts."""
    from kfp import local

    from item_embeddings.pipeline import build_pipeline

    items = write_items(tmp_path / "items.parquet", catalogue(4))
    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True)
    params = dict(dataclasses.asdict(PipelineParams(items_uri=str(items))),
                  text_accelerator="NVIDIA_TESLA_T4", tracking_backend="none")
    with pytest.raises(RuntimeError, match="fingerprint-inputs"):
        build_pipeline("local")(**params)
    captured = capfd.readouterr()
    out = re.sub(r"\x1b\[[0-9;]*m", "", captured.out + captured.err)  # kfp.local's colours
    assert ("ConfigError: parameter 'text_accelerator' NVIDIA_TESLA_T4 attaches to n1 machine "
            "types only, but text_machine_type is 'e2-standard-4'") in out
    assert re.findall(r"Task '([^']+)' finished with status (\w+)", out) == [
        ("importer", "SUCCESS"), ("fingerprint-inputs", "FAILURE")]
    assert "plan-shards" not in out and "embed-" not in out


@pytest.mark.slow
def test_incremental_nightly_run_on_a_modified_catalogue(dag_run, tiny_model, tmp_path, capsys):
    """The nightly flow under kfp.local: ``previous_uri`` = the published set (published back
    to the same prefix), ``fusion_mode=apply``, on a catalogue with changed, added and deleted
    items; the outputs are a full run's (core full runs on the same catalogue), reused rows are
    the previous set's bytes, and ``verify`` passes."""
    import shutil

    from item_embeddings.image import embed_items_images, load_image_encoder
    from item_embeddings.image.download import DownloadConfig
    from item_embeddings.text import embed_items_text, load_text_encoder

    items, _, urls, published, _ = dag_run
    previous = tmp_path / "previous"  # the set as it was, to compare with
    before = json.loads((published / MANIFEST).read_text())
    shutil.copytree(published / before["set"], previous)
    rows = pq.read_table(items).to_pylist()  # the catalogue the published set was made from
    base = urls[0].rsplit("/img/", 1)[0]
    deleted = {rows[4]["asin"], rows[5]["asin"]}
    rows[0]["title"] = "Nightly change: a cordless drill with two batteries"
    rows[6]["title"] = "Nightly change: a garden hose reel, 30 m"
    rows[8]["image_url"] = f"{base}/img/900.jpg"
    rows = [r for r in rows if r["asin"] not in deleted]
    rows.insert(3, {**rows[3], "asin": "S900001", "title": "Added: a ceramic tea pot",
                    "image_url": f"{base}/img/901.png"})
    rows.append({**rows[3], "asin": "S900002", "title": "Added: a yoga mat", "image_url": None})
    changed = {rows[0]["asin"], "S000006", "S000008", "S900001", "S900002"}
    items_b = tmp_path / "items_b.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(items)), items_b)

    out = tmp_path / "out"
    assert main(["run-local", "--items", str(items_b), "--output-dir", str(out),
                 "--config", str(items.parent / "cfg.yaml"), "--set", "allow_private_hosts=true",
                 "--previous", str(published), "--set", "fusion_mode=apply"]) == 0
    n = len(rows)
    text_meta = json.loads((out / TXT_META).read_text())
    image_meta = json.loads((out / IMG_META).read_text())
    fusion_meta = json.loads((out / FUSION_CONFIG).read_text())
    selected = sum(1 for r in rows if (r["image_url"] or "").startswith("http"))
    assert (text_meta["reused_count"], text_meta["encoded_count"]) == (n - 4, 4)
    # new URLs encoded; the 404 of the previous set tried again (and failing again)
    assert (image_meta["encoded_count"], image_meta["failed_count"],
            image_meta["reused_count"]) == (2, 1, selected - 3)
    assert (fusion_meta["reused_count"], fusion_meta["computed_count"]) == (n - 5, 5)
    assert (out / FUSION_WEIGHTS).read_bytes() == \
        (previous / FUSION_WEIGHTS).read_bytes()
    record = next((out / "runs" / "test-exp").glob("embed-text-*.json"))
    assert json.loads(record.read_text())["metrics"]["reused_count"] == n - 4

    # What a full run writes, from the core steps on the same catalogue and settings.
    config, checkpoint, _ = tiny_model
    full = tmp_path / "full"
    embed_items_text(str(items_b), full, encoder=load_text_encoder(batch_size=8))
    embed_items_images(str(items_b), full, PipelineParams(image_model=str(config),
                                                          image_pretrained=str(checkpoint)),
                       encoder=load_image_encoder(str(config), str(checkpoint)),
                       download_config=DownloadConfig(retries=0, allow_private_hosts=True))
    for name, vectors, atol in [("txt", TXT_ARRAY, 1e-5), ("img", IMG_ARRAY, 1e-6)]:
        assert pq.read_table(out / f"{name}_items.parquet").equals(
            pq.read_table(full / f"{name}_items.parquet"))
        np.testing.assert_allclose(np.load(out / vectors), np.load(full / vectors), atol=atol)
    assert pq.read_table(out / IMG_FAILURES).equals(
        pq.read_table(full / IMG_FAILURES))
    assert pq.read_table(out / TXT_ITEMS).column("id").to_pylist() == \
        [r["asin"] for r in rows]

    # Reused rows are the previous set's bytes: text by key, fused codes by unchanged id.
    prev_keys = pq.read_table(previous / TXT_ITEMS).column("key").to_pylist()
    prev_txt = np.load(previous / TXT_ARRAY)
    txt = np.load(out / TXT_ARRAY)
    keys = pq.read_table(out / TXT_ITEMS).column("key").to_pylist()
    for row, key in enumerate(keys):
        if key in prev_keys:
            assert txt[row].tobytes() == prev_txt[prev_keys.index(key)].tobytes()
    prev_ids = pq.read_table(previous / FUSED_ITEMS).column("id").to_pylist()
    prev_fused, fused = np.load(previous / FUSED_ARRAY), np.load(out / FUSED_ARRAY)
    for row, r in enumerate(rows):
        if r["asin"] not in changed:
            assert fused[row].tobytes() == prev_fused[prev_ids.index(r["asin"])].tobytes()

    # kNN graphs updated from the published ones: what a full rebuild gives. At 36 items and
    # k = 20 every list held a deleted or changed item, so no row is reused this night.
    knn_meta = json.loads((out / KNN_META).read_text())
    for space, info in knn_meta["spaces"].items():
        assert (info["method"], info["update"], info["rebuild_reason"]) == \
            ("exact", "incremental", None), space
        assert info["recomputed_count"] + info["reused_count"] == n
        assert info["incremental"]["changed_count"] == len(changed if space == "fused" else
                                                           changed - {"S000008"})
        assert info["drift"]["items"] == n - len(changed)
    assert_knn_is_a_full_rebuild(out, tmp_path / "knn-full")
    report = (out / QA_REPORT).read_text()
    assert "Night-over-night drift" in report and "mean top-20 overlap" in report

    manifest = json.loads((published / MANIFEST).read_text())
    assert manifest["counts"]["text_count"] == n  # the new set is the published one now
    # the run read the set the pointer named when it started (its first task pinned it)
    assert text_meta["previous_uri"] == str(published / before["set"]).rstrip("/")
    assert manifest["history"][:2] == [manifest["set"], before["set"]]  # before: kept
    assert main(["verify", str(out)]) == 0 and main(["verify", str(published)]) == 0
    assert capsys.readouterr().out.count("all checks passed") == 2

    # The next night, from this run's own output folder: one title changed, rows reused.
    rows[10]["title"] = "Nightly change: a steel water bottle, 750 ml"
    items_c = tmp_path / "items_c.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(items)), items_c)
    assert main(["run-local", "--items", str(items_c), "--output-dir", str(tmp_path / "out-c"),
                 "--config", str(items.parent / "cfg.yaml"), "--set", "allow_private_hosts=true",
                 "--previous", str(out), "--set", "fusion_mode=apply"]) == 0
    knn_meta = json.loads((tmp_path / "out-c" / KNN_META).read_text())
    for space, info in knn_meta["spaces"].items():
        assert info["update"] == "incremental" and info["incremental"]["changed_count"] == 1
        assert info["recomputed_count"] + info["reused_count"] == n
        assert info["drift"]["items"] == n - 1 and info["drift"]["mean_overlap"] > 0.9
        # A list is reused unless the changed item was in it last night or is in it now (the
        # row ids are the same both nights): exactly those rows, and the item's own, are made.
        graph_file = KNN_TEXT if space == "text" else KNN_FUSED
        before, now = (np.load(folder / graph_file) == 10 for folder in (out, tmp_path / "out-c"))
        untouched = ~(before | now).any(axis=1)
        untouched[10] = False
        assert info["reused_count"] == untouched.sum(), space
    # at 36 items the changed item's new fused code may enter every fused list; the text
    # space's lists are reused
    assert knn_meta["spaces"]["text"]["reused_count"] > 0
    assert_knn_is_a_full_rebuild(tmp_path / "out-c", tmp_path / "knn-full-c")


def assert_knn_is_a_full_rebuild(out: Path, full: Path) -> None:
    """The kNN graphs of a run's flat output folder equal a full build on its vectors."""
    from item_embeddings.knn import build_knn_graphs

    meta = build_knn_graphs(out, out, full, PipelineParams())
    assert {s["update"] for s in meta["spaces"].values()} == {"full"}
    for name in ("knn_text", "knn_fused"):
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"),
                                      np.load(full / f"{name}.npy"))
        np.testing.assert_allclose(np.load(out / f"{name}_scores.npy"),
                                   np.load(full / f"{name}_scores.npy"), atol=1e-6)
