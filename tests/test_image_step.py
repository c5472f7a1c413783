"""The image step end to end: a real loopback image host, a tiny real open_clip model, resume."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from image_server import ImageServer, make_images
from item_embeddings import image as im
from item_embeddings.config import PipelineParams
from item_embeddings.image import download as dl
from item_embeddings.image.download import DownloadConfig
from item_embeddings.items import ItemsError
from item_embeddings.outputs import IMG_ARRAY, IMG_FAILURES, IMG_ITEMS, IMG_META
from item_embeddings.storage import sha256_file
from item_embeddings.tracking import LocalTracker

FAST = DownloadConfig(timeout_s=0.6, retries=1, backoff_base_s=0.01, allow_private_hosts=True)
# Keys of img_meta.json that are measurements of one attempt (or where it kept its shards).
TIMING_KEYS = {"throughput_items_per_sec", "encode_only_items_per_sec", "encode_time_sec",
               "download_time_sec_total", "downloaded_bytes", "wall_time_sec",
               "encoded_this_attempt", "resumed_shards", "checkpoint_location",
               "download_wall_s", "decode_cpu_s", "encode_wall_s"}


@pytest.fixture(scope="module")
def encoder(tiny_model):
    config, checkpoint, _ = tiny_model
    return im.load_image_encoder(str(config), str(checkpoint))


@pytest.fixture(scope="module")
def images():
    return make_images()


@pytest.fixture(scope="module")
def server(images):
    with ImageServer(images, slow_s=2.0) as srv:
        yield srv


def items_with_urls(path: Path, urls: list, ids: list | None = None) -> Path:
    ids = ids if ids is not None else [f"item-{i:03d}" for i in range(len(urls))]
    pq.write_table(pa.table({"asin": ids, "title": ["a title"] * len(ids),
                             "description": [["a", "description"]] * len(ids),
                             "image_url": pa.array(urls, pa.string())}), path)
    return path


# ----------------------------------------------------------------------------- model loading

def test_tiny_checkpoint_loads_through_open_clip(tiny_model, encoder):
    import torch

    config, checkpoint, state = tiny_model
    assert encoder.resolved.model_name == "tiny-vit-test"
    assert encoder.resolved.pretrained == str(checkpoint)
    assert encoder.resolved.weights_sha256 == sha256_file(checkpoint)
    assert encoder.dim == 32 and encoder.device == "cpu" and encoder.dtype == "float32"
    loaded = encoder.model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # A registered name works as well as the config file.
    assert im.resolve_image_model("tiny-vit-test", str(checkpoint)).model_name == "tiny-vit-test"


def test_pretrained_none_and_bad_values(tiny_model):
    config, checkpoint, _ = tiny_model
    assert im.resolve_image_model(str(config), "none").pretrained is None
    openai = im.resolve_image_model("ViT-B-32", "openai")
    assert openai.pretrained == "openai" and openai.quick_gelu  # OpenAI weights use QuickGELU
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        im.resolve_image_model("ViT-B-32", "/no/such/checkpoint.pt")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        im.resolve_image_model("ViT-Nope", "none")
    with pytest.raises(FileNotFoundError):
        im.resolve_image_model("/no/such/config.json", "none")


def test_gs_checkpoint_and_gs_shards(tiny_model, server, tmp_path, gcs, monkeypatch):
    """A gs:// checkpoint is fetched and loaded; shards go to a gs:// checkpoint_uri and resume."""
    config, checkpoint, _ = tiny_model
    monkeypatch.setenv("ITEM_EMBEDDINGS_CACHE", str(tmp_path / "cache"))
    name = f"img-step-{uuid.uuid4().hex[:8]}"
    gcs.create_bucket(name).blob("models/tiny.pt").upload_from_filename(str(checkpoint))
    encoder = im.load_image_encoder(str(config), f"gs://{name}/models/tiny.pt")
    assert encoder.resolved.weights_sha256 == sha256_file(checkpoint)

    items = items_with_urls(tmp_path / "items.parquet", [
        server.url(f"img/{n}") for n in ("rgb.jpg", "photo.webp", "anim.gif")])
    kwargs = dict(params=PipelineParams(image_model=str(config),
                                        image_pretrained=f"gs://{name}/models/tiny.pt",
                                        shard_size=2, checkpoint_uri=f"gs://{name}/ckpt"),
                  download_config=FAST, run_id="gcs", encoder=encoder)
    first = im.embed_items_images(str(items), tmp_path / "a", **kwargs)
    names = sorted(b.name for b in gcs.list_blobs(name, prefix="ckpt/"))
    assert [n.rsplit("/", 1)[1] for n in names] == ["settings.json", "shard-00000.parquet",
                                                     "shard-00001.parquet"]
    assert first["checkpoint_location"] == f"gs://{name}/ckpt/{first['fingerprint'][:16]}"
    blobs = {b.name.rsplit("/", 1)[1]: b for b in gcs.list_blobs(name, prefix="ckpt/")}
    assert blobs["settings.json"].content_type == "application/json"
    assert blobs["shard-00000.parquet"].content_type == "application/octet-stream"
    text = blobs["settings.json"].download_as_text()
    payload = json.loads(text)
    assert payload["fingerprint"] == first["fingerprint"]
    assert text == json.dumps(payload, indent=2, sort_keys=True)  # for people to read
    # the same prefix written with a trailing slash: the same shards
    kwargs["params"] = dataclass_replace(kwargs["params"], checkpoint_uri=f"gs://{name}/ckpt/")
    second = im.embed_items_images(str(items), tmp_path / "b", **kwargs)
    assert (first["count"], second["resumed_shards"]) == (3, 2)
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")


