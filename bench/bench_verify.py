"""What the content hashes and the stricter `verify` cost on a full-size output set.

Writes a generated set of the documented shapes (default 500k items, 150k images, kNN k=10)
through the step skeleton, with its QA report (``write_qa_report``), then times, in the same run:

* per group: the step's own writes (baseline) vs ``run.finish`` (hashing its files + the meta);
* one plain sha256 pass over every file of the set (the least any hash check costs);
* ``verify`` of the set without kNN graphs, then with them (the kNN checks' share), each in a
  fresh process after a warm-up call in it (imports, page cache); with ``--baseline-src``, the
  ``verify`` of another source tree (e.g. the one before a change) on the same set too.

The text and fused vectors are groups of k + 1 (or more) near-duplicate rows in random
directions, so the true kNN graph is known without searching (each row's neighbours are the
others of its group) and passes verify's exact search of a sample.

Usage: ``python bench/bench_verify.py [--items 500000] [--images 150000] [--k 10] [--dir D]
[--baseline-src SRC]`` (``--dir`` defaults to a temporary directory; the set takes ~1.5 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    FUSION_EXCLUSIONS,
    FUSION_WEIGHTS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_META,
    QA_REPORT,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.report import write_qa_report
from item_embeddings.step import step_run
from item_embeddings.verify import KNN_SPACES, Report
from item_embeddings.verify.nearest import Recorded, check_nearest, sample_size

CHUNK = 65536
NOISE = 0.3  # norm of a row's offset from its group's direction: cosine ~0.92 inside a group


def unit_rows(path: Path, n: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, CHUNK):
        block = rng.standard_normal((min(CHUNK, n - start), dim), dtype=np.float32)
        arr[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    arr.flush()
    del arr


def group_sizes(n: int, k: int) -> list[tuple[int, int, int]]:
    """(first row, groups, rows per group): groups of k + 1 rows, the last one taking the rest."""
    groups = n // (k + 1)
    return [(0, groups - 1, k + 1), ((groups - 1) * (k + 1), 1, n - (groups - 1) * (k + 1))]


def grouped_unit_rows(path: Path, n: int, dim: int, k: int, seed: int) -> None:
    """Unit rows in groups (:func:`group_sizes`) around random directions: rows of a group have
    cosine ~0.92, rows of two groups at most ~0.3 (d=384) or ~0.5 (d=128) at 500k rows."""
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    directions = rng.standard_normal((n // (k + 1), dim), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    group = np.minimum(np.arange(n) // (k + 1), len(directions) - 1)
    for start in range(0, n, CHUNK):
        rows = slice(start, min(n, start + CHUNK))
        block = directions[group[rows]] + rng.standard_normal(
            (rows.stop - start, dim), dtype=np.float32) * (NOISE / np.sqrt(dim))
        arr[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    arr.flush()
    del arr


def knn_graph(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact kNN graph of :func:`grouped_unit_rows`: the other rows of each row's group,
    most similar first, with their cosine."""
    n = len(vectors)
    idx = np.empty((n, k), np.int32)
    scores = np.empty((n, k), np.float32)
    for first, groups, size in group_sizes(n, k):
        for g0 in range(0, groups, 4096):
            g = min(4096, groups - g0)
            start = first + g0 * size
            block = np.asarray(vectors[start:start + g * size]).reshape(g, size, -1)
            cos = block @ block.transpose(0, 2, 1)
            cos[:, np.arange(size), np.arange(size)] = -np.inf  # never the row itself
            order = np.argsort(-cos, axis=2, kind="stable")[:, :, :k]
            rows = slice(start, start + g * size)
            idx[rows] = (order + (start + np.arange(g) * size)[:, None, None]).reshape(-1, k)
            scores[rows] = np.take_along_axis(cos, order, 2).reshape(-1, k)
    return idx, scores


