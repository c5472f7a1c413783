"""image_decode 'fast' versus 'exact' on real product photos at catalogue size: CPU and quality.

The photos (``../shared/data/abo_images``, 256 px as stored) are upscaled to ``--long-side``
pixels and re-encoded as JPEG quality 90 (``bench_shard_overhead.upscaled``), as catalogue hosts
serve them. Measured in one run, both modes on the same photos:

1. **decode CPU, one thread**: ``ImageDecoder.timed`` (per-thread CPU time) of every photo,
   fast and exact alternating photo by photo for ``--repeats`` rounds, so a shared machine's
   load falls on both alike;
2. **quality**: mean absolute difference of the encoder inputs (uint8, of 255) and cosine
   between the two modes' vectors, open_clip ViT-B-32 with random weights (``--pretrained``
   takes a tag or checkpoint instead);
3. **the step**: ``embed_items_images`` over the photos served by a loopback host (a child
   process, ``--latency`` per request), each mode twice, alternating, on the first
   ``--step-photos``: its own ``decode_cpu_s``,
   ``download_wall_s`` and ``encode_wall_s`` (img_meta.json), the ratio fast / exact
   (target <= 0.40);
4. **fetch only**: the step's download + decode pool without the encoder, fast mode: this
   process's CPU seconds per image beside decoding (HTTP client, hand-off), which the estimator
   adds to the decode CPU.

Run from the project root (wrap in ``flock /tmp/bench.lock`` on a shared machine)::

    python bench/bench_image_decode.py --json image_decode.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_shard_overhead import upscaled  # noqa: E402

from image_server import ServerProcess  # noqa: E402
from item_embeddings.config import PipelineParams  # noqa: E402
from item_embeddings.image import DECODE_MODES, embed_items_images, load_image_encoder  # noqa: E402
from item_embeddings.image.download import DownloadConfig  # noqa: E402
from item_embeddings.image.fetching import FetchDecodePool  # noqa: E402


def cpu_model() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.processor())
    flags = "avx512_vnni" if "avx512_vnni" in info else ("avx2" if "avx2" in info else "other")
    return {"cpu": name, "isa": flags, "cores": os.cpu_count()}


def decode_cpu(encoder, bodies: list[bytes], repeats: int) -> dict:
    """Per-thread CPU ms per photo of each mode, interleaved photo by photo."""
    decoders = {mode: encoder.decoder(mode) for mode in DECODE_MODES}
    for decoder in decoders.values():
        decoder(bodies[0])  # first call: plugin registration
    spent = {mode: [] for mode in DECODE_MODES}
    for _ in range(repeats):
        for body in bodies:
            for mode, decoder in decoders.items():
                pixels, error, cpu_s = decoder.timed(body)
                if error is not None:
                    raise SystemExit(f"a photo failed to decode: {error}")
                spent[mode].append(cpu_s)
    out = {mode: {"ms_per_image_mean": 1000 * statistics.mean(v),
                  "ms_per_image_median": 1000 * statistics.median(v)}
           for mode, v in spent.items()}
    out["ratio_fast_over_exact"] = sum(spent["fast"]) / sum(spent["exact"])
    return out


def quality(encoder, bodies: list[bytes], batch: int = 32) -> dict:
    inputs = {mode: np.stack([encoder.decoder(mode)(b) for b in bodies]) for mode in DECODE_MODES}
    vectors = {mode: np.concatenate([encoder.encode(x[i:i + batch])
                                     for i in range(0, len(x), batch)])
               for mode, x in inputs.items()}
    cos = np.sum(vectors["fast"] * vectors["exact"], axis=1)
    mad = np.abs(inputs["fast"].astype(np.int16) - inputs["exact"]).mean(axis=(1, 2, 3))
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "cosine_p01": float(np.quantile(cos, 0.01)),
            "pixel_mad_mean": float(mad.mean()), "pixel_mad_max": float(mad.max())}


def step_runs(encoder, bodies: list[bytes], latency: float, batch: int, workers: int) -> dict:
    """The whole step once per mode over loopback-served photos; its own timings."""
    images = {f"p{i}.jpg": (b, "image/jpeg") for i, b in enumerate(bodies)}
    out = {}
    with ServerProcess(images, latency_s=latency) as port, tempfile.TemporaryDirectory() as tmp:
        items = Path(tmp) / "items.parquet"
        pq.write_table(pa.table({"asin": [f"B{i:09d}" for i in range(len(images))],
                                 "image_url": [f"http://127.0.0.1:{port}/img/{n}"
                                               for n in images]}), items)
        for mode in ("exact", "fast", "exact", "fast"):  # twice each, alternating
            meta = embed_items_images(
                str(items), Path(tmp) / f"out-{mode}-{len(out)}",
                PipelineParams(image_model="ViT-B-32", image_pretrained="none",
                               image_batch_size=batch, image_decode=mode,
                               allow_private_hosts=True),
                encoder=encoder, run_id="bench", decode_workers=workers)
            assert meta["count"] == len(images), meta["failures_by_reason"]
            out.setdefault(mode, []).append(
                {k: meta[k] for k in ("decode_cpu_s", "download_wall_s", "encode_wall_s",
                                      "throughput_items_per_sec")})
        fetch = fetch_only(encoder, items_urls(port, images), workers)
    summary = {mode: {k: round(statistics.mean(r[k] for r in runs), 3) for k in runs[0]}
               for mode, runs in out.items()}
    summary["runs"] = out
    summary["decode_cpu_ratio_fast_over_exact"] = round(
        sum(r["decode_cpu_s"] for r in out["fast"]) / sum(r["decode_cpu_s"] for r in out["exact"]),
        3)
    summary["fetch_only_fast"] = fetch
    return summary


def items_urls(port: int, images: dict) -> list[str]:
    return [f"http://127.0.0.1:{port}/img/{n}" for n in images]


def fetch_only(encoder, urls: list[str], workers: int) -> dict:
    """Downloads + fast decoding without the encoder: CPU beside decoding, per image."""
    config = DownloadConfig(allow_private_hosts=True)
    with FetchDecodePool(config, encoder.decoder("fast"), workers) as pool:
        cpu, wall = time.process_time(), time.perf_counter()
        futures = [pool.submit(u) for u in urls]
        outcomes = [f.result() for f in concurrent.futures.as_completed(futures)]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert all(o.pixels is not None for o in outcomes)
    n = len(urls)
    return {"images": n, "process_cpu_ms_per_image": round(1000 * cpu / n, 3),
            "decode_cpu_ms_per_image": round(1000 * pool.decode_cpu_s / n, 3),
            "other_cpu_ms_per_image": round(1000 * (cpu - pool.decode_cpu_s) / n, 3),
            "images_per_s": round(n / wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "abo_images"))
    p.add_argument("--limit", type=int, default=200, help="photos (default 200)")
    p.add_argument("--long-side", type=int, default=1000, help="upscaled to (default 1000 px)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the one-thread timing")
    p.add_argument("--pretrained", default="none", help="ViT-B-32 weights (default random)")
    p.add_argument("--latency", type=float, default=0.02, help="loopback host's latency (s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step-photos", type=int, default=100,
                   help="photos of the step runs (default 100; each mode runs twice)")
    p.add_argument("--decode-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sections", default="cpu,quality,step",
                   help="comma-separated subset of cpu, quality, step")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    files = sorted(glob.glob(f"{args.images}/*.jpg"))[: args.limit]
    if not files:
        sys.exit(f"no .jpg files in {args.images}")
    bodies = [upscaled(Path(f).read_bytes(), args.long_side) for f in files]
    encoder = load_image_encoder("ViT-B-32", args.pretrained, device="cpu")
    sections = set(args.sections.split(","))
    load_start = os.getloadavg()[0]
    result = {"photos": len(bodies), "long_side": args.long_side,
              "mean_jpeg_kib": round(sum(map(len, bodies)) / len(bodies) / 1024, 1),
              "pretrained": args.pretrained, **cpu_model(),
              "load_average_1m_at_start": round(load_start, 2)}
    if "cpu" in sections:
        result["decode_cpu_one_thread"] = decode_cpu(encoder, bodies, args.repeats)
    if "quality" in sections:
        result["quality_vit_b32"] = quality(encoder, bodies)
    if "step" in sections:
        result["step"] = step_runs(encoder, bodies[: args.step_photos], args.latency,
                                   args.batch_size, args.decode_workers)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