# ----------------------------------------------------------------------------- decoding

def test_preprocessing_matches_open_clip(encoder, images):
    """uint8 from the decode pool + batched ToTensor/Normalize == open_clip's composed transform."""
    import open_clip
    import torch

    _, _, preprocess = open_clip.create_model_and_transforms("tiny-vit-test")
    for name in ("rgb.jpg", "photo.webp", "grey.jpg"):
        body = images[name][0]
        pixels = im.decode_image(body, encoder.pil_transform)
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
        ours = encoder.encode(pixels[None])
        with torch.inference_mode():
            ref = encoder.model.encode_image(preprocess(Image.open(io.BytesIO(body)))[None])
            ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)
        assert ours.dtype == np.float32


def test_modes_become_rgb(encoder, images):
    for name in ("cmyk.jpg", "grey.jpg", "palette.png", "rgba.png", "grey16.png", "anim.gif",
                 "octet.jpg"):
        pixels = im.decode_image(images[name][0], encoder.pil_transform)
        assert pixels.shape == (32, 32, 3), name
    # 16-bit grey is scaled to 8 bits, not clipped to white.
    grey16 = im.to_rgb(Image.open(io.BytesIO(images["grey16.png"][0])))
    assert grey16.mode == "RGB" and 0 < np.asarray(grey16).mean() < 200
    # Transparent pixels are composited on white.
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(im.to_rgb(clear)).tolist() == [[[255, 255, 255]] * 4] * 4
    # An animated GIF gives its first frame.
    gif = Image.open(io.BytesIO(images["anim.gif"][0]))
    gif.seek(1)
    first = np.asarray(im.to_rgb(gif))
    gif.seek(0)
    assert np.array_equal(first, np.asarray(gif.convert("RGB")))


@pytest.mark.parametrize("name,reason", [("truncated.jpg", im.DECODE_ERROR),
                                         ("bomb.png", im.DECOMPRESSION_BOMB),
                                         ("notimage.jpg", dl.NOT_AN_IMAGE)])
def test_bad_bodies_are_reasons(encoder, images, name, reason):
    with pytest.raises(im.ImageDecodeError) as info:
        im.decode_image(images[name][0], encoder.pil_transform)
    assert info.value.reason == reason