def timed_verify(root: Path, src: str = "") -> float:
    """Seconds of ``verify_outputs(root)`` in a fresh process (after a warm-up call in it), from
    the package in ``src`` (default: the installed one); the set must pass."""
    code = ("import sys, time\n"
            "from item_embeddings.verify import verify_outputs\n"
            "verify_outputs(sys.argv[1])\n"
            "t = time.perf_counter()\n"
            "report = verify_outputs(sys.argv[1])\n"
            "print(time.perf_counter() - t)\n"
            "assert report.ok, report.violations\n")
    env = {**os.environ, "PYTHONPATH": src} if src else None
    done = subprocess.run([sys.executable, "-c", code, str(root)], env=env, check=True,
                          capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def time_sampled_search(root: Path, k: int) -> None:
    """verify's exact search of a sample, alone per space: its rate, and what the same search
    would take at 10M rows (the sample shrinks there: ``sample_size``)."""
    for space, (idx_name, _, source) in KNN_SPACES.items():
        vectors = np.load(root / source, mmap_mode="r")
        n, dim = vectors.shape
        report = Report(str(root))
        t0 = time.perf_counter()
        check_nearest(space, np.load(root / idx_name, mmap_mode="r"), vectors,
                      Recorded("exact", 1.0, 1000), report)
        seconds = time.perf_counter() - t0
        assert report.ok, report.violations
        rate = sample_size(n, dim) * n * dim / seconds
        at_10m = sample_size(10_000_000, dim) * 10_000_000 * dim / rate
        print(f"  sampled exact search, {space}: {sample_size(n, dim)} rows x {n:,d} x {dim} in "
              f"{seconds:.2f} s ({rate / 1e9:.1f} G multiply-adds/s, reading included); at 10M "
              f"rows: {sample_size(10_000_000, dim)} rows, ~{at_10m:.0f} s at that rate")


def write_report(root: Path, ids: pa.Array, knn: bool) -> float:
    """The set's QA report (and its record) from the set's own files; seconds taken."""
    items = root.parent / f"{root.name}-items.parquet"
    pq.write_table(pa.table({"asin": ids, "title": ids}), items)
    t0 = time.perf_counter()
    write_qa_report(str(items), root, root, root, root if knn else None, root / QA_REPORT,
                    run_id="bench")
    items.unlink()
    return time.perf_counter() - t0


def timed_group(root: Path, name: str, meta_file: str, write) -> dict[str, float]:
    with step_run(name, root, params={}, artifact=name, run_id="bench") as run:
        t0 = time.perf_counter()
        meta = write()
        t1 = time.perf_counter()
        run.finish(meta_file, meta, metrics={})
        t2 = time.perf_counter()
    return {"write": t1 - t0, "finish": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=500_000)
    ap.add_argument("--images", type=int, default=150_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dir", default="")
    ap.add_argument("--baseline-src", default="",
                    help="a source tree (its src/) whose verify is timed on the same set too")
    args = ap.parse_args()
    n, m, k = args.items, args.images, args.k
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    ids = pa.array([f"B{i:09d}" for i in range(n)])
    img_ids = ids.slice(0, m)
    failed = ids.slice(m, 1000)

    def text():
        grouped_unit_rows(root / TXT_ARRAY, n, 384, k, 0)
        pq.write_table(pa.table({"id": ids}), root / TXT_ITEMS)
        return {"count": n, "embed_dim": 384}

    def image():
        unit_rows(root / IMG_ARRAY, m, 512, 1)
        pq.write_table(pa.table({"id": img_ids, "url": pa.array(["http://h/x.jpg"] * m),
                                 "row": pa.array(np.arange(m))}), root / IMG_ITEMS)
        pq.write_table(pa.table({
            "id": failed, "url": pa.array(["http://h/x.jpg"] * 1000),
            "reason": pa.array(["timeout"] * 1000), "detail": pa.array([""] * 1000),
            "http_status": pa.array([None] * 1000, pa.int32()),
            "attempts": pa.array([1] * 1000)}), root / IMG_FAILURES)
        return {"count": m, "embed_dim": 512, "failed_count": 1000,
                "attempted_count": m + 1000, "failures_by_reason": {"timeout": 1000}}

    def fusion():
        grouped_unit_rows(root / FUSED_ARRAY, n, 128, k, 2)
        has_image = np.zeros(n, bool)
        has_image[:m] = True
        pq.write_table(pa.table({"id": ids, "has_image": pa.array(has_image)}),
                       root / FUSED_ITEMS)
        pq.write_table(pa.table({"id": pa.array([], pa.string()),
                                 "reason": pa.array([], pa.string())}), root / FUSION_EXCLUSIONS)
        (root / FUSION_WEIGHTS).write_bytes(np.zeros(200_000, np.float32).tobytes())
        return {"count": n, "items_with_images": m, "output_dim": 128,
                "text_run_id": "bench", "image_run_id": "bench"}

    def knn():
        spaces = {}
        for space, (idx_name, score_name, source) in KNN_SPACES.items():
            vectors = np.load(root / source, mmap_mode="r")
            idx, scores = knn_graph(vectors, k)
            np.save(root / idx_name, idx)
            np.save(root / score_name, scores)
            spaces[space] = {"dim": vectors.shape[1], "method": "exact", "recall_at_k": 1.0,
                             "recall_at": {"1": 1.0, "5": 1.0}, "recall_queries": 1000}
        return {"k": k, "count": n, "spaces": spaces}

    print(f"set: {n:,d} items, {m:,d} images, kNN k={k}, in {root}")
    for name, meta_file, write in [("text", TXT_META, text), ("image", IMG_META, image),
                                   ("fusion", FUSION_CONFIG, fusion)]:
        t = timed_group(root, name, meta_file, write)
        print(f"  {name:7s} step writes {t['write']:6.2f} s | finish (hash + meta) "
              f"{t['finish']:5.2f} s = {100 * t['finish'] / t['write']:4.1f}% of the writes")
    files = sorted(p for p in root.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    t0 = time.perf_counter()
    for p in files:
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    plain = time.perf_counter() - t0
    print(f"  plain sha256 of all {len(files)} files ({total / 1e9:.2f} GB, page cache warm): "
          f"{plain:.2f} s = {total / 1e9 / plain:.2f} GB/s")
    print(f"  QA report (write_qa_report): {write_report(root, ids, knn=False):.2f} s")
    trees = {"this tree": ""} | ({"baseline": args.baseline_src} if args.baseline_src else {})
    without = {name: timed_verify(root, src) for name, src in trees.items()}
    for name, seconds in without.items():
        print(f"  verify ({name}), no kNN: {seconds:.2f} s")
    t = timed_group(root, "knn", KNN_META, knn)
    print(f"  kNN group: writes (incl. generating the graph) {t['write']:.2f} s, finish "
          f"{t['finish']:.2f} s")
    print(f"  QA report, with kNN: {write_report(root, ids, knn=True):.2f} s")
    for name, src in trees.items():
        seconds = timed_verify(root, src)
        print(f"  verify ({name}), with kNN k={k}: {seconds:.2f} s (kNN checks "
              f"{seconds - without[name]:.2f} s)")
    time_sampled_search(root, k)
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
