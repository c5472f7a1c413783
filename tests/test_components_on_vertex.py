"""Components as they run on Vertex AI: artifacts are gs:// URIs whose files sit on a gcsfuse
mount (simulated by a local folder), and the image step's machine has a GPU it must use."""

import json
import uuid

import numpy as np
import pytest
from kfp import dsl
from kfp.dsl.types import artifact_types

from helpers import catalogue, write_items
from item_embeddings import storage
from item_embeddings.config import PipelineParams
from item_embeddings.outputs import FUSION_CONFIG, TXT_ARRAY, TXT_META
from item_embeddings.runtime import GpuUnavailableError, require_cuda


@pytest.fixture
def vertex_mount(tmp_path, monkeypatch):
    """gs://B/x is read and written at <tmp>/gcs/B/x, as gcsfuse mounts it at /gcs/B/x."""
    mount = tmp_path / "gcs"
    mount.mkdir()
    monkeypatch.setattr(artifact_types, "_GCS_LOCAL_MOUNT_PREFIX", f"{mount}/")
    monkeypatch.setattr(storage, "FUSE_MOUNTS", (f"{mount}/",))
    return mount


def test_text_steps_log_the_gs_artifacts_not_the_staging_dirs(vertex_mount, gcs, tmp_path):
    """A text worker and the text merge on Vertex: files staged locally, then copied to the
    gcsfuse artifact; the experiment runs name the gs:// URIs; the worker's finished shard is
    durable (a retried worker skips it)."""
    from item_embeddings.components.embed_text import embed_text
    from item_embeddings.components.merge_text import merge_text
    from item_embeddings.fanout import plan_shards

    bucket = gcs.create_bucket(f"b-{uuid.uuid4().hex[:8]}")
    local_items = write_items(tmp_path / "items.parquet", catalogue(12))
    bucket.blob("items/items.parquet").upload_from_filename(str(local_items))
    items_uri = f"gs://{bucket.name}/items/items.parquet"
    root = f"gs://{bucket.name}/root/123/item-embeddings-run7"
    plan = plan_shards(items_uri, PipelineParams(shards=2, max_parallel_shards=1))
    shards = dsl.Dataset(name="text_shards", uri=f"{root}/embed-text_1/text_shards", metadata={})
    call = dict(items=dsl.Dataset(name="items", uri=items_uri), text_shards=shards,
                worker={**plan.workers[0], "inputs_fingerprint": "f00d"}, text_backend="torch",
                text_batch_size=8, tracking_backend="local",
                tracking_dir=str(tmp_path / "runs"))
    embed_text(**call)
    runs = tmp_path / "runs" / "recsys-dev"
    record = json.loads((runs / "embed-text-item-embeddings-run7-shard-00001.json").read_text())
    assert record["artifacts"] == {"text_embeddings": f"{shards.uri}/shard-00001"}
    assert record["params"]["items_uri"] == items_uri
    assert shards.metadata["inputs_fingerprint"] == "f00d"
    placed = [vertex_mount / shards.uri[len("gs://"):] / f"shard-0000{i}" / TXT_META
              for i in (0, 1)]
    before = [p.stat().st_mtime_ns for p in placed]
    embed_text(**call)  # a retried worker: both shards were placed, nothing is redone
    assert [p.stat().st_mtime_ns for p in placed] == before
    assert sorted(p.name for p in runs.glob("embed-text-*shard*.json")) == [
        "embed-text-item-embeddings-run7-shard-00000.json",
        "embed-text-item-embeddings-run7-shard-00001.json"]
    assert json.loads((runs / "embed-text-item-embeddings-run7-shard-00000.json").read_text())[
        "status"] == "COMPLETE"

    out_uri = f"{root}/merge-text_2/text_embeddings"
    output = dsl.Dataset(name="text_embeddings", uri=out_uri, metadata={})
    merge_text(text_shards=[shards], text_embeddings=output,
               metrics=dsl.Metrics(name="metrics", uri=f"{root}/merge-text_2/metrics"),
               workers=plan.workers, tracking_backend="local",
               tracking_dir=str(tmp_path / "runs"))
    on_mount = vertex_mount / out_uri[len("gs://"):]
    assert np.load(on_mount / TXT_ARRAY).shape == (12, 384)  # staged, then copied
    assert json.loads((on_mount / TXT_META).read_text())["items_uri"] == items_uri
    record = json.loads((runs / "embed-text-item-embeddings-run7.json").read_text())
    assert record["artifacts"] == {"text_embeddings": out_uri}