def test_pillow_bomb_error_is_a_reason(encoder, images, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own guard trips first
    with pytest.raises(im.ImageDecodeError) as info:
        im.decode_image(images["rgb.jpg"][0], encoder.pil_transform, max_pixels=10**9)
    assert info.value.reason == im.DECOMPRESSION_BOMB


@pytest.mark.parametrize("value,expected", [
    ("https://x.com/a.jpg", "https://x.com/a.jpg"), ("  HTTP://x.com/a.jpg ", "HTTP://x.com/a.jpg"),
    (None, None), ("", None), ("ftp://x.com/a.jpg", None), ("x.com/a.jpg", None),
    ("http://", None)])
def test_usable_url(value, expected):
    assert im.usable_url(value) == expected


# ----------------------------------------------------------------------------- the whole step

EXPECTED = {  # path -> failure reason (None: embedded)
    "img/rgb.jpg": None, "img/cmyk.jpg": None, "img/grey.jpg": None, "img/palette.png": None,
    "img/rgba.png": None, "img/grey16.png": None, "img/photo.webp": None,
    "img/anim.gif": None, "img/octet.jpg": None, "flaky/step": None, "ratelimited/step": None,
    "status/404": dl.HTTP_ERROR, "status/500": dl.HTTP_ERROR, "slow": dl.TIMEOUT,
    "stall": dl.TIMEOUT, "big": dl.TOO_LARGE, "html": dl.NOT_AN_IMAGE,
    "img/truncated.jpg": im.DECODE_ERROR, "img/bomb.png": im.DECOMPRESSION_BOMB,
    "img/notimage.jpg": dl.NOT_AN_IMAGE, "loop/a": dl.REDIRECT_LOOP,
    "chain/6": dl.TOO_MANY_REDIRECTS, "to?location=file:///etc/passwd": dl.UNSUPPORTED_SCHEME,
}
NO_URL = [None, "", "ftp://example.com/a.jpg", "not a url"]


def test_step_end_to_end(encoder, server, images, tiny_model, tmp_path, caplog):
    config, checkpoint, _ = tiny_model
    paths = list(EXPECTED)
    urls = [server.url(p) for p in paths]
    urls[3:3] = NO_URL  # rows without a usable URL in the middle of the table
    items = items_with_urls(tmp_path / "items.parquet", urls)
    ids = [f"item-{i:03d}" for i in range(len(urls))]
    tracker = LocalTracker(tmp_path / "runs", "recsys-test")
    with caplog.at_level(logging.INFO, logger="item_embeddings.image.step"):
        meta = im.embed_items_images(
            str(items), tmp_path / "out",
            PipelineParams(image_model=str(config), image_pretrained=str(checkpoint),
                           image_batch_size=3, shard_size=5),
            download_config=dataclass_replace(FAST, max_bytes=1024 * 1024), run_id="run-42",
            tracker=tracker, encoder=encoder)
    out = tmp_path / "out"
    assert caplog.messages[-1] == (
        f"embedded {meta['count']} images ({meta['failed_count']} failed, 4 without URL) in "
        f"{meta['wall_time_sec']:.1f}s -> {out}")

    embedded = pq.read_table(out / IMG_ITEMS).to_pylist()
    failures = pq.read_table(out / IMG_FAILURES).to_pylist()
    vectors = np.load(out / IMG_ARRAY)
    selected = [i for i, u in zip(ids, urls) if u not in NO_URL]
    url_of = dict(zip(ids, urls))

    # Every attempted id is in exactly one of the two tables; counts add up.
    assert meta["attempted_count"] == len(selected) == meta["count"] + meta["failed_count"]
    got_ids = [r["id"] for r in embedded] + [r["id"] for r in failures]
    assert sorted(got_ids) == sorted(selected) and len(set(got_ids)) == len(got_ids)
    assert meta["no_url_count"] == len(NO_URL) and meta["total_rows"] == len(urls)

    # Each item ends as expected; failures carry reason, status and attempts.
    reason_of = {r["id"]: r["reason"] for r in failures}
    for item_id in selected:
        path = url_of[item_id].split(f":{server.port}/", 1)[1]
        assert reason_of.get(item_id) == EXPECTED[path], (path, reason_of.get(item_id))
    by_path = {url_of[r["id"]].split(f":{server.port}/", 1)[1]: r for r in failures}
    assert (by_path["status/404"]["http_status"], by_path["status/404"]["attempts"]) == (404, 1)
    assert (by_path["status/500"]["http_status"], by_path["status/500"]["attempts"]) == (500, 2)
    assert by_path["slow"]["attempts"] == 2 and by_path["slow"]["http_status"] is None
    assert all(r["detail"] for r in failures)
    expected_reasons = collections.Counter(r for r in EXPECTED.values() if r)
    assert meta["failures_by_reason"] == dict(expected_reasons)
    assert list(meta["failures_by_reason"]) == sorted(expected_reasons)
    # items that needed a second attempt: failures, and the two embedded on their retry
    assert meta["retried_items"] == sum(r["attempts"] > 1 for r in failures) + 2

    # img.npy is aligned with img_items (input order), float32, unit length, and holds the
    # encoder's vector of each image.
    assert [r["row"] for r in embedded] == list(range(len(embedded)))
    assert [r["id"] for r in embedded] == [i for i in selected if i not in reason_of]
    assert vectors.dtype == np.float32 and vectors.shape == (meta["count"], 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for row in embedded:
        path = row["url"].split(f":{server.port}/", 1)[1]
        name = {"flaky/step": "rgb.jpg", "ratelimited/step": "photo.webp"}.get(path,
                                                                             path[len("img/"):])
        expected = encoder.encode(encoder.decoder("fast")(images[name][0])[None])  # the default
        np.testing.assert_allclose(vectors[row["row"]], expected[0], atol=1e-5)

    # Metadata and the experiment run.
    for key in ("encoder_name", "embed_dim", "count", "failed_count", "throughput_items_per_sec",
                "encode_time_sec", "run_id", "device", "attempted_count", "max_items",
                "no_url_count", "failures_by_reason"):
        assert key in meta
    assert json.loads((out / IMG_META).read_text()) == json.loads(json.dumps(meta))
    assert meta["shards"] == 5 and meta["resumed_shards"] == 0 and meta["embed_dim"] == 32
    assert meta["weights_sha256"] == sha256_file(checkpoint)
    assert meta["encode_time_sec"] > 0 and meta["encoded_this_attempt"] == meta["count"]
    assert meta["encode_only_items_per_sec"] == pytest.approx(
        meta["count"] / meta["encode_time_sec"])
    record = json.loads((tmp_path / "runs" / "recsys-test" / "embed-image-run-42.json").read_text())
    assert record["status"] == "COMPLETE"
    assert {"model_name", "max_items", "download_concurrency",
            "batch_size"} <= set(record["params"])
    assert record["metrics"]["count"] == meta["count"]
    assert record["metrics"]["failed_count"] == meta["failed_count"]
    assert "throughput_items_per_sec" in record["metrics"]


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_cap_and_guard_on(encoder, server, tmp_path, tiny_model):
    """max_items caps the selection in input order; the default guard refuses 127.0.0.1."""
    config, checkpoint, _ = tiny_model
    urls = [server.url("img/rgb.jpg")] * 2 + [None] + [server.url("img/photo.webp")] * 5
    items = items_with_urls(tmp_path / "items.parquet", urls)
    hits_before = server.hits["/img/rgb.jpg"]
    tracker = LocalTracker(tmp_path / "runs", "cap")
    meta = im.embed_items_images(str(items), tmp_path / "out",
                                 PipelineParams(image_model=str(config),
                                                image_pretrained=str(checkpoint), max_items=4,
                                                download_timeout_s=1, download_retries=0,
                                                download_concurrency=3, image_batch_size=2),
                                 encoder=encoder, run_id="cap", tracker=tracker)
    record = json.loads((tmp_path / "runs" / "cap" / "embed-image-cap.json").read_text())
    assert record["params"] == {"model_name": str(config), "pretrained": str(checkpoint),
                                "max_items": 4, "download_concurrency": 3, "batch_size": 2,
                                "items_uri": str(items), "image_decode": "fast",
                                "previous_uri": "",
                                "image_revalidate": False, "retry_failed_images": True,
                                "download_rate_per_host": 50.0, "host_failure_limit": 20,
                                "respect_opt_out": True, "respect_robots_txt": False}
    assert meta["max_items"] == 4
    failures = pq.read_table(tmp_path / "out" / IMG_FAILURES).to_pylist()
    assert [r["id"] for r in failures] == ["item-000", "item-001", "item-003", "item-004"]
    assert {r["reason"] for r in failures} == {dl.BLOCKED_ADDRESS}
    assert (meta["attempted_count"], meta["count"], meta["capped_count"]) == (4, 0, 3)
    assert np.load(tmp_path / "out" / IMG_ARRAY).shape == (0, 32)
    assert server.hits["/img/rgb.jpg"] == hits_before  # nothing reached the server


def test_bad_items_table_fails_before_model_load(tmp_path):
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"asin": ["a"], "title": ["t"], "description": ["d"]}), items)
    with pytest.raises(ItemsError, match="image_url"):
        im.embed_items_images(str(items), tmp_path / "out",
                              PipelineParams(image_model="no-such-model"))


