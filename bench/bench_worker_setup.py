"""A worker's shards with its setup made once, against one shard and against a setup per shard.

The same real catalogue (the first ``--items`` Amazon Electronics items of
``../shared/data/amazon_electronics_2000.parquet``, their image URLs pointed at real product
photos, ``../shared/data/abo_images``, served by a loopback host in a child process) runs through
the text and image steps as one fan-out worker runs them (``fanout.plan_shards`` with one worker,
its shards one after another, ``worker.WorkerSetup``), three ways in one run:

1. ``one shard``: the whole catalogue as a single shard (the baseline);
2. ``N shards, set up once``: ``--shards`` shards sharing one ``WorkerSetup``: the encoders
   loaded, the items validated and the previous set opened once (what a worker does now);
3. ``N shards, set up per shard``: a fresh ``WorkerSetup`` per shard (what a worker did before:
   every shard loaded its encoder and opened the previous set again).

Each way runs twice: a full run (no previous set) and an incremental one that reuses every row
of a previous set written beforehand (``previous_uri``). Real models: all-MiniLM-L6-v2 (text,
torch) and a randomly initialised open_clip ViT-B-32 (the real compute cost; saved as a
checkpoint, as every shard must load the same weights). Target (issue #23.3): ``N shards, set
up once`` <= 2x ``one shard``.

    flock /tmp/bench.lock python bench/bench_worker_setup.py --items 120 --shards 30
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from image_server import ServerProcess  # noqa: E402
from item_embeddings.config import PipelineParams  # noqa: E402
from item_embeddings.fanout import plan_shards, worker_shards  # noqa: E402
from item_embeddings.image import embed_items_images  # noqa: E402
from item_embeddings.text import embed_items_text  # noqa: E402
from item_embeddings.worker import WorkerSetup  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def catalogue(path: Path, n: int, port: int, photos: list[str]) -> None:
    table = pq.read_table(DATA / "amazon_electronics_2000.parquet",
                          columns=["asin", "title", "description"]).slice(0, n)
    urls = [f"http://127.0.0.1:{port}/img/{Path(photos[i % len(photos)]).name}"
            for i in range(n)]
    pq.write_table(table.append_column("image_url", pa.array(urls)), path)


def run_worker(items: Path, out: Path, params: PipelineParams, *, once: bool) -> dict:
    """One worker's text and image shards in turn; seconds per step."""
    plan = plan_shards(str(items), params)
    (worker,) = plan.workers
    seconds = {}
    for step, embed in (("text", embed_items_text), ("image", embed_items_images)):
        started = time.perf_counter()
        shared = WorkerSetup() if once else None
        for shard in worker_shards(worker):
            setup = shared or WorkerSetup()
            extra = {"quota": shard.image_quota} if step == "image" else {}
            embed(str(items), out / step / shard.dirname, params, rows=shard.rows, setup=setup,
                  run_id=f"bench-{shard.dirname}", **extra)
            if not once:
                setup.__exit__(None, None, None)
        if shared:
            shared.__exit__(None, None, None)
        seconds[step] = round(time.perf_counter() - started, 2)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=120)
    p.add_argument("--shards", type=int, default=30)
    p.add_argument("--latency", type=float, default=0.05, help="per image request, s")
    p.add_argument("--runs", nargs="+", default=["full", "incremental"],
                   choices=["full", "incremental"])
    p.add_argument("--skip-per-shard", action="store_true",
                   help="leave out way 3 (slow: an encoder load per shard)")
    args = p.parse_args()

    photos = sorted(glob.glob(str(DATA / "abo_images" / "*.jpg")))
    if not photos:
        sys.exit(f"no images in {DATA / 'abo_images'}")
    bodies = {Path(f).name: (Path(f).read_bytes(), "image/jpeg") for f in photos[:args.items]}
    results: dict[str, dict] = {}
    with ServerProcess(bodies, latency_s=args.latency) as port, \
            tempfile.TemporaryDirectory() as tmp:
        import open_clip
        import torch

        checkpoint = Path(tmp) / "vit-b-32-random.pt"
        torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), checkpoint)
        base = dict(image_model="ViT-B-32", image_pretrained=str(checkpoint),
                    allow_private_hosts=True, text_backend="torch", max_items=0,
                    max_parallel_shards=1)
        items = Path(tmp) / "items.parquet"
        catalogue(items, args.items, port, list(bodies))
        previous = Path(tmp) / "previous"  # a set every later run reuses whole
        for embed in (embed_items_text, embed_items_images):
            embed(str(items), previous, PipelineParams(**base), run_id="previous")
        for run, previous_uri in (("full", ""), ("incremental", str(previous))):
            if run not in args.runs:
                continue
            ways = {
                "one shard": (1, True),
                f"{args.shards} shards, set up once": (args.shards, True),
                f"{args.shards} shards, set up per shard": (args.shards, False),
            }
            if args.skip_per_shard:
                ways.pop(f"{args.shards} shards, set up per shard")
            for way, (shards, once) in ways.items():
                params = PipelineParams(**base, shards=shards, previous_uri=previous_uri)
                seconds = run_worker(items, Path(tmp) / f"{run}-{shards}-{once}", params,
                                     once=once)
                seconds["total"] = round(seconds["text"] + seconds["image"], 2)
                results.setdefault(run, {})[way] = seconds
                print(run, way, seconds, file=sys.stderr, flush=True)
    for ways in results.values():
        one = ways["one shard"]["total"]
        for seconds in ways.values():
            seconds["x one shard"] = round(seconds["total"] / one, 2)
    print(json.dumps({"items": args.items, "shards": args.shards, "latency_s": args.latency,
                      "results": results,
                      "load_average_1m_at_end": round(os.getloadavg()[0], 2)}, indent=2))


if __name__ == "__main__":
    main()
