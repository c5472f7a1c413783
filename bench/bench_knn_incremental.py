"""The kNN step at catalogue scale, incremental against full, in one run: a night where a share
of the items changed, its graphs updated from the previous night's (``previous_uri``) and built
in full; the time of each, their recall on the same rows, and each step's peak memory.

    flock /tmp/bench.lock python bench/bench_knn_incremental.py                   # 500k, 2%
    flock /tmp/bench.lock python bench/bench_knn_incremental.py --n 20000        # a quick look
    flock /tmp/bench.lock python bench/bench_knn_incremental.py --n 200000 \\
        --changed 0.02,0.1,0.25,0.4 --exact-max-items 0                        # the threshold

Data: ``clustered_unit_vectors`` (as ``bench/bench_knn.py``) for the text (384-d) and fused
(128-d) vectors of night 1. Night 2 takes a ``--changed`` share of night 1's items: three
quarters of it get a new vector (a fresh row of the same distribution), the last quarter is new
items inserted at random places, and as many items as were added are deleted, so N stays the
same. Every step runs in its own process (its peak memory is its own: anonymous memory sampled
every 20 ms, which must fit the machine, and peak RSS, which adds the memory-mapped files the
kernel may drop): night 1 in full (the
previous set), then per share night 2 updated (with ``REBUILD_WORK_SHARE`` lifted so that it
never falls back to a rebuild) and night 2 in full. Recall@k of both graphs is then measured
against exact search on the same ``--queries`` random rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench_fusion import PeakMemory, _anon_kib  # same folder: the script's own directory
from item_embeddings.config import PipelineParams
from item_embeddings.outputs import (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, KNN_FUSED,
                                     KNN_TEXT, TXT_ARRAY, TXT_ITEMS)
from item_embeddings.progress import setup_logging
from item_embeddings.storage import write_parquet_atomic

SPACES = {"text": (TXT_ARRAY, KNN_TEXT, 384), "fused": (FUSED_ARRAY, KNN_FUSED, 128)}


def _write_night(folder: Path, ids: list[str], vectors: dict[str, np.ndarray],
                 keys: list[str]) -> None:
    folder.mkdir(parents=True)
    for space, (array, _, _) in SPACES.items():
        np.save(folder / array, vectors[space])
    write_parquet_atomic(folder / TXT_ITEMS, pa.table({"id": ids}))
    write_parquet_atomic(folder / FUSED_ITEMS, pa.table({
        "id": ids, "text_key": keys, "image_key": pa.nulls(len(ids), pa.string())}))
    (folder / FUSION_CONFIG).write_text(json.dumps({"run_id": "bench", "weights_sha256": "w"}))


def prepare(work: Path, n: int, shares: list[float], seed: int) -> None:
    """Night 1 and one night 2 per share, as step outputs the kNN step reads."""
    from item_embeddings.knn.synthetic import clustered_unit_vectors

    spare = int(n * max(shares)) + 1
    pools = {space: clustered_unit_vectors(n + spare, dim, seed=seed + i)
             for i, (space, (_, _, dim)) in enumerate(SPACES.items())}
    ids = np.array([f"item{i:08d}" for i in range(n + spare)])
    keys = np.array([f"{i * 0x9E3779B97F4A7C15 % 2 ** 64:016x}{i:016x}"  # content keys
                     for i in range(n + spare)])
    _write_night(work / "night1", ids[:n].tolist(), {s: p[:n] for s, p in pools.items()},
                 keys[:n].tolist())
    for share in shares:
        rng = np.random.default_rng(seed + int(share * 1000))
        touched = int(round(share * n))
        added = touched // 4
        picked = rng.permutation(n)
        changed, deleted = picked[:touched - added], picked[touched - added:touched]
        rows = np.setdiff1d(np.arange(n), deleted)
        night_ids = ids[rows].tolist()
        night_keys = keys[:n].copy()
        night_keys[changed] = keys[n:n + len(changed)]
        night_keys = night_keys[rows].tolist()
        vectors = {}
        for space, pool in pools.items():
            v = pool[:n].copy()
            v[changed] = pool[n:n + len(changed)]
            vectors[space] = v[rows]
        at = np.sort(rng.choice(len(rows) + 1, added))     # insertion places, in order
        new = np.arange(n + len(changed), n + len(changed) + added)
        for offset, (place, row) in enumerate(zip(at, new)):
            night_ids.insert(place + offset, ids[row])
            night_keys.insert(place + offset, keys[row])
        for space, pool in pools.items():
            vectors[space] = np.insert(vectors[space], at, pool[new], axis=0)
        _write_night(work / f"night2-{share}", night_ids, vectors, night_keys)


def step(inputs: Path, out: Path, previous: str, k: int, queries: int,
         exact_max: int) -> dict[str, Any]:
    """One kNN step (in this process): its meta, wall time and peak RSS."""
    from item_embeddings.knn import build_knn_graphs
    from item_embeddings.knn import incremental

    incremental.REBUILD_WORK_SHARE = {m: 1.0 for m in incremental.REBUILD_WORK_SHARE}
    params = PipelineParams(knn_k=k, knn_recall_queries=queries, previous_uri=previous,
                            knn_exact_max_items=exact_max)
    before = _anon_kib()[0]
    with PeakMemory() as mem:
        started = time.perf_counter()
        meta = build_knn_graphs(inputs, inputs, out, params)
        wall = time.perf_counter() - started
    return {"wall_sec": wall, "peak_anon_mib": mem.peak_anon / 1024,
            "anon_before_mib": before / 1024, "peak_rss_mib": _anon_kib()[1] / 1024,
            "spaces": meta["spaces"], "loadavg_after": open("/proc/loadavg").read().split()[0]}


def compare(inputs: Path, graphs: dict[str, Path], k: int, queries: int,
            seed: int) -> dict[str, dict[str, float]]:
    """Recall@k of each graph against exact search on the same random rows, per space."""
    from item_embeddings.knn import exact_knn, recall_at_k, unit_rows

    out: dict[str, dict[str, float]] = {}
    for space, (array, graph_file, _) in SPACES.items():
        x = unit_rows(np.load(inputs / array, mmap_mode="r"), k)
        sample = np.sort(np.random.default_rng(seed + 7).choice(len(x), queries, replace=False))
        _, exact = exact_knn(x, k, queries=sample)
        out[space] = {name: recall_at_k(x, np.load(folder / graph_file), sample, exact)
                      for name, folder in graphs.items()}
    return out


def _child(*args: str) -> dict[str, Any]:
    """Run a phase of this script in a fresh process and return its JSON result."""
    result = subprocess.run([sys.executable, __file__, *args], check=True,
                            stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _row(name: str, share: float, r: dict[str, Any], n: int) -> str:
    spaces = r["spaces"]
    per = " / ".join(f"{spaces[s]['build_time_sec'] + spaces[s]['query_time_sec']:.0f} + "
                     f"{spaces[s]['recall_time_sec']:.0f}" for s in SPACES)
    counts = " / ".join(f"{spaces[s]['recomputed_count']:,}" for s in SPACES)
    grown = r["peak_anon_mib"] - r["anon_before_mib"]
    return (f"| {share:.0%} | {name} | {r['wall_sec']:.0f} s | {per} | {counts} | "
            f"{r['peak_anon_mib']:,.0f} MiB (+{grown * 2 ** 20 / n:,.0f} B/item) | "
            f"{r['peak_rss_mib']:,.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--changed", default="0.02", help="comma-separated shares of items")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--queries", type=int, default=1000, help="recall sample")
    parser.add_argument("--exact-max-items", type=int, default=100_000,
                        help="knn_exact_max_items (0: the IVF path at any N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/bench-knn-incremental")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one step in a child
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--previous", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "step":
        setup_logging(logging.INFO)
        print(json.dumps(step(Path(args.inputs), Path(args.out), args.previous, args.k,
                              args.queries, args.exact_max_items)))
        return
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    shares = [float(s) for s in args.changed.split(",")]
    load = open("/proc/loadavg").read().split()[:3]
    print(f"load average at start: {' '.join(load)}; cpus {os.cpu_count()}", flush=True)
    started = time.perf_counter()
    prepare(work, args.n, shares, args.seed)
    print(f"data written in {time.perf_counter() - started:.0f} s", flush=True)
    common = ["--k", str(args.k), "--queries", str(args.queries), "--exact-max-items",
              str(args.exact_max_items)]
    first = _child("--phase", "step", "--inputs", str(work / "night1"), "--out",
                   str(work / "knn1"), *common)
    results: dict[str, Any] = {"n": args.n, "k": args.k, "loadavg_start": load,
                               "night1": first, "nights": {}}
    for share in shares:
        night = work / f"night2-{share}"
        update = _child("--phase", "step", "--inputs", str(night), "--out",
                        str(work / f"inc-{share}"), "--previous", str(work / "knn1"), *common)
        full = _child("--phase", "step", "--inputs", str(night), "--out",
                      str(work / f"full-{share}"), *common)
        recall = compare(night, {"incremental": work / f"inc-{share}",
                                 "full": work / f"full-{share}"}, args.k, args.queries,
                         args.seed)
        results["nights"][str(share)] = {"incremental": update, "full": full,
                                         "same_rows_recall": recall,
                                         "time_ratio": update["wall_sec"] / full["wall_sec"]}
        print(json.dumps(results["nights"][str(share)]), flush=True)
    print(f"\nN = {args.n:,}, k = {args.k}; load average at the end "
          f"{open('/proc/loadavg').read().split()[0]}\n")
    print("| changed | step | wall | per space, text / fused: search + recall check (s) "
          "| rows recomputed (text / fused) | peak anon (growth per item) | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for share, r in results["nights"].items():
        print(_row("incremental", float(share), r["incremental"], args.n))
        print(_row("full", float(share), r["full"], args.n))
    print("\n| changed | incremental / full time | recall@k on the same rows, text: inc / full "
          "| fused: inc / full |")
    print("|---|---|---|---|")
    for share, r in results["nights"].items():
        rec = r["same_rows_recall"]
        print(f"| {float(share):.0%} | {r['time_ratio']:.1%} | {rec['text']['incremental']:.4f}"
              f" / {rec['text']['full']:.4f} | {rec['fused']['incremental']:.4f} / "
              f"{rec['fused']['full']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