# ----------------------------------------------------------------------------- shards and resume

def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes()
            for name in (IMG_ARRAY, IMG_ITEMS, IMG_FAILURES)}


def _stable_meta(out: Path) -> dict:
    meta = json.loads((out / IMG_META).read_text())
    return {k: v for k, v in meta.items() if k not in TIMING_KEYS}


DRIVER = textwrap.dedent("""
    import json, sys
    from item_embeddings.config import PipelineParams
    from item_embeddings.image import embed_items_images
    kwargs = json.loads(sys.argv[1])
    embed_items_images(params=PipelineParams(**kwargs.pop("params")), **kwargs)
""")


def test_sigkill_then_resume_gives_identical_outputs(server, tiny_model, tmp_path):
    config, checkpoint, _ = tiny_model
    slow_server_paths = [f"img/{n}" for n in ("rgb.jpg", "photo.webp", "cmyk.jpg", "anim.gif")]
    with ImageServer(make_images(), latency_s=0.08) as slow:
        urls = [slow.url(slow_server_paths[i % 4]) if i % 7 else slow.url("img/missing.jpg")
                for i in range(36)]
        items = items_with_urls(tmp_path / "items.parquet", urls)
        params = dict(image_model=str(config), image_pretrained=str(checkpoint),
                      image_batch_size=2, shard_size=4, download_concurrency=2,
                      download_timeout_s=5, download_retries=0, allow_private_hosts=True)
        kwargs = dict(items_uri=str(items), output_dir=str(tmp_path / "killed"), params=params,
                      run_id="resume")
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(kwargs)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        shards_dir = tmp_path / "killed" / im.SHARDS_DIR
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(shards_dir.glob("*/shard-*.parquet"))) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        done = len(list(shards_dir.glob("*/shard-*.parquet")))
        assert 2 <= done < 9 and not (tmp_path / "killed" / IMG_META).exists()

        kwargs["params"] = PipelineParams(**params)
        resumed = im.embed_items_images(**kwargs)
        fresh = im.embed_items_images(**{**kwargs, "output_dir": str(tmp_path / "fresh")})
    assert resumed["resumed_shards"] == done and fresh["resumed_shards"] == 0
    assert resumed["count"] + resumed["failed_count"] == 36 and resumed["failed_count"] == 6
    assert _outputs(tmp_path / "killed") == _outputs(tmp_path / "fresh")
    assert _stable_meta(tmp_path / "killed") == _stable_meta(tmp_path / "fresh")


def test_changed_inputs_do_not_reuse_stale_shards(encoder, server, tiny_model, tmp_path):
    config, checkpoint, _ = tiny_model
    urls = [server.url("img/rgb.jpg"), server.url("img/photo.webp")] * 3
    items = items_with_urls(tmp_path / "items.parquet", urls)
    settings = dict(image_model=str(config), image_pretrained=str(checkpoint), shard_size=2,
                    checkpoint_uri=str(tmp_path / "ckpt"))
    common = dict(params=PipelineParams(**settings), download_config=FAST, encoder=encoder)
    assert im.embed_items_images(str(items), tmp_path / "o1", **common)["resumed_shards"] == 0
    assert im.embed_items_images(str(items), tmp_path / "o2", **common)["resumed_shards"] == 3
    # Another cap: a new fingerprint, nothing reused.
    assert im.embed_items_images(str(items), tmp_path / "o3",
                                 **{**common, "params": PipelineParams(**settings, max_items=5)}
                                 )["resumed_shards"] == 0
    # Another image_decode: other pixels, nothing reused.
    assert im.embed_items_images(str(items), tmp_path / "o3d", **{
        **common, "params": PipelineParams(**settings, image_decode="exact")}
                                 )["resumed_shards"] == 0
    # Same settings, one URL of the second shard changed in place: only that shard is redone.
    urls[2] = server.url("img/anim.gif")
    items_with_urls(items, urls)
    meta = im.embed_items_images(str(items), tmp_path / "o4", **common)
    assert meta["resumed_shards"] == 2 and meta["count"] == 6
    # A corrupt shard file is recomputed, not trusted.
    (Path(meta["checkpoint_location"]) / "shard-00000.parquet").write_bytes(b"garbage")
    assert im.embed_items_images(str(items), tmp_path / "o5", **common)["resumed_shards"] == 2
    assert _outputs(tmp_path / "o4") == _outputs(tmp_path / "o5")


def _shard_files(location: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(location.glob("shard-*.parquet"))}


