"""The fan-out's own work at 500k rows: the merge of per-shard outputs against a plain copy of
the same bytes, and the planning step against a plain read of the columns it needs.

For each size, ``--shards`` worker outputs are generated in the formats the text and image
workers write (``shard-NNNNN/`` folders with ``txt.npy`` [n, 384], ``txt_items.parquet`` with
ids and content keys, ``txt_meta.json``; ``img.npy`` [m, 512] for ``--image-fraction`` of the
rows, ``img_items.parquet``, ``img_failures.parquet``, ``img_meta.json``), spread over
``--workers`` worker folders as the plan deals them out. Then, each in a fresh child process:

* ``merge_text_shards`` and ``merge_image_shards``, timed end to end: what the merge steps run
  (concatenation, the renumbered image rows, the merged meta files, the sha256 of every output
  that ``verify`` checks);
* the baseline: the least any merge must do, a plain byte copy of every shard's array and
  parquet files into one file each (``shutil.copyfileobj``), no hashing.

The inputs were just written, so both read from the page cache; on Vertex the shard outputs
are read through the Cloud Storage FUSE mount instead (not measured here). The estimator takes
its merge rate (bytes of arrays merged per second) from the 500,000-row text merge.

Planning: an items table of the same size (``--items-sample``, the real sample, tiled; one
parquet file) and ``plan_shards`` (validation of the id,
title, description and URL columns, then the URL rows per shard) in a fresh process, against
``pyarrow.parquet.read_table`` of the id and URL columns.

Usage::

    flock /tmp/bench.lock python bench/bench_merge.py --sizes 500000 --shards 16 --workers 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_fusion import PeakMemory, _anon_kib  # same folder: the script's own directory

TEXT_DIM, IMAGE_DIM = 384, 512
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_electronics_2000.parquet"


def make_shards(root: Path, n: int, shards: int, workers: int, image_fraction: float) -> list:
    """Worker folders holding the shard outputs of ``n`` rows; returns the plan's workers."""
    from item_embeddings.fanout import SHARD_DIR, Shard, deal, shard_bounds
    from item_embeddings.outputs import (
        IMG_ARRAY,
        IMG_FAILURES,
        IMG_ITEMS,
        IMG_META,
        TXT_ARRAY,
        TXT_ITEMS,
        TXT_META,
    )
    from item_embeddings.storage import atomic_npy, write_json_atomic, write_parquet_atomic

    rng = np.random.default_rng(0)
    bounds = shard_bounds(n, shards)
    plan = [Shard(i, bounds[i], bounds[i + 1], None) for i in range(shards)]
    dealt = deal(plan, workers)
    for shard in plan:
        rows = shard.stop - shard.start
        ids = [f"item-{i:08d}" for i in range(shard.start, shard.stop)]
        for kind in ("text", "image"):
            out = root / f"{kind}-worker-{shard.index % len(dealt)}" / SHARD_DIR.format(shard.index)
            out.mkdir(parents=True)
            if kind == "text":
                with atomic_npy(out / TXT_ARRAY, (rows, TEXT_DIM)) as a:
                    a[:] = rng.standard_normal((rows, TEXT_DIM), dtype=np.float32)
                write_parquet_atomic(out / TXT_ITEMS, pa.table({
                    "id": ids, "key": [f"{i:032x}" for i in range(shard.start, shard.stop)]}))
                write_json_atomic(out / TXT_META, {"embed_dim": TEXT_DIM, "count": rows,
                                                   "encode_time_sec": 1.0, "encoded_count": rows,
                                                   "reused_count": 0,
                                                   "encoder_fingerprint": "bench"})
                continue
            picked = np.flatnonzero(rng.random(rows) < image_fraction)
            with atomic_npy(out / IMG_ARRAY, (len(picked), IMAGE_DIM)) as a:
                a[:] = rng.standard_normal((len(picked), IMAGE_DIM), dtype=np.float32)
            write_parquet_atomic(out / IMG_ITEMS, pa.table({
                "id": [ids[i] for i in picked],
                "url": [f"http://127.0.0.1/{ids[i]}.jpg" for i in picked],
                "row": pa.array(np.arange(len(picked)), pa.int64())}))
            write_parquet_atomic(out / IMG_FAILURES, pa.table({
                "id": pa.array([], pa.string()), "url": pa.array([], pa.string()),
                "reason": pa.array([], pa.string()), "http_status": pa.array([], pa.int32()),
                "attempts": pa.array([], pa.int32())}))
            write_json_atomic(out / IMG_META, {
                "embed_dim": IMAGE_DIM, "count": len(picked), "total_rows": rows,
                "encode_time_sec": 1.0, "encoded_this_attempt": len(picked),
                "download_wall_s": 1.0, "decode_cpu_s": 1.0, "encode_wall_s": 1.0,
                "throughput_items_per_sec": float(len(picked) or 1),
                "encoded_count": len(picked), "failed_count": 0, "reused_count": 0,
                "revalidated_count": 0, "failures_by_reason": {},
                "encoder_fingerprint": "bench"})
    return [{"worker": w, "shards": [s.as_dict() for s in mine]} for w, mine in enumerate(dealt)]