def test_fusion_records_its_inputs_gs_uris(vertex_mount, tmp_path):
    from item_embeddings.components.fuse_embeddings import fuse_embeddings
    from item_embeddings.fusion.synthetic import write_synthetic_catalogue

    def artifact(name):
        uri = f"gs://bucket/root/9/item-embeddings-run8/{name}_1/{name}"
        return uri, vertex_mount / uri[len("gs://"):]

    text_uri, text_dir = artifact("text")
    image_uri, image_dir = artifact("image")
    write_synthetic_catalogue(text_dir, image_dir, n=60, seed=1)
    fused_uri, fused_dir = artifact("fused")
    fuse_embeddings(text_embeddings=dsl.Dataset(name="t", uri=text_uri),
                    image_embeddings=dsl.Dataset(name="i", uri=image_uri),
                    fused_embeddings=dsl.Dataset(name="fused", uri=fused_uri, metadata={}),
                    metrics=dsl.Metrics(name="m", uri=fused_uri + "-metrics"),
                    fusion_epochs=1, tracking_backend="none")
    config = json.loads((fused_dir / FUSION_CONFIG).read_text())
    assert (config["text_uri"], config["image_uri"]) == (text_uri, image_uri)


def test_image_step_on_a_gpu_machine_without_a_usable_gpu_fails_before_any_work(tmp_path):
    """Not a silent fallback to 4 vCPUs: the task fails, so its retry gets another VM."""
    from item_embeddings.components.embed_images import embed_images

    items = write_items(tmp_path / "items.parquet", catalogue(6))
    task = tmp_path / "item-embeddings-run9" / "embed-images"
    output = dsl.Dataset(name="image_shards", uri=str(task / "out"), metadata={})
    with pytest.raises(GpuUnavailableError, match="sees no usable GPU.*retry gets another VM"):
        embed_images(items=dsl.Dataset(name="items", uri=str(items)), image_shards=output,
                     require_gpu=True, tracking_backend="none")
    assert not (task / "out").exists() or not any((task / "out").rglob("*.*"))


def test_a_gpu_that_cannot_run_kernels_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    real_ones = torch.ones

    def ones(*args, device=None, **kw):
        if device == "cuda":
            raise RuntimeError("CUDA error: no kernel image is available for execution")
        return real_ones(*args, device=device, **kw)

    monkeypatch.setattr(torch, "ones", ones)
    with pytest.raises(GpuUnavailableError, match="cannot run a CUDA kernel.*Tesla T4.*no kernel"):
        require_cuda("the image step")


@pytest.mark.parametrize("machines,message", [
    ({"text_accelerator": "NVIDIA_TESLA_T4"},
     "parameter 'text_accelerator' NVIDIA_TESLA_T4 attaches to n1 machine types only, but "
     "text_machine_type is 'e2-standard-4' (e.g. text_machine_type=n1-standard-4)"),
    ({"image_machine_type": "e2-standard-8"},
     "parameter 'image_machine_type' 'e2-standard-8' cannot take the image workers' "
     "NVIDIA_TESLA_T4"),
    ({"knn_machine_type": "a2-highgpu-1g"},
     "parameter 'knn_machine_type' 'a2-highgpu-1g' is a GPU machine type"),
    ({"fusion_machine_type": "g2-standard-8"},
     "parameter 'fusion_machine_type' 'g2-standard-8' is a GPU machine type"),
    ({"text_machine_type": "n1_standard_4"},
     "parameter 'text_machine_type' must be a Vertex AI machine type"),
])
def test_a_rerun_asking_for_machines_vertex_cannot_give_fails_the_first_task(
        tmp_path, machines, message):
    """A UI rerun skips the CLI's checks and each custom job sees only its own machine: the
    first task refuses the pairing, in one line naming the parameters, before it reads
    anything (so before any worker starts)."""
    from item_embeddings.components.fingerprint_inputs import fingerprint_inputs
    from item_embeddings.config import ConfigError

    items = dsl.Dataset(name="items", uri=str(tmp_path / "not-read.parquet"))
    with pytest.raises(ConfigError) as refused:
        fingerprint_inputs(items=items, previous_uri="", **machines)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_machines_vertex_can_give_pass_the_first_task(tmp_path):
    from item_embeddings.components.fingerprint_inputs import fingerprint_inputs

    items = dsl.Dataset(name="items", uri=str(write_items(tmp_path / "i.parquet", catalogue(4))))
    default = fingerprint_inputs(items=items, previous_uri="")
    assert fingerprint_inputs(items=items, previous_uri="", text_accelerator="NVIDIA_L4",
                              text_machine_type="g2-standard-8",
                              image_machine_type="n1-highmem-8",
                              knn_machine_type="n2-highmem-32") == default
