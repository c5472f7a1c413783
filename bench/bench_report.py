"""QA report time, memory and page size on a generated run, against a plain read of its inputs.

For each size a synthetic output set is generated in the documented formats (text and image
step files from ``write_synthetic_catalogue``, a fused array with the same clusters, image
failures, a kNN graph of random rows, and an items table with titles and a category column).
``write_qa_report`` then runs in a fresh child process, timed end to end, with its peak anonymous
memory (heap: memory-mapped array pages are file-backed and reclaimable) and peak RSS. The
baseline is the least any one-pass report must do: read every array once in chunks and the
items table's id, title and category columns, in another child process. The inputs were just
written, so both read from the page cache.

Usage::

    flock /tmp/bench.lock python bench/bench_report.py --sizes 50000 500000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_fusion import PeakMemory, _anon_kib  # same folder: the script's own directory

REASONS = ("http_error", "timeout", "dns_error", "not_an_image", "decode_error")
CHUNK = 50_000


def _unit_rows(rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    x = centres + 0.8 / np.sqrt(centres.shape[1]) * rng.standard_normal(centres.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_run(root: Path, n: int, image_fraction: float, k: int = 10) -> None:
    """A whole synthetic run under ``root``: items.parquet, text/, image/, fused/, knn/."""
    from item_embeddings.fusion.synthetic import write_synthetic_catalogue
    from item_embeddings.outputs import (
        FUSED_ARRAY,
        FUSED_ITEMS,
        FUSION_CONFIG,
        IMG_FAILURES,
        IMG_META,
        KNN_FUSED,
        KNN_FUSED_SCORES,
        KNN_META,
        KNN_TEXT,
        KNN_TEXT_SCORES,
    )
    from item_embeddings.storage import atomic_npy, write_json_atomic, write_parquet_atomic

    rng = np.random.default_rng(0)
    cat = write_synthetic_catalogue(root / "text", root / "image", n=n,
                                    image_fraction=image_fraction, seed=0)
    # failures: a tenth of the items without an image vector, so ids stay disjoint
    without = np.flatnonzero(~cat.has_image)
    failed = np.sort(rng.choice(without, size=len(without) // 10, replace=False))
    reasons = rng.choice(REASONS, size=len(failed), p=(0.5, 0.2, 0.1, 0.1, 0.1))
    write_parquet_atomic(root / "image" / IMG_FAILURES, pa.table({
        "id": [cat.ids[i] for i in failed],
        "url": [f"http://127.0.0.1/{cat.ids[i]}.jpg" for i in failed],
        "reason": reasons, "detail": ["generated"] * len(failed),
        "http_status": pa.array([404 if r == "http_error" else None for r in reasons],
                                pa.int32()),
        "attempts": pa.array(np.ones(len(failed)), pa.int32())}))
    meta = json.loads((root / "image" / IMG_META).read_text())
    m = int(cat.has_image.sum())
    by_reason = {str(r): int((reasons == r).sum()) for r in sorted(set(reasons))}
    write_json_atomic(root / "image" / IMG_META, {
        **meta, "failed_count": len(failed), "attempted_count": m + len(failed),
        "no_url_count": n - m - len(failed), "capped_count": 0, "total_rows": n,
        "failures_by_reason": by_reason})

    centres = rng.standard_normal((int(cat.text_label.max()) + 1, 128))
    (root / "fused").mkdir()
    with atomic_npy(root / "fused" / FUSED_ARRAY, (n, 128)) as fused:
        for start in range(0, n, CHUNK):
            labels = cat.text_label[start:start + CHUNK]
            fused[start:start + CHUNK] = _unit_rows(rng, centres[labels])
    write_parquet_atomic(root / "fused" / FUSED_ITEMS,
                         pa.table({"id": cat.ids, "has_image": cat.has_image}))
    write_json_atomic(root / "fused" / FUSION_CONFIG, {
        "count": n, "items_with_images": m, "items_without_images": n - m, "output_dim": 128,
        "loss_history": [{"loss": 0.5 / e, "sim_loss": 0.5 / e - 0.001, "norm_loss": 0.1 / e}
                         for e in range(1, 6)], "run_id": "bench"})

    (root / "knn").mkdir()
    for index_file, score_file in ((KNN_TEXT, KNN_TEXT_SCORES), (KNN_FUSED, KNN_FUSED_SCORES)):
        with atomic_npy(root / "knn" / index_file, (n, k), np.int32) as rows, \
                atomic_npy(root / "knn" / score_file, (n, k)) as scores:
            for start in range(0, n, CHUNK):
                stop = min(n, start + CHUNK)
                rows[start:stop] = rng.integers(0, n, (stop - start, k))
                scores[start:stop] = -np.sort(-rng.uniform(0.3, 0.95, (stop - start, k)), axis=1)
    space = {"method": "random (bench)", "index_params": {}, "build_time_sec": 0.0,
             "query_time_sec": 0.0, "recall_at_k": 0.0, "recall_queries": 0}
    write_json_atomic(root / "knn" / KNN_META, {
        "k": k, "count": n,
        "spaces": {"text": {**space, "dim": 384}, "fused": {**space, "dim": 128}},
        "run_id": "bench", "wall_time_sec": 0.0, "versions": {}})

    kinds = ["USB-C cable", "wireless earbuds", "keyboard", "HDMI adapter", "portable SSD"]
    labels = np.where(rng.random(n) < 0.05, rng.integers(100, 112, n), cat.text_label)
    write_parquet_atomic(root / "items.parquet", pa.table({
        "asin": cat.ids, "title": [f"Acme {kinds[i % len(kinds)]} {i}" for i in range(n)],
        "main_category": [f"category {label}" for label in labels]}))


def run_report(root: str) -> dict:
    from item_embeddings.report import write_qa_report

    root_path = Path(root)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        summary = write_qa_report(str(root_path / "items.parquet"), root_path / "text",
                                  root_path / "image", root_path / "fused", root_path / "knn",
                                  root_path / "qa_report.html")
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "size_bytes": summary["size_bytes"],
            "peak_anon_mib": mem.peak_anon / 1024, "peak_rss_mib": _anon_kib()[1] / 1024}


def run_baseline(root: str) -> dict:
    """One chunked read of every array and of the items table's three columns."""
    import pyarrow.parquet as pq

    root_path = Path(root)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        total = 0.0
        for path in ("text/txt.npy", "image/img.npy", "fused/fused.npy"):
            array = np.load(root_path / path, mmap_mode="r")
            for start in range(0, len(array), 32768):
                total += float(np.asarray(array[start:start + 32768]).sum())
        table = pq.read_table(root_path / "items.parquet",
                              columns=["asin", "title", "main_category"])
        wall = time.perf_counter() - t0
    assert np.isfinite(total) and table.num_rows
    return {"wall_s": wall, "size_bytes": 0, "peak_anon_mib": mem.peak_anon / 1024,
            "peak_rss_mib": _anon_kib()[1] / 1024}


def _child(kind: str, root: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(root)], check=True,
                          capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 500_000])
    parser.add_argument("--image-fraction", type=float, default=0.3,
                        help="share of items with an image vector (150k of 500k: 0.3)")
    parser.add_argument("--work-dir", help="where the synthetic run goes (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, root = args.child
        print(json.dumps(run_report(root) if kind == "report" else run_baseline(root)))
        return 0
    print("| items | run | wall s | process s | page KB | peak anon MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for n in args.sizes:
            root = Path(tmp) / str(n)
            make_run(root, n, args.image_fraction)
            for kind, name in (("report", "write_qa_report"),
                               ("baseline", "baseline: one read of the inputs")):
                r = _child(kind, root)
                page = f"{r['size_bytes'] / 1000:.0f}" if r["size_bytes"] else "–"
                print(f"| {n} | {name} | {r['wall_s']:.1f} | {r['process_s']:.1f} | {page} "
                      f"| {r['peak_anon_mib']:.0f} | {r['peak_rss_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
