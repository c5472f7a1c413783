"""Incremental runs (issue #13): the full text and image steps versus incremental ones, in one run.

Catalogue A: ``--items`` generated product listings (``product_texts`` of the text backend
tests: titles only, medium listings, and long ones past the 256-token cap), each with an image
URL on a loopback host in a child process that counts every request; ``--fail-share`` of the
URLs answer 404 to their first request (images the CDN did not have yet). Catalogue B: A with
1% of the items changed (new title and new image URL), 0.5% deleted and 0.5% added (new
listings, new URLs), at random rows.

1. text: the full step on A versus the incremental step on B (as many items) with
   ``previous_uri`` = that full run; each call timed whole (model load, reading, writing and
   hashing included; ``text_backend`` default: exact ONNX float32 on CPU). Target: incremental
   <= 10% of full. (That the incremental outputs equal a full run's on B is what
   tests/test_incremental.py proves.)
2. images: a full run on A, then the incremental step on B; the host's request counts during
   the incremental step must be exactly one per new, changed and previously failed URL. The
   image model is a tiny open_clip ViT (tests/conftest.py ``TINY_CONFIG``, random weights saved
   as a checkpoint so its fingerprint is stable): what is measured is requests and reuse, not
   the cost of ViT-B/32, which would take hours for 50k images on 2 cores.

    flock /tmp/bench.lock python bench/bench_incremental.py --items 50000
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY_CONFIG  # noqa: E402
from test_text_backends import product_texts  # noqa: E402

from image_server import ServerProcess, gradient  # noqa: E402
from item_embeddings.config import PipelineParams  # noqa: E402
from item_embeddings.image import embed_items_images  # noqa: E402
from item_embeddings.progress import setup_logging  # noqa: E402
from item_embeddings.text import embed_items_text  # noqa: E402

CHANGED, ADDED, DELETED = 0.01, 0.005, 0.005
BODIES = 64  # distinct JPEGs behind the URLs (the host's memory stays small)


def catalogues(n: int, seed: int) -> tuple[list[dict], list[dict], dict[str, set]]:
    """Rows of A and B (``asin``, ``title``, ``image_url`` as an image name) and what changed."""
    rng = random.Random(seed)
    a = [{"asin": f"A{i:08d}", "title": text, "image_url": f"a{i}.jpg"}
         for i, text in enumerate(product_texts(n, seed=seed))]
    picks = rng.sample(range(n), int(n * CHANGED) + int(n * DELETED))
    changed, deleted = set(picks[:int(n * CHANGED)]), set(picks[int(n * CHANGED):])
    b = []
    for i, row in enumerate(a):
        if i in deleted:
            continue
        if i in changed:
            row = {**row, "title": row["title"] + " New colour: midnight blue.",
                   "image_url": f"c{i}.jpg"}
        b.append(row)
    for k, text in enumerate(product_texts(int(n * ADDED), seed=seed + 1)):
        b.insert(rng.randrange(len(b) + 1), {"asin": f"N{k:08d}", "title": text,
                                             "image_url": f"n{k}.jpg"})
    plan = {"changed": {f"c{i}.jpg" for i in changed},
            "added": {f"n{k}.jpg" for k in range(int(n * ADDED))},
            "deleted": {f"a{i}.jpg" for i in deleted}}
    return a, b, plan


def write(rows: list[dict], path: Path, port: int | None = None) -> Path:
    """The items table; image URLs on the host at ``port`` (none without a port)."""
    urls = [f"http://127.0.0.1:{port}/img/{r['image_url']}" if port else None for r in rows]
    pq.write_table(pa.table({
        "asin": [r["asin"] for r in rows], "title": [r["title"] for r in rows],
        "description": pa.nulls(len(rows), pa.list_(pa.string())),
        "image_url": pa.array(urls, pa.string())}), path)
    return path


def jpegs() -> list[tuple[bytes, str]]:
    out = []
    for seed in range(BODIES):
        buf = io.BytesIO()
        gradient((96, 96), seed=seed).save(buf, "JPEG", quality=90)
        out.append((buf.getvalue(), "image/jpeg"))
    return out


def timed(fn, *args, **kwargs) -> tuple[dict, float]:
    started = time.perf_counter()
    meta = fn(*args, **kwargs)
    return meta, time.perf_counter() - started


def bench_text(items_a: Path, items_b: Path, tmp: Path) -> dict:
    """The full step on A (which is also the previous set) versus the incremental step on B
    (the same number of items): one full encoding of 50k items is the bench's long part."""
    full, full_s = timed(embed_items_text, str(items_a), tmp / "text-A", PipelineParams())
    inc, inc_s = timed(embed_items_text, str(items_b), tmp / "text-inc",
                       PipelineParams(previous_uri=str(tmp / "text-A")))
    return {"backend": full["text_backend"], "items_a": full["count"], "items_b": inc["count"],
            "full_step_s": round(full_s, 1), "incremental_step_s": round(inc_s, 1),
            "ratio": round(inc_s / full_s, 4),
            "incremental_encode_s": round(inc["encode_time_sec"], 1),
            "reused_count": inc["reused_count"], "encoded_count": inc["encoded_count"]}


