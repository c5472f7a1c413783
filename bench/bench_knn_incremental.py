"""The kNN step at catalogue scale, incremental against full, in one run: a night where a share
of the items changed, its graphs updated from the previous night's (``previous_uri``) and built
in full; the time of each, their recall on the same rows, and each step's peak memory.

    flock /tmp/bench.lock python bench/bench_knn_incremental.py                   # 500k, 2%
    flock /tmp/bench.lock python bench/bench_knn_incremental.py --n 20000        # a quick look
    flock /tmp/bench.lock python bench/bench_knn_incremental.py --n 200000 \\
        --changed 0.05,0.1,0.2,0.35 --exact-max-items 0                        # the threshold
    flock /tmp/bench.lock python bench/bench_knn_incremental.py --nights 8       # night after night

Data: ``clustered_unit_vectors`` (as ``bench/bench_knn.py``) for the text (384-d) and fused
(128-d) vectors, with content keys. A night touches a ``--changed`` share of the items of the
night before: three quarters of them get a new vector (a fresh row of the same distribution)
and key, a quarter are deleted, and as many new items are inserted at random places (the others
keep their order), so N stays the same. Night 1 is built in full (the previous set); per share
a night 2 is updated from it and built in full; with ``--nights``, nights 3, 4, ... (the first
share) are each updated from the update of the night before — the reserves wear down as they
would night after night — and the last one is also built in full. Every step runs in its own
process, with ``REBUILD_WORK_SHARE`` lifted so that an update never falls back to a rebuild;
its peak memory is its own: anonymous memory sampled every 20 ms, which must fit the machine,
and peak RSS, which adds the memory-mapped files the kernel may drop. Recall@k of both graphs
of a night is measured against exact search on the same ``--queries`` random rows.
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
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    KNN_FUSED,
    KNN_TEXT,
    TXT_ARRAY,
    TXT_ITEMS,
)
from item_embeddings.progress import setup_logging
from item_embeddings.storage import write_parquet_atomic

SPACES = {"text": (TXT_ARRAY, KNN_TEXT, 384), "fused": (FUSED_ARRAY, KNN_FUSED, 128)}


class Night:
    """One night's catalogue: ids, content keys, vectors per space, and the pool of fresh rows
    (of the same distribution) that changed and added items take their vectors from."""

    def __init__(self, n: int, extra: int, seed: int):
        from item_embeddings.knn.synthetic import clustered_unit_vectors

        self.pools = {space: clustered_unit_vectors(n + extra, dim, seed=seed + i)
                      for i, (space, (_, _, dim)) in enumerate(SPACES.items())}
        self.rows = np.arange(n)                 # pool row of each item
        self.ids = np.arange(n)                  # item number of each item
        self.next_row = n

    def _fresh(self, count: int) -> np.ndarray:
        self.next_row += count
        return np.arange(self.next_row - count, self.next_row)

    def next(self, share: float, rng: np.random.Generator) -> Night:
        """The next night: ``share`` of the items touched, three quarters of them changed (a
        fresh vector and key), a quarter deleted, as many new items inserted at random places
        (the others keep their order)."""
        night = Night.__new__(Night)
        night.pools, night.next_row = self.pools, self.next_row
        n = len(self.rows)
        touched = int(round(share * n))
        added = touched // 4
        picked = rng.permutation(n)
        changed, deleted = picked[:touched - added], picked[touched - added:touched]
        rows = self.rows.copy()
        rows[changed] = self._fresh(len(changed))
        keep = np.setdiff1d(np.arange(n), deleted)
        at = np.sort(rng.choice(len(keep) + 1, added))
        new_rows = self._fresh(added)
        night.rows = np.insert(rows[keep], at, new_rows)
        night.ids = np.insert(self.ids[keep], at, self.ids.max() + 1 + np.arange(added))
        night.next_row = self.next_row
        return night

    def write(self, folder: Path) -> None:
        """The text and fusion steps' files the kNN step reads."""
        folder.mkdir(parents=True)
        for space, (array, _, _) in SPACES.items():
            np.save(folder / array, self.pools[space][self.rows])
        ids = [f"item{i:08d}" for i in self.ids]
        keys = [f"{int(r) * 0x9E3779B97F4A7C15 % 2 ** 64:016x}{int(r):016x}" for r in self.rows]
        write_parquet_atomic(folder / TXT_ITEMS, pa.table({"id": ids}))
        write_parquet_atomic(folder / FUSED_ITEMS, pa.table({
            "id": ids, "text_key": keys, "image_key": pa.nulls(len(ids), pa.string())}))
        (folder / FUSION_CONFIG).write_text(json.dumps({"run_id": "bench",
                                                        "weights_sha256": "w"}))


def prepare(work: Path, n: int, shares: list[float], nights: int, seed: int) -> None:
    """Night 1; per share a night 2 from it; with ``nights`` > 2, nights 3.. each from the
    night before, with the first share touched."""
    first = Night(n, int(n * (sum(shares) + shares[0] * max(0, nights - 2))) + 8, seed)
    first.write(work / "night1")
    second = {}
    for share in shares:
        second[share] = first.next(share, np.random.default_rng(seed + int(share * 1000)))
        second[share].write(work / f"night2-{share}")
    night = second[shares[0]]
    for number in range(3, nights + 1):
        night = night.next(shares[0], np.random.default_rng(seed + number))
        night.write(work / f"night{number}")