def test_shards_are_kept_under_their_fingerprint_with_what_they_are_made_from(
        encoder, server, tiny_model, tmp_path):
    """What an operator finds in checkpoint_uri: a folder named after the fingerprint of the
    settings, settings.json saying what they are, and one parquet file per shard holding every
    item of it (its vector, or its failure), marked with the fingerprint."""
    from item_embeddings.image.shards import SHARD_FORMAT

    config, checkpoint, _ = tiny_model
    names = ["img/rgb.jpg", "status/404", "img/photo.webp", "img/anim.gif", "html"]
    items = items_with_urls(tmp_path / "items.parquet", [server.url(n) for n in names])
    params = PipelineParams(image_model=str(config), image_pretrained=str(checkpoint),
                            shard_size=2, checkpoint_uri=str(tmp_path / "ckpt") + "/")
    meta = im.embed_items_images(str(items), tmp_path / "out", params, download_config=FAST,
                                 encoder=encoder)
    location = tmp_path / "ckpt" / meta["fingerprint"][:16]
    assert meta["checkpoint_location"] == str(location) and meta["shards"] == 3
    assert sorted(p.name for p in location.iterdir()) == [
        "settings.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    recorded = json.loads((location / "settings.json").read_text())
    assert (recorded["format"], recorded["fingerprint"]) == (SHARD_FORMAT, meta["fingerprint"])
    assert recorded["settings"]["shard_size"] == 2
    assert recorded["settings"]["resolved_model"] == "tiny-vit-test"

    shards = _shard_files(location)
    assert [t.num_rows for t in shards.values()] == [2, 2, 1]
    table = pa.concat_tables(t.replace_schema_metadata(None) for t in shards.values())
    assert table.column_names == ["id", "url", "key", "source", "reason", "detail",
                                  "http_status", "attempts", "etag", "last_modified",
                                  "embedding"]
    for shard in shards.values():
        assert shard.schema.metadata[b"fingerprint"] == meta["fingerprint"].encode()
        assert shard.schema.metadata[b"format"] == SHARD_FORMAT.encode()
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"item-{i:03d}" for i in range(5)]
    assert [r["source"] for r in rows] == ["encoded", "failed", "encoded", "encoded", "failed"]
    assert [r["reason"] for r in rows] == [None, dl.HTTP_ERROR, None, None, dl.NOT_AN_IMAGE]
    assert rows[1]["embedding"] is None and rows[4]["embedding"] is None
    vectors = np.load(tmp_path / "out" / IMG_ARRAY)
    np.testing.assert_array_equal(
        np.array([r["embedding"] for r in rows if r["embedding"] is not None], np.float32),
        vectors)


def test_a_resumed_run_recomputes_damaged_or_foreign_shards_and_says_why(
        encoder, server, tiny_model, tmp_path, caplog):
    """Resume trusts a shard only if it is whole, made from these settings and these items:
    a corrupt file, one with rows missing and one whose item changed id (same URL) are made
    again, with a log line each; the outputs are a fresh run's."""
    config, checkpoint, _ = tiny_model
    urls = [server.url(n) for n in ("img/rgb.jpg", "img/photo.webp", "img/anim.gif",
                                    "img/cmyk.jpg", "img/grey.jpg", "img/palette.png")]
    items = items_with_urls(tmp_path / "items.parquet", urls)
    params = PipelineParams(image_model=str(config), image_pretrained=str(checkpoint),
                            shard_size=2, checkpoint_uri=str(tmp_path / "ckpt"))
    common = dict(params=params, download_config=FAST, encoder=encoder)
    meta = im.embed_items_images(str(items), tmp_path / "o1", **common)
    location = Path(meta["checkpoint_location"])
    (location / "shard-00000.parquet").write_bytes(b"garbage")
    one = pq.read_table(location / "shard-00001.parquet")
    pq.write_table(one.slice(0, 1), location / "shard-00001.parquet")  # metadata kept
    with caplog.at_level(logging.WARNING, logger="item_embeddings.image.shards"):
        again = im.embed_items_images(str(items), tmp_path / "o2", **common)
    assert again["resumed_shards"] == 1
    (unreadable, other) = [r.getMessage() for r in caplog.records if r.name.endswith("shards")]
    assert unreadable.startswith(f"shard 0 at {location} is unreadable (")
    assert unreadable.endswith("); recomputing it")
    assert other == (f"shard 1 at {location} was made from other items or settings; "
                     "recomputing it")
    assert _outputs(tmp_path / "o1") == _outputs(tmp_path / "o2")

    ids = [f"item-{i:03d}" for i in range(6)]
    ids[5] = "renamed"  # the same URL under another id: its shard is made again
    items_with_urls(items, urls, ids)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="item_embeddings.image.shards"), \
            caplog.at_level(logging.INFO, logger="item_embeddings.image.step"):
        renamed = im.embed_items_images(str(items), tmp_path / "o3", **common)
    assert renamed["resumed_shards"] == 2
    assert [r.getMessage() for r in caplog.records if r.name.endswith("shards")] == [
        f"shard 2 at {location} was made from other items or settings; recomputing it"]
    assert [r.getMessage() for r in caplog.records if "already done" in r.getMessage()] == [
        "shard 0 (2 items) already done; skipped", "shard 1 (2 items) already done; skipped"]
    assert pq.read_table(tmp_path / "o3" / IMG_ITEMS).column("id").to_pylist() == ids


def test_a_run_without_any_image_url_writes_empty_tables_with_their_columns(encoder, tiny_model,
                                                                            tmp_path):
    config, checkpoint, _ = tiny_model
    items = items_with_urls(tmp_path / "items.parquet", [None, "", "not a url"])
    meta = im.embed_items_images(str(items), tmp_path / "out", PipelineParams(
        image_model=str(config), image_pretrained=str(checkpoint)), download_config=FAST,
        encoder=encoder)
    assert (meta["count"], meta["failed_count"], meta["attempted_count"], meta["shards"]) == \
        (0, 0, 0, 0)
    assert meta["failures_by_reason"] == {} and meta["unavailable_hosts"] == {}
    embedded = pq.read_table(tmp_path / "out" / IMG_ITEMS)
    failed = pq.read_table(tmp_path / "out" / IMG_FAILURES)
    assert embedded.num_rows == failed.num_rows == 0
    assert embedded.column_names == ["id", "url", "key", "etag", "last_modified", "row"]
    assert failed.column_names == ["id", "url", "reason", "detail", "http_status", "attempts",
                                   "key"]
    assert embedded.schema.field("id").type == failed.schema.field("id").type == pa.string()
    assert np.load(tmp_path / "out" / IMG_ARRAY).shape == (0, 32)