def bench_images(a: list[dict], b: list[dict], plan: dict[str, set], fail_share: float,
                 seed: int, tmp: Path) -> dict:
    import open_clip
    import torch

    config = tmp / "tiny-vit-bench.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-vit-bench").state_dict(), tmp / "tiny.pt")
    params = dict(image_model=str(config), image_pretrained=str(tmp / "tiny.pt"),
                  allow_private_hosts=True)

    bodies = jpegs()
    names = {r["image_url"] for r in a} | {r["image_url"] for r in b}
    images = {name: bodies[i % BODIES] for i, name in enumerate(sorted(names))}
    failing = set(random.Random(seed).sample(sorted(r["image_url"] for r in a),
                                             int(len(a) * fail_share)))
    host = ServerProcess(images, fail_first=failing)
    with host as port:
        items_a, items_b = write(a, tmp / "a.parquet", port), write(b, tmp / "b.parquet", port)
        full, full_s = timed(embed_items_images, str(items_a), tmp / "img-A",
                             PipelineParams(**params))
        before = host.hits()
        inc, inc_s = timed(embed_items_images, str(items_b), tmp / "img-inc",
                           PipelineParams(**params, previous_uri=str(tmp / "img-A")))
        after = host.hits()
    requested = {p: n - before.get(p, 0) for p, n in after.items() if n != before.get(p, 0)}
    b_names = {r["image_url"] for r in b}
    retried = failing & b_names  # failed in A, still listed in B under the same URL
    expected = {f"/img/{name}": 1 for name in plan["changed"] | plan["added"] | retried}
    return {"items_a": len(a), "items_b": len(b), "failed_in_full_run": full["failed_count"],
            "full_run_on_A_s": round(full_s, 1), "incremental_step_s": round(inc_s, 1),
            "requests_in_incremental_run": sum(requested.values()),
            "deleted": len(plan["deleted"]), "expected_new": len(plan["added"]),
            "expected_changed": len(plan["changed"]),
            "expected_previously_failed": len(retried),
            "requests_exactly_new_changed_failed": requested == expected,
            "reused_count": inc["reused_count"], "encoded_count": inc["encoded_count"],
            "failed_count": inc["failed_count"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--image-items", type=int, default=0, help="default: --items")
    p.add_argument("--fail-share", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-text", action="store_true")
    args = p.parse_args()
    setup_logging(logging.INFO)  # progress lines on stderr

    load_start = os.getloadavg()
    result: dict = {"cpu": next((line.split(":", 1)[1].strip() for line in
                                 Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name")), "?"),
                    "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        tmp = Path(tmp)
        if not args.skip_text:
            a, b, _ = catalogues(args.items, args.seed)
            result["text"] = bench_text(write(a, tmp / "ta.parquet"),
                                        write(b, tmp / "tb.parquet"), tmp)
        a, b, plan = catalogues(args.image_items or args.items, args.seed)
        result["images"] = bench_images(a, b, plan, args.fail_share, args.seed, tmp)
    result["load_average_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
