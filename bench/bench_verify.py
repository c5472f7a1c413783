"""What the content hashes and the stricter `verify` cost on a full-size output set.

Writes a generated set of the documented shapes (default 500k items, 150k images, kNN k=10)
through the step skeleton, then times, in the same run:

* per group: the step's own writes (baseline) vs ``run.finish`` (hashing its files + the meta);
* one plain sha256 pass over every file of the set (the least any hash check costs);
* ``verify`` of the set without kNN graphs, then with them (the kNN score check's share).

Usage: ``python bench/bench_verify.py [--items 500000] [--images 150000] [--k 10] [--dir D]``
(``--dir`` defaults to a temporary directory; the set takes ~1.5 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
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
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.step import step_run
from item_embeddings.verify import KNN_SPACES, verify_outputs

CHUNK = 65536


def unit_rows(path: Path, n: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, CHUNK):
        block = rng.standard_normal((min(CHUNK, n - start), dim), dtype=np.float32)
        arr[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    arr.flush()
    del arr


def knn_graph(vectors: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random distinct neighbours (not the row itself) with their true cosine, sorted."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    idx = np.empty((n, k), np.int32)
    scores = np.empty((n, k), np.float32)
    for start in range(0, n, 4096):
        rows = np.arange(start, min(n, start + 4096))
        # k distinct offsets in [1, n-1] per row: never the row itself, never twice.
        offsets = (rng.integers(0, n - 1, size=(len(rows), 1))
                   + np.arange(k) * ((n - 1) // k)) % (n - 1) + 1
        cand = (rows[:, None] + offsets) % n
        cos = np.einsum("rd,rkd->rk", vectors[rows], vectors[cand])
        order = np.argsort(-cos, axis=1)
        idx[rows] = np.take_along_axis(cand, order, 1)
        scores[rows] = np.take_along_axis(cos, order, 1)
    return idx, scores


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
    args = ap.parse_args()
    n, m, k = args.items, args.images, args.k
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    ids = pa.array([f"B{i:09d}" for i in range(n)])
    img_ids = ids.slice(0, m)
    failed = ids.slice(m, 1000)

    def text():
        unit_rows(root / TXT_ARRAY, n, 384, 0)
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
        unit_rows(root / FUSED_ARRAY, n, 128, 2)
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
            idx, scores = knn_graph(vectors, k, 3)
            np.save(root / idx_name, idx)
            np.save(root / score_name, scores)
            spaces[space] = {"dim": vectors.shape[1], "method": "random"}
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
    verify_outputs(str(root))  # warm-up: imports, page cache
    t0 = time.perf_counter()
    report = verify_outputs(str(root))
    v1 = time.perf_counter() - t0
    assert report.ok, report.violations
    print(f"  verify, no kNN: {v1:.2f} s")
    t = timed_group(root, "knn", KNN_META, knn)
    print(f"  kNN group: writes (incl. generating the graph) {t['write']:.2f} s, finish "
          f"{t['finish']:.2f} s")
    t0 = time.perf_counter()
    report = verify_outputs(str(root))
    v2 = time.perf_counter() - t0
    assert report.ok, report.violations
    print(f"  verify, with kNN k={k}: {v2:.2f} s (kNN checks {v2 - v1:.2f} s)")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
