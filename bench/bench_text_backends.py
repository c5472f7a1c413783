"""Text backends: speed and the quality gate, side by side with plain sentence-transformers.

Baseline: ``SentenceTransformer(all-MiniLM-L6-v2).encode(texts, batch_size=128)`` in float32 on
the same texts in the same run. Each backend's fast model is built (or taken from the cache)
before its clock starts; the build time is printed separately.

Run from the project root (wrap in ``flock /tmp/bench.lock`` on a shared machine)::

    python bench/bench_text_backends.py ../shared/data/amazon_electronics_2000.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq


def cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "no avx2"


def timed_encode(encode, texts: list[str]) -> tuple[np.ndarray, float, float]:
    """Vectors, wall seconds and this process's CPU seconds (all threads) of one encode call.

    CPU seconds move much less than wall seconds when other jobs share the cores, so the
    speedup in CPU time is the steadier comparison on a shared machine.
    """
    encode(texts[:32])  # warm-up: first-call allocations and kernel selection
    t0, c0 = time.perf_counter(), time.process_time()
    vectors = encode(texts)
    return (np.asarray(vectors, dtype=np.float32), time.perf_counter() - t0,
            time.process_time() - c0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("items", help="parquet file with title and description columns")
    parser.add_argument("--limit", type=int, default=0, help="first N items only (0 = all)")
    parser.add_argument("--backends", default="onnx,onnx-int8",
                        help="comma-separated backends to compare with the baseline")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from item_embeddings.items import item_text
    from item_embeddings.text import load_text_encoder, resolve_text_model
    from item_embeddings.text.quality import quality_gate

    table = pq.read_table(args.items, columns=["title", "description"]).to_pydict()
    texts = [item_text(t, d) for t, d in zip(table["title"], table["description"])]
    if args.limit:
        texts = texts[:args.limit]
    n = len(texts)
    print(f"{n} items, {os.cpu_count()} cores, cpu: {cpu_features()}, "
          f"load average {os.getloadavg()[0]:.2f}")

    plain = SentenceTransformer(resolve_text_model("all-MiniLM-L6-v2").location, device="cpu")
    reference, base_s, base_cpu = timed_encode(
        lambda t: plain.encode(t, batch_size=128, normalize_embeddings=True), texts)
    rows = [{"backend": "baseline (sentence-transformers fp32, batch 128)",
             "items_per_s": n / base_s, "speedup": 1.0, "cpu_s_per_item": base_cpu / n,
             "speedup_cpu": 1.0, "build_s": 0.0,
             "cosine_mean": 1.0, "cosine_min": 1.0, "top10_overlap": 1.0, "passed": True}]
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        t0 = time.perf_counter()
        encoder = load_text_encoder("all-MiniLM-L6-v2", backend=backend, device="cpu")
        build_s = time.perf_counter() - t0
        vectors, secs, cpu = timed_encode(encoder.encode, texts)
        rows.append({"backend": backend, "items_per_s": n / secs, "speedup": base_s / secs,
                     "cpu_s_per_item": cpu / n, "speedup_cpu": base_cpu / cpu,
                     "build_s": build_s, **quality_gate(reference, vectors),
                     "model_sha256": getattr(encoder, "model_sha256", None)})
        del encoder

    print(f"{'backend':<50} {'items/s':>8} {'speedup':>8} {'CPU ms/item':>11} {'speedup':>8} "
          f"{'cos mean':>9} {'cos min':>8} {'top10':>6} {'gate':>5} {'load+build s':>12}")
    for r in rows:
        print(f"{r['backend']:<50} {r['items_per_s']:8.1f} {r['speedup']:7.2f}x "
              f"{1000 * r['cpu_s_per_item']:11.1f} {r['speedup_cpu']:7.2f}x "
              f"{r['cosine_mean']:9.4f} {r['cosine_min']:8.4f} {r['top10_overlap']:6.3f} "
              f"{'pass' if r['passed'] else 'FAIL':>5} {r['build_s']:12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"items": n, "cores": os.cpu_count(), "cpu": cpu_features(), "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