def run_merge(root: str, kind: str, out: str) -> dict:
    from item_embeddings.config import PipelineParams
    from item_embeddings.fanout import ShardPlan, merge_image_shards, merge_text_shards

    workers = json.loads((Path(root) / "workers.json").read_text())
    parts = sorted(str(p) for p in Path(root).glob(f"{kind}-worker-*"))
    merge = merge_text_shards if kind == "text" else merge_image_shards
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        meta = merge(parts, ShardPlan.from_workers(workers), out, PipelineParams(), run_id="b")
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": meta["count"], "peak_anon_mib": mem.peak_anon / 1024}


def run_copy(root: str, kind: str, out: str) -> dict:
    """Every shard file of ``kind`` appended to one file per name, in shard order."""
    names = ("txt.npy", "txt_items.parquet") if kind == "text" else (
        "img.npy", "img_items.parquet", "img_failures.parquet")
    shard_dirs = sorted(Path(root).glob(f"{kind}-worker-*/shard-*"), key=lambda p: p.name)
    Path(out).mkdir(parents=True)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        for name in names:
            with open(Path(out) / name, "wb") as dest:
                for d in shard_dirs:
                    with open(d / name, "rb") as src:
                        shutil.copyfileobj(src, dest, 8 << 20)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_anon_mib": mem.peak_anon / 1024}


def make_items(path: Path, n: int, sample: str) -> None:
    """``n`` rows of the real sample tiled (ids suffixed per copy so they stay unique), one
    parquet file as pyarrow writes it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    base = pq.read_table(sample)
    copies = []
    for k in range(-(-n // base.num_rows)):
        ids = pc.binary_join_element_wise(base["asin"], pa.scalar(f"-{k}"), "")
        copies.append(base.set_column(base.schema.get_field_index("asin"), "asin", ids))
    pq.write_table(pa.concat_tables(copies).slice(0, n), path)


def run_plan(items: str, shards: str) -> dict:
    from item_embeddings.config import PipelineParams
    from item_embeddings.fanout import plan_shards

    t0 = time.perf_counter()
    plan = plan_shards(items, PipelineParams(shards=int(shards)))
    return {"wall_s": time.perf_counter() - t0, "shards": len(plan.shards)}


def run_read(items: str, _: str) -> dict:
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    table = pq.read_table(items, columns=["asin", "image_url"])
    return {"wall_s": time.perf_counter() - t0, "rows": table.num_rows}


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"child {args[:1]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500_000])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--workers", type=int, default=16,
                        help="worker folders the shards are dealt to (max_parallel_shards)")
    parser.add_argument("--image-fraction", type=float, default=0.3)
    parser.add_argument("--items-sample", default=str(SAMPLE),
                        help="items parquet tiled for the planning run (default: %(default)s)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        run = {"merge": run_merge, "copy": run_copy, "plan": run_plan, "read": run_read}[what]
        print(json.dumps(run(*rest)))
        return
    print(f"anon memory of this process at start: {_anon_kib()[0] / 1024:.0f} MiB", flush=True)
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            root = Path(tmp)
            workers = make_shards(root, n, args.shards, args.workers, args.image_fraction)
            (root / "workers.json").write_text(json.dumps(workers))
            for kind in ("text", "image"):
                array = "txt.npy" if kind == "text" else "img.npy"
                nbytes = sum(p.stat().st_size for p in root.glob(f"{kind}-worker-*/shard-*/*"))
                array_bytes = sum(p.stat().st_size
                                  for p in root.glob(f"{kind}-worker-*/shard-*/{array}"))
                copy = child(["copy", tmp, kind, str(root / f"copy-{kind}")])
                merged = child(["merge", tmp, kind, str(root / f"merged-{kind}")])
                print(json.dumps({
                    "items": n, "kind": kind, "shards": args.shards, "rows": merged["rows"],
                    "shard_bytes": nbytes, "array_bytes": array_bytes,
                    "merge_s": round(merged["wall_s"], 2), "copy_s": round(copy["wall_s"], 2),
                    "merge_over_copy": round(merged["wall_s"] / copy["wall_s"], 2),
                    "merge_array_mb_per_s": round(array_bytes / merged["wall_s"] / 1e6, 1),
                    "merge_peak_anon_mib": round(merged["peak_anon_mib"]),
                    "copy_peak_anon_mib": round(copy["peak_anon_mib"])}), flush=True)
                shutil.rmtree(root / f"copy-{kind}")
                shutil.rmtree(root / f"merged-{kind}")
            items = root / "items.parquet"
            make_items(items, n, args.items_sample)
            read = child(["read", str(items), "0"])
            plan = child(["plan", str(items), str(args.shards)])
            print(json.dumps({
                "items": n, "kind": "plan", "shards": plan["shards"],
                "items_bytes": items.stat().st_size, "plan_s": round(plan["wall_s"], 2),
                "read_id_url_s": round(read["wall_s"], 2),
                "plan_rows_per_s": round(n / plan["wall_s"])}), flush=True)


if __name__ == "__main__":
    main()