# ----------------------------------------------------------------------------- the component

def test_worker_component_and_the_merge_write_outputs_and_metrics(server, tiny_model, tmp_path):
    """The image worker (one shard: the whole table) and the merge (which the fusion task runs
    first), as the pipeline runs them: the merged files are the step's outputs, with the step's
    metrics on the Metrics artifact and its experiment run."""
    from kfp.dsl import Dataset, Metrics

    from item_embeddings.components.embed_images import embed_images
    from item_embeddings.fanout import WHOLE_TABLE, ShardPlan, merge_image_shards
    from item_embeddings.image.step import IMAGE_STEP
    from item_embeddings.tracking import LocalTracker, write_metrics_artifact

    config, checkpoint, _ = tiny_model
    items = items_with_urls(tmp_path / "items.parquet",  # integer ids are kept as integers
                            [server.url("img/rgb.jpg"), None, server.url("status/404")],
                            ids=[10, 20, 30])
    task_dir = tmp_path / "item-embeddings-comp" / "embed-images"
    shards = Dataset(name="image_shards", uri=str(task_dir / "shards"))
    embed_images(items=Dataset(name="items", uri=str(items)), image_shards=shards,
                 image_model=str(config), image_pretrained=str(checkpoint),
                 download_retries=0, allow_private_hosts=True, tracking_backend="local",
                 tracking_dir=str(tmp_path / "runs"), image_user_agent="test-agent/1",
                 log_shard_runs=True)
    assert "test-agent/1" in server.user_agents
    assert (tmp_path / "runs" / "recsys-dev" /
            "embed-image-item-embeddings-comp-shard-00000.json").is_file()
    merge_dir = tmp_path / "item-embeddings-comp" / "merge-images"
    metrics = Metrics(name="metrics", uri=str(merge_dir / "metrics"))
    meta = merge_image_shards([shards.path], ShardPlan.from_workers([WHOLE_TABLE]),
                              merge_dir / "ds", PipelineParams(), run_id="item-embeddings-comp",
                              tracker=LocalTracker(tmp_path / "runs", "recsys-dev"))
    write_metrics_artifact(metrics, "image", IMAGE_STEP.metrics(meta))
    assert meta["count"] == 1 and meta["embed_dim"] == 32
    assert metrics.metadata["image_count"] == 1 and metrics.metadata["image_failed_count"] == 1
    assert metrics.metadata["image_no_url_count"] == 1
    assert metrics.metadata["image_fanout_shards"] == 1
    assert all(k.startswith("image_") for k in metrics.metadata)
    assert (tmp_path / "runs" / "recsys-dev" / "embed-image-item-embeddings-comp.json").is_file()
    assert pq.read_table(merge_dir / "ds" / IMG_ITEMS).column("id").to_pylist() == [10]
    failed = pq.read_table(merge_dir / "ds" / IMG_FAILURES)
    assert failed.schema.field("id").type == pa.int64() and failed.column("id").to_pylist() == [30]
    assert {p.name for p in (merge_dir / "ds").iterdir()} >= {
        IMG_ARRAY, IMG_ITEMS, IMG_FAILURES, IMG_META}


def _component_call(tmp_path: Path, task_dir: Path, items: Path, tiny_model, **inputs) -> dict:
    """Run the image component's Python function as the pipeline would; returns img_meta.json."""
    from kfp.dsl import Dataset

    from item_embeddings.components.embed_images import embed_images

    config, checkpoint, _ = tiny_model
    embed_images(items=Dataset(name="items", uri=str(items)),
                 image_shards=Dataset(name="image_shards", uri=str(task_dir / "ds")),
                 image_model=str(config), image_pretrained=str(checkpoint), download_retries=0,
                 allow_private_hosts=True, tracking_backend="none", **inputs)
    return json.loads((task_dir / "ds" / "shard-00000" / IMG_META).read_text())


def test_component_max_image_bytes_reaches_the_downloader(server, images, tiny_model, tmp_path):
    small, large = "octet.jpg", "rgb.jpg"
    limit = len(images[large][0]) - 1
    assert len(images[small][0]) <= limit
    items = items_with_urls(tmp_path / "items.parquet",
                            [server.url(f"img/{small}"), server.url(f"img/{large}")])
    meta = _component_call(tmp_path, tmp_path / "task", items, tiny_model, max_image_bytes=limit)
    assert (meta["count"], meta["failures_by_reason"]) == (1, {dl.TOO_LARGE: 1})
    assert meta["max_image_bytes"] == limit
    [failure] = pq.read_table(tmp_path / "task" / "ds" / "shard-00000" / IMG_FAILURES).to_pylist()
    assert failure["id"] == "item-001" and str(limit) in failure["detail"]


