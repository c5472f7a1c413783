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
from item_embeddings.outputs import FUSED_ARRAY, FUSION_CONFIG, TXT_ARRAY, TXT_META
from item_embeddings.runtime import GpuUnavailableError, require_cuda


@pytest.fixture
def vertex_mount(tmp_path, monkeypatch):
    """gs://B/x is read and written at <tmp>/gcs/B/x, as gcsfuse mounts it at /gcs/B/x."""
    mount = tmp_path / "gcs"
    mount.mkdir()
    monkeypatch.setattr(artifact_types, "_GCS_LOCAL_MOUNT_PREFIX", f"{mount}/")
    monkeypatch.setattr(storage, "FUSE_MOUNTS", (f"{mount}/",))
    return mount


def _plan_on_gcs(gcs, tmp_path, server):
    """Items on the emulator's gs:// (12 items, images on the loopback host) and a plan of 2
    shards on one worker per step."""
    from item_embeddings.fanout import plan_shards

    bucket = gcs.create_bucket(f"b-{uuid.uuid4().hex[:8]}")
    cat = catalogue(12)
    names = ["rgb.jpg", "palette.png", "rgba.png"]
    cat["image_url"] = [server.url(f"img/{names[i % 3]}") if i % 4 else None for i in range(12)]
    local_items = write_items(tmp_path / "items.parquet", cat)
    bucket.blob("items/items.parquet").upload_from_filename(str(local_items))
    items_uri = f"gs://{bucket.name}/items/items.parquet"
    plan = plan_shards(items_uri, PipelineParams(shards=2, max_parallel_shards=1))
    return bucket, items_uri, plan


def test_workers_and_fusion_log_the_gs_artifacts_not_the_staging_dirs(vertex_mount, gcs,
                                                                      tmp_path, tiny_model):
    """A text and an image worker, then fusion (which merges their shards first), on Vertex:
    files staged locally, then copied to the gcsfuse artifacts; the experiment runs name the
    gs:// URIs; the workers' finished shards are durable (a retried worker skips them). A shard
    logs a run of its own only with log_shard_runs."""
    from image_server import ImageServer
    from item_embeddings.components.embed_images import embed_images
    from item_embeddings.components.embed_text import embed_text
    from item_embeddings.components.fuse_embeddings import fuse_embeddings

    config, checkpoint, _ = tiny_model
    runs = tmp_path / "runs" / "recsys-dev"
    tracking = dict(tracking_backend="local", tracking_dir=str(tmp_path / "runs"))
    with ImageServer() as server:
        bucket, items_uri, plan = _plan_on_gcs(gcs, tmp_path, server)
        root = f"gs://{bucket.name}/root/123/item-embeddings-run7"
        items = dsl.Dataset(name="items", uri=items_uri)
        shards = dsl.Dataset(name="text_shards", uri=f"{root}/embed-text_1/text_shards",
                             metadata={})
        call = dict(items=items, text_shards=shards, text_backend="torch", text_batch_size=8,
                    worker={**plan.workers[0], "inputs_fingerprint": "f00d"}, **tracking)
        embed_text(**call)
        assert not list(runs.glob("*shard*.json"))  # by default no run per shard
        assert shards.metadata["inputs_fingerprint"] == "f00d"
        placed = [vertex_mount / shards.uri[len("gs://"):] / f"shard-0000{i}" / TXT_META
                  for i in (0, 1)]
        before = [p.stat().st_mtime_ns for p in placed]
        embed_text(**call, log_shard_runs=True)  # a retried worker: both placed, none redone
        assert [p.stat().st_mtime_ns for p in placed] == before
        assert not list(runs.glob("embed-text-*shard*.json"))
        image_shards = dsl.Dataset(name="image_shards",
                                   uri=f"{root}/embed-images_1/image_shards", metadata={})
        embed_images(items=items, image_shards=image_shards, image_model=str(config),
                     image_pretrained=str(checkpoint), download_retries=0,
                     allow_private_hosts=True, worker=plan.image_workers[0],
                     log_shard_runs=True, **tracking)
    record = json.loads((runs / "embed-image-item-embeddings-run7-shard-00001.json").read_text())
    assert record["artifacts"] == {"image_embeddings": f"{image_shards.uri}/shard-00001"}
    assert record["params"]["items_uri"] == items_uri and record["status"] == "COMPLETE"

    outputs = {name: dsl.Dataset(name=name, uri=f"{root}/fuse-embeddings_2/{name}",
                                 metadata={})
               for name in ("text_embeddings", "image_embeddings", "fused_embeddings")}
    metrics = dsl.Metrics(name="metrics", uri=f"{root}/fuse-embeddings_2/metrics")
    fuse_embeddings(text_shards=[shards], image_shards=[image_shards], **outputs,
                    metrics=metrics, workers=plan.workers, image_workers=plan.image_workers,
                    fusion_epochs=1, **tracking)
    on_mount = {name: vertex_mount / a.uri[len("gs://"):] for name, a in outputs.items()}
    assert np.load(on_mount["text_embeddings"] / TXT_ARRAY).shape == (12, 384)  # staged, copied
    assert json.loads((on_mount["text_embeddings"] / TXT_META).read_text())["items_uri"] == \
        items_uri
    assert np.load(on_mount["fused_embeddings"] / FUSED_ARRAY).shape == (12, 128)
    fusion = json.loads((on_mount["fused_embeddings"] / FUSION_CONFIG).read_text())
    # fusion read the merged files where the merges wrote them, and names their gs:// URIs
    assert (fusion["text_uri"], fusion["image_uri"]) == (outputs["text_embeddings"].uri,
                                                         outputs["image_embeddings"].uri)
    for step, output in (("embed-text", "text_embeddings"), ("embed-image", "image_embeddings"),
                         ("fuse-modal", "fused_embeddings")):
        record = json.loads((runs / f"{step}-item-embeddings-run7.json").read_text())
        assert list(record["artifacts"].values()) == [outputs[output].uri], step
    # one Metrics artifact holds the three steps' metrics, each under its prefix, the shard
    # detail included
    assert {"text_count", "image_count", "fusion_count"} <= set(metrics.metadata)
    assert metrics.metadata["text_fanout_shards"] == metrics.metadata["image_fanout_shards"] == 2
    assert metrics.metadata["text_shard_wall_time_max_sec"] > 0


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
