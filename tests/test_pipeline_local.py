"""Compile the pipeline and run it whole with kfp.local, as a new user would."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import catalogue, write_items
from item_embeddings.cli import main
from item_embeddings.config import PARAM_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def test_compile_writes_yaml_that_kfp_loads(tmp_path):
    from kfp import components

    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--output", str(out), "--image", "example.com/img:1"]) == 0
    spec = yaml.safe_load(out.read_text())
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "item-embeddings"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(PARAM_FIELDS)
    assert params["text_batch_size"]["defaultValue"] == 128
    assert params["id_column"]["defaultValue"] == "asin"
    executors = spec["deploymentSpec"]["executors"]
    images = {e["container"]["image"] for e in executors.values()}
    assert images == {"example.com/img:1"}
    # No pip install at task start: the image carries the package.
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())
    text_inputs = spec["root"]["dag"]["tasks"]["embed-text"]["inputs"]["parameters"]
    assert text_inputs["project"]["runtimeValue"]["constant"] == \
        "{{$.pipeline_google_cloud_project_id}}"


def test_compile_py_is_the_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    subprocess.run([sys.executable, str(ROOT / "compile.py"), "--output", str(out),
                    "--target", "local"], check=True, cwd=tmp_path)
    assert yaml.safe_load(out.read_text())["pipelineInfo"]["name"] == "item-embeddings"


def test_component_python_func(tmp_path, items_path):
    from kfp import dsl

    from item_embeddings.components.embed_text import embed_text

    task_dir = tmp_path / "item-embeddings-20261125" / "embed-text"
    data = dsl.Dataset(name="text_embeddings", uri=str(task_dir / "text_embeddings"), metadata={})
    metrics = dsl.Metrics(name="metrics", uri=str(task_dir / "metrics"), metadata={})
    embed_text(items_uri=str(items_path), text_embeddings=data, metrics=metrics,
               text_batch_size=32, tracking_backend="local", tracking_dir=str(tmp_path / "runs"))
    assert np.load(task_dir / "text_embeddings" / "txt.npy").shape == (40, 384)
    assert metrics.metadata["text_count"] == 40
    assert data.metadata["embed_dim"] == 384
    assert (tmp_path / "runs" / "recsys-dev" / "embed-text-item-embeddings-20261125.json").exists()


@pytest.mark.slow
def test_run_local_whole_pipeline(tmp_path, capsys):
    items = write_items(tmp_path / "items.parquet", catalogue(25))
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("text_batch_size: 8\nexperiment: test-exp\n")
    rc = main(["run-local", "--items", str(items), "--output-dir", str(out), "--config", str(cfg)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "txt.npy" in printed and str(out) in printed
    arr = np.load(out / "txt.npy")
    assert arr.shape == (25, 384)
    ids = pq.read_table(out / "txt_items.parquet").column("id").to_pylist()
    assert ids == catalogue(25)["asin"]
    meta = json.loads((out / "txt_meta.json").read_text())
    assert meta["count"] == 25 and meta["batch_size"] == 8
    runs = list((out / "runs" / "test-exp").glob("embed-text-*.json"))
    assert len(runs) == 1
    assert json.loads(runs[0].read_text())["status"] == "COMPLETE"
    assert main(["runs", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "embed-text-" in table and "COMPLETE" in table and "count=25" in table


def test_run_local_bad_table_fails_fast_with_clear_error(tmp_path, capsys):
    cat = catalogue(5)
    cat["asin"][1] = None
    items = write_items(tmp_path / "items.parquet", cat)
    rc = main(["run-local", "--items", str(items), "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'asin' has 1 null id(s), at rows [1]" in err
    assert not (tmp_path / "out" / "txt.npy").exists()