def test_component_keeps_shards_in_the_durable_output_on_gcsfuse(server, tiny_model, tmp_path,
                                                                monkeypatch):
    """On Vertex the output is on gcsfuse and the step writes to a local staging directory; the
    shards must still go to the artifact itself, where a retried task (same output) finds them."""
    from item_embeddings import storage

    mount = tmp_path / "gcs"
    monkeypatch.setattr(storage, "FUSE_MOUNTS", (f"{mount}/",))
    task_dir = mount / "bucket" / "root" / "item-embeddings-spot" / "embed-images"
    items = items_with_urls(tmp_path / "items.parquet",
                            [server.url(f"img/{n}") for n in ("rgb.jpg", "photo.webp",
                                                               "grey.jpg")])
    first = _component_call(tmp_path, task_dir, items, tiny_model, shard_size=2)
    shards = sorted((task_dir / "ds" / im.SHARDS_DIR).glob("*/shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert first["checkpoint_location"].startswith(str(task_dir / "ds" / im.SHARDS_DIR))
    assert (first["shards"], first["resumed_shards"]) == (2, 0)
    # preempted after the checkpoints, before the worker placed its shard: the retry resumes
    (task_dir / "ds" / "shard-00000" / IMG_META).unlink()
    retried = _component_call(tmp_path, task_dir, items, tiny_model, shard_size=2)
    assert retried["resumed_shards"] == 2 and retried["count"] == 3
    # retried again after placing it: the whole shard is kept as it is, not redone
    placed = task_dir / "ds" / "shard-00000" / IMG_META
    before = placed.stat().st_mtime_ns
    _component_call(tmp_path, task_dir, items, tiny_model, shard_size=2)
    assert placed.stat().st_mtime_ns == before


def test_component_bad_parameter_fails_before_any_work(tmp_path, tiny_model, monkeypatch):
    import item_embeddings.image.step as image_step
    from item_embeddings.config import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(image_step, "load_image_encoder", no_model)
    items = items_with_urls(tmp_path / "items.parquet", [None, None])
    with pytest.raises(ConfigError, match="'download_concurrency' must be >= 1 and <= 1024, got 0"):
        _component_call(tmp_path, tmp_path / "task", items, tiny_model, download_concurrency=0)
    assert not (tmp_path / "task").exists()


def test_component_compiles(tmp_path):
    import yaml
    from kfp import compiler

    from item_embeddings.components.embed_images import make_component

    path = tmp_path / "embed_images.yaml"
    compiler.Compiler().compile(make_component("example.com/image:1"), str(path))
    spec = yaml.safe_load(path.read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["download_timeout_s"]["parameterType"] == "NUMBER_DOUBLE"
    assert inputs["allow_private_hosts"]["defaultValue"] is False
    assert inputs["max_items"]["defaultValue"] == 150000
    outputs = spec["root"]["outputDefinitions"]["artifacts"]
    assert set(outputs) == {"image_shards"}


def test_component_defaults_match_pipeline_params():
    import inspect

    from item_embeddings.components.embed_images import embed_images
    from item_embeddings.config import PARAM_FIELDS

    shared = {name: p.default for name, p in inspect.signature(embed_images).parameters.items()
              if name in PARAM_FIELDS and name != "items_uri"}  # items_uri: required here
    assert len(shared) >= 17
    assert shared == {name: PARAM_FIELDS[name].default for name in shared}


# ----------------------------------------------------------------------------- fetch and decode

class _BrokenDecoder:
    """A decoder that fails in a way no one foresaw (a bug, not a bad image)."""

    def timed(self, body):
        raise RuntimeError(f"boom after {len(body)} bytes")


def _small_decoder():
    """A decoder without a model: every pixel decoded, resized to 8 x 8."""
    from item_embeddings.image.decoding import ImageDecoder

    return ImageDecoder(lambda img: img.resize((8, 8)), (8, 8), mode="exact")


def test_fetch_decode_pool_outcomes_and_where_the_time_went(server, images, caplog):
    from item_embeddings.image.fetching import FetchDecodePool

    caplog.set_level("INFO")
    config = dataclass_replace(FAST, retries=0, timeout_s=0.3)
    rgb = images["rgb.jpg"][0]
    decoder = _small_decoder()
    started = time.perf_counter()
    with FetchDecodePool(config, decoder, decode_workers=2) as pool:
        slow = [pool.submit(server.url(f"slow?i={i}")) for i in range(3)]  # 0.3 s each, at once
        good, bad, missing = (pool.submit(server.url(p)).result(timeout=30) for p in
                              ("img/rgb.jpg", "img/notimage.jpg", "status/404"))
        unchanged = pool.submit(server.url("img/rgb.jpg"), etag=good.etag,
                                last_modified=good.last_modified).result(timeout=30)
        changed = pool.submit(server.url("img/rgb.jpg"), etag='"old"',
                              last_modified="Mon, 01 Jan 2024 00:00:00 GMT").result(timeout=30)
        by_date = pool.submit(server.url("img/rgb.jpg"),
                              last_modified=good.last_modified).result(timeout=30)
        slowed = pool.submit(server.url("status/429?retry_after=0")).result(timeout=30)
        timed_out = [f.result(timeout=30) for f in slow]
        counted = (pool.downloaded_bytes, pool.download_wall_s, pool.download_time,
                   pool.decode_cpu_s)
        pool.submit(server.url("slow?i=later")).result(timeout=30)  # another busy period
        later_wall = pool.download_wall_s
    wall = time.perf_counter() - started
    assert good.pixels is not None and good.pixels.dtype == np.uint8
    np.testing.assert_array_equal(good.pixels, decoder(rgb))
    assert (good.reason, good.detail, good.status, good.attempts, good.not_modified) == (
        None, "", 200, 1, False)
    assert good.etag and good.etag == changed.etag and good.last_modified
    assert (bad.pixels, bad.reason, bad.status, bad.attempts) == (None, dl.NOT_AN_IMAGE, 200, 1)
    assert bad.detail and bad.etag is None
    assert (missing.pixels, missing.reason, missing.detail, missing.status, missing.attempts) == (
        None, dl.HTTP_ERROR, "Not Found", 404, 1)
    assert (unchanged.pixels, unchanged.reason, unchanged.status, unchanged.not_modified) == (
        None, None, 304, True)
    assert (unchanged.etag, unchanged.last_modified) == (good.etag, good.last_modified)
    assert (unchanged.detail, unchanged.attempts) == ("", 1)
    assert (by_date.pixels, by_date.status, by_date.not_modified) == (None, 304, True)
    assert changed.pixels is not None and not changed.not_modified
    assert slowed.reason == dl.HTTP_ERROR and slowed.status == 429
    assert [(o.reason, o.attempts) for o in timed_out] == [(dl.TIMEOUT, 1)] * 3
    downloaded, download_wall, download_time, decode_cpu = counted
    # the bodies read: two good images and the page that is not one (not the 304)
    assert downloaded == 2 * len(rgb) + len(images["notimage.jpg"][0])
    # three 0.3 s timeouts side by side count once in the wall time, thrice in the sum
    assert 0.3 <= download_wall <= wall and download_time >= 0.9
    assert download_wall < download_time - 0.3
    assert later_wall >= download_wall + 0.3     # the busy periods add up
    assert download_time - download_wall < 1.2   # about 0.6 s: two of the timeouts overlapped
    assert 0 < decode_cpu < wall
    # on exit, the hosts that were slowed or cut off are logged with their counts
    assert (f"image host 127.0.0.1:{server.port}: requests 11, breaker_opened 0, refused 0, "
            "last_failure timeout, slowed 1, rate 25.0") in caplog.messages  # half of 50/s


def test_fetch_decode_pool_an_unforeseen_error_is_one_items_failure(server, caplog):
    from item_embeddings.image.fetching import INTERNAL_ERROR, FetchDecodePool

    with FetchDecodePool(FAST, _BrokenDecoder(), decode_workers=1) as pool:
        broken = pool.submit(server.url("img/rgb.jpg")).result(timeout=30)
        other = pool.submit(server.url("status/404")).result(timeout=30)
    assert (broken.pixels, broken.reason, broken.status, broken.attempts) == (
        None, INTERNAL_ERROR, None, 0)
    assert broken.detail.startswith("RuntimeError: boom after ")
    assert other.reason == dl.HTTP_ERROR           # the next item is fetched as usual
    assert f"unexpected error for {server.url('img/rgb.jpg')}" in caplog.messages
    assert "Traceback" in caplog.text and "RuntimeError: boom" in caplog.text


def test_fetch_decode_pool_resolves_names_with_the_given_resolver(server):
    from item_embeddings.image.fetching import FetchDecodePool
    from item_embeddings.image.guard import StaticResolver

    class Counting(StaticResolver):
        calls = 0

        async def resolve(self, host, *args, **kwargs):
            Counting.calls += 1
            return await super().resolve(host, *args, **kwargs)

    resolver = Counting({"localhost": "127.0.0.1"})
    with FetchDecodePool(FAST, _small_decoder(), decode_workers=1, resolver=resolver) as pool:
        outcome = pool.submit(server.url("img/rgb.jpg", host="localhost")).result(timeout=30)
    assert outcome.pixels is not None and Counting.calls == 1


class _Gate:
    """A decoder that records the threads it runs on and how many run at once; with ``meet``,
    each waits (bounded) until that many are decoding together."""

    def __init__(self, meet: int = 0, hold_s: float = 0.0):
        import threading

        self._lock = threading.Lock()
        self._barrier = threading.Barrier(meet, timeout=10) if meet else None
        self._hold_s = hold_s
        self.names: set[str] = set()
        self.active = self.most = self.calls = 0

    def timed(self, body):
        import threading

        with self._lock:
            self.names.add(threading.current_thread().name)
            self.calls += 1
            self.active += 1
            self.most = max(self.most, self.active)
        if self._barrier is not None:
            self._barrier.wait()
        time.sleep(self._hold_s)
        with self._lock:
            self.active -= 1
        return np.zeros((1, 1, 3), np.uint8), None, 0.0


def test_fetch_decode_pool_decodes_on_up_to_eight_named_threads(server, monkeypatch):
    import threading

    from item_embeddings.image.fetching import FetchDecodePool

    def decode(gate: _Gate, workers: int | None, items: int) -> set[str]:
        with FetchDecodePool(FAST, gate, decode_workers=workers) as pool:
            threads = {t.name for t in threading.enumerate()}
            futures = [pool.submit(server.url(f"img/rgb.jpg?w={i}")) for i in range(items)]
            assert all(f.result(timeout=30).pixels is not None for f in futures)
        return threads

    monkeypatch.setattr(os, "cpu_count", lambda: 16)    # a large machine: 8 decode threads
    gate = _Gate(meet=8, hold_s=0.2)                    # busy while the next 8 arrive
    assert "download-loop" in decode(gate, None, 16)
    assert len(gate.names) == 8 and all(n.startswith("decode_") for n in gate.names)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    gate = _Gate(meet=3)
    decode(gate, None, 6)
    assert len(gate.names) == 3
    gate = _Gate(meet=2)
    decode(gate, 2, 4)                                  # decode_workers when given
    assert len(gate.names) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one thread
    gate = _Gate(hold_s=0.2)
    decode(gate, None, 3)
    assert gate.most == 1 and len(gate.names) == 1


def test_fetch_decode_pool_exit_waits_for_the_running_decode_and_drops_the_queued(server):
    from item_embeddings.image.fetching import FetchDecodePool

    gate = _Gate(hold_s=0.3)
    with FetchDecodePool(FAST, gate, decode_workers=1) as pool:
        futures = [pool.submit(server.url(f"img/rgb.jpg?q={i}")) for i in range(5)]
        for _ in range(200):                     # until the first decode has started
            if gate.calls:
                break
            time.sleep(0.01)
        time.sleep(0.1)                          # the other downloads have ended meanwhile
    assert gate.calls and gate.active == 0       # the running decode finished before exit
    assert gate.calls < 5                        # the queued ones were not decoded
    assert not all(f.done() and not f.cancelled() and f.result().pixels is not None
                   for f in futures)