def step(inputs: Path, out: Path, previous: str, k: int, queries: int,
         exact_max: int) -> dict[str, Any]:
    """One kNN step (in this process): its meta, wall time and peak RSS."""
    from item_embeddings.knn import build_knn_graphs, incremental

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


def _row(name: str, tag: str, r: dict[str, Any], n: int) -> str:
    spaces = r["spaces"]
    per = " / ".join(f"{spaces[s]['build_time_sec'] + spaces[s]['query_time_sec']:.0f} + "
                     f"{spaces[s]['recall_time_sec']:.0f}" for s in SPACES)
    counts = " / ".join(f"{spaces[s]['recomputed_count']:,}" for s in SPACES)
    grown = r["peak_anon_mib"] - r["anon_before_mib"]
    return (f"| {tag} | {name} | {r['wall_sec']:.0f} s | {per} | {counts} | "
            f"{r['peak_anon_mib']:,.0f} MiB (+{grown * 2 ** 20 / n:,.0f} B/item) | "
            f"{r['peak_rss_mib']:,.0f} MiB |")


def _night_pair(work: Path, night: Path, previous: Path, tag: str, common: list[str],
                k: int, queries: int, seed: int) -> dict[str, Any]:
    """A night updated from ``previous`` and built in full, and their recall on the same rows."""
    update = _child("--phase", "step", "--inputs", str(night), "--out",
                    str(work / f"inc-{tag}"), "--previous", str(previous), *common)
    full = _child("--phase", "step", "--inputs", str(night), "--out", str(work / f"full-{tag}"),
                  *common)
    recall = compare(night, {"incremental": work / f"inc-{tag}", "full": work / f"full-{tag}"},
                     k, queries, seed)
    return {"incremental": update, "full": full, "same_rows_recall": recall,
            "time_ratio": update["wall_sec"] / full["wall_sec"]}


def _print_tables(results: dict[str, Any], n: int) -> None:
    print("| night, changed | step | wall | per space, text / fused: search + recall check (s) "
          "| rows recomputed (text / fused) | peak anon (growth per item) | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for tag, r in results["nights"].items():
        print(_row("incremental", tag, r["incremental"], n))
        if "full" in r:
            print(_row("full", tag, r["full"], n))
    print("\n| night, changed | incremental / full time | recall@k on the same rows, text: inc / "
          "full | fused: inc / full | rows searched (text / fused) |")
    print("|---|---|---|---|---|")
    for tag, r in results["nights"].items():
        searched = " / ".join(f"{r['incremental']['spaces'][s]['incremental']['searched_count']:,}"
                              for s in SPACES)
        if "full" not in r:
            print(f"| {tag} | – | – | – | {searched} |")
            continue
        rec = r["same_rows_recall"]
        print(f"| {tag} | {r['time_ratio']:.1%} | {rec['text']['incremental']:.4f} / "
              f"{rec['text']['full']:.4f} | {rec['fused']['incremental']:.4f} / "
              f"{rec['fused']['full']:.4f} | {searched} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--changed", default="0.02", help="comma-separated shares of items")
    parser.add_argument("--nights", type=int, default=2,
                        help="nights in a row (the 3rd and later: the first share, updated "
                             "from the night before; the last one also built in full)")
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
    prepare(work, args.n, shares, args.nights, args.seed)
    print(f"data written in {time.perf_counter() - started:.0f} s", flush=True)
    common = ["--k", str(args.k), "--queries", str(args.queries), "--exact-max-items",
              str(args.exact_max_items)]
    results: dict[str, Any] = {"n": args.n, "k": args.k, "loadavg_start": load, "nights": {},
                               "night1": _child("--phase", "step", "--inputs",
                                                str(work / "night1"), "--out",
                                                str(work / "knn1"), *common)}
    for share in shares:
        results["nights"][f"2, {share:.0%}"] = _night_pair(
            work, work / f"night2-{share}", work / "knn1", str(share), common, args.k,
            args.queries, args.seed)
        print(json.dumps(results["nights"][f"2, {share:.0%}"]), flush=True)
    previous = work / f"inc-{shares[0]}"
    for number in range(3, args.nights + 1):
        tag = f"{number}, {shares[0]:.0%}"
        if number == args.nights:
            results["nights"][tag] = _night_pair(work, work / f"night{number}", previous,
                                                 f"night{number}", common, args.k,
                                                 args.queries, args.seed)
        else:
            results["nights"][tag] = {"incremental": _child(
                "--phase", "step", "--inputs", str(work / f"night{number}"), "--out",
                str(work / f"inc-night{number}"), "--previous", str(previous), *common)}
        previous = work / f"inc-night{number}"
        print(json.dumps(results["nights"][tag]), flush=True)
    print(f"\nN = {args.n:,}, k = {args.k}; load average at the end "
          f"{open('/proc/loadavg').read().split()[0]}\n")
    _print_tables(results, args.n)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
