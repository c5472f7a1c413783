"""Downloader throughput: concurrent (the step's downloader) versus one request at a time.

A loopback image host in a child process adds 50 ms of latency to every request and answers
10% of them with a 500 (seeded). The same :class:`Downloader` (same retry policy) runs once with
one request at a time over a fixed number of URLs (the original design) and once with the step's
concurrency; images/s are compared in the same run. Four host names resolve to 127.0.0.1 through
an injected resolver, as a real catalogue spreads over a few CDN hosts; the per-host request rate
is off (``rate_per_host=0``), since this measures concurrency. Only loopback is used.

    flock /tmp/bench.lock python bench/bench_download.py
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from image_server import ServerProcess, make_images  # noqa: E402
from item_embeddings.image.download import DownloadConfig, Downloader  # noqa: E402
from item_embeddings.image.guard import StaticResolver  # noqa: E402

HOSTS = [f"img{i}.bench.test" for i in range(4)]


def load_image() -> tuple[bytes, str]:
    photos = sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "abo_images" / "*.jpg")))
    if photos:
        return Path(photos[0]).read_bytes(), "image/jpeg"
    return make_images()["rgb.jpg"]


async def sequential(urls, config) -> list:
    async with Downloader(config, resolver=StaticResolver({h: "127.0.0.1" for h in HOSTS}),
                          seed=0) as downloader:
        return [await downloader.fetch(u) for u in urls]


async def concurrent(urls, config) -> list:
    async with Downloader(config, resolver=StaticResolver({h: "127.0.0.1" for h in HOSTS}),
                          seed=0) as downloader:
        return await asyncio.gather(*(downloader.fetch(u) for u in urls))


def measure(fn, urls, config) -> dict:
    started = time.perf_counter()
    results = asyncio.run(fn(urls, config))
    elapsed = time.perf_counter() - started
    ok = sum(r.ok for r in results)
    return {"requests": len(urls), "ok": ok, "failed": len(urls) - ok,
            "attempts": sum(r.attempts for r in results), "seconds": round(elapsed, 2),
            "items_per_sec": round(len(urls) / elapsed, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequential", type=int, default=100)
    p.add_argument("--concurrent", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--fail-rate", type=float, default=0.10)
    args = p.parse_args()

    body = load_image()
    report = {"latency_s": args.latency, "fail_rate": args.fail_rate,
              "image_bytes": len(body[0]), "runs": {}}
    with ServerProcess({"photo.jpg": body}, latency_s=args.latency,
                       fail_rate=args.fail_rate) as port:
        def urls(n):
            return [f"http://{HOSTS[i % len(HOSTS)]}:{port}/img/photo.jpg?i={i}" for i in range(n)]

        for retries in (2, 0):
            # no per-host rate: this measures concurrency (four names on one loopback host)
            base = dict(retries=retries, allow_private_hosts=True, rate_per_host=0.0)
            seq = measure(sequential, urls(args.sequential), DownloadConfig(concurrency=1, **base))
            con = measure(concurrent, urls(args.concurrent),
                          DownloadConfig(concurrency=args.concurrency, **base))
            report["runs"][f"retries={retries}"] = {
                "sequential": seq, f"concurrent_{args.concurrency}": con,
                "speedup": round(con["items_per_sec"] / seq["items_per_sec"], 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
