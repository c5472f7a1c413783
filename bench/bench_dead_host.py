"""A host that never answers, inside a run: what it costs the image step with the circuit breaker.

The whole image step (``embed_items_images``: selection, downloads, decode, a randomly
initialised open_clip ViT-B-32 encoder as in bench_image_step.py, shards, outputs) runs in one
process, with every pipeline default (``download_timeout_s`` 5, ``download_retries`` 2,
``host_failure_limit`` 20, ``download_rate_per_host`` 50, 64 downloads in flight) but
``allow_private_hosts`` (the hosts are on loopback):

1. baseline: the good photos alone, served by a loopback host in a child process (127.0.0.1,
   20 ms latency per request);
2. the same photos spread evenly among ``--dead`` URLs on a host that accepts connections and
   never answers (127.0.0.2, a TCP server that reads requests and counts them);
3. (``--off`` URLs, default 200) the breaker turned off (``host_failure_limit=0``): the cost per
   URL before this change, measured on fewer URLs.

Targets (issue #24): (2) - (1) <= 60 s and the dead host receives <= 100 requests. Only loopback
addresses are used; the servers stop when the script ends.

    flock /tmp/bench.lock python bench/bench_dead_host.py
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from image_server import DeadServer, ServerProcess, gradient  # noqa: E402
from item_embeddings.config import PipelineParams  # noqa: E402
from item_embeddings.image import embed_items_images, load_image_encoder  # noqa: E402


def photos(folder: str, n: int) -> dict[str, tuple[bytes, str]]:
    files = sorted(glob.glob(f"{folder}/*.jpg"))[:n]
    if files:
        return {Path(f).name: (Path(f).read_bytes(), "image/jpeg") for f in files}
    import io

    out = {}
    for i in range(n):  # no sample data: generated pictures
        buf = io.BytesIO()
        gradient((256, 256), seed=i).save(buf, "JPEG", quality=90)
        out[f"gen{i}.jpg"] = (buf.getvalue(), "image/jpeg")
    return out


def write_items(path: Path, good: list[str], dead: list[str]) -> Path:
    """The good URLs spread evenly among the dead ones."""
    urls: list[str] = []
    per_good = len(dead) / len(good) if good else 0.0
    done = 0
    for i, url in enumerate(good):
        urls.append(url)
        upto = round((i + 1) * per_good)
        urls.extend(dead[done:upto])
        done = upto
    urls.extend(dead[done:])
    pq.write_table(pa.table({"asin": [f"B{i:09d}" for i in range(len(urls))],
                             "image_url": urls}), path)
    return path


def run(items: Path, out: Path, params: PipelineParams, encoder, dead: DeadServer | None
        ) -> dict:
    before = dead.requests if dead else 0
    started = time.perf_counter()
    meta = embed_items_images(str(items), out, params, encoder=encoder)
    seconds = time.perf_counter() - started
    return {"items": meta["attempted_count"], "embedded": meta["count"],
            "seconds": round(seconds, 2),
            "dead_host_requests": (dead.requests - before) if dead else 0,
            "failures_by_reason": meta["failures_by_reason"],
            "unavailable_hosts": meta["unavailable_hosts"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "abo_images"))
    p.add_argument("--good", type=int, default=100)
    p.add_argument("--dead", type=int, default=30_000)
    p.add_argument("--off", type=int, default=200, help="dead URLs with the breaker off; 0 = skip")
    p.add_argument("--latency", type=float, default=0.02)
    args = p.parse_args()

    bodies = photos(args.images, args.good)
    encoder = load_image_encoder("ViT-B-32", "none")
    params = PipelineParams(image_model="ViT-B-32", image_pretrained="none",
                            allow_private_hosts=True)
    report = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_start": os.getloadavg(), "defaults": {
                  k: getattr(params, k) for k in ("download_timeout_s", "download_retries",
                                                  "host_failure_limit", "download_rate_per_host",
                                                  "download_concurrency")}}
    with ServerProcess(bodies, latency_s=args.latency) as port, DeadServer("127.0.0.2") as dead, \
            tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        good = [f"http://127.0.0.1:{port}/img/{name}" for name in bodies]
        dead_urls = [dead.url(f"img/{i}.jpg") for i in range(args.dead)]
        run(write_items(tmp / "warm.parquet", good[:8], []), tmp / "warm", params, encoder, None)
        baseline = run(write_items(tmp / "base.parquet", good, []), tmp / "base", params, encoder,
                       None)
        with_dead = run(write_items(tmp / "dead.parquet", good, dead_urls), tmp / "dead", params,
                        encoder, dead)
        report["baseline"], report["with_dead_host"] = baseline, with_dead
        extra = with_dead["seconds"] - baseline["seconds"]
        report["extra_seconds"] = round(extra, 2)
        report["targets_met"] = extra <= 60 and with_dead["dead_host_requests"] <= 100
        if args.off:
            off = run(write_items(tmp / "off.parquet", good, dead_urls[:args.off]), tmp / "off",
                      dataclasses.replace(params, host_failure_limit=0), encoder, dead)
            off_extra = off["seconds"] - baseline["seconds"]
            report["breaker_off"] = {**off, "extra_seconds": round(off_extra, 2),
                                     "extra_seconds_per_dead_url": round(off_extra / args.off, 3),
                                     "requests_per_dead_url": off["dead_host_requests"] / args.off}
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
