"""Text step vs plain sentence-transformers, and the step's peak memory at two catalogue sizes.

    python bench/bench_text_step.py                      # speed, real sample (2,000 items)
    python bench/bench_text_step.py --rss 2000 50000     # peak RSS of the whole step

Speed: the baseline is ``SentenceTransformer(all-MiniLM-L6-v2).encode(texts, batch_size=128)`` in
fp32 on the same texts (title + description), timed in the same run as the whole text step (items
read, validated, encoded, written). Memory: each size runs in a fresh process (peak RSS =
``ru_maxrss``) on a generated catalogue, so the growth between the sizes is what streaming costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from item_embeddings.config import PipelineParams

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "amazon_electronics_2000.parquet"


def bench_speed(items: Path, limit: int, backend: str | None) -> dict:
    from sentence_transformers import SentenceTransformer

    from item_embeddings.items import item_text
    from item_embeddings.storage import write_parquet_atomic
    from item_embeddings.text import embed_items_text, resolve_text_model

    table = pq.read_table(items)
    if limit:
        table = table.slice(0, limit)
    tmp = Path(tempfile.mkdtemp(prefix="bench-text-"))
    write_parquet_atomic(tmp / "items.parquet", table)
    texts = [item_text(t, d) for t, d in zip(table.column("title").to_pylist(),
                                             table.column("description").to_pylist())]
    model = SentenceTransformer(resolve_text_model("all-MiniLM-L6-v2").location, device="cpu")
    model.encode(texts[:64], batch_size=128)  # warm-up
    t0 = time.perf_counter()
    base = model.encode(texts, batch_size=128, normalize_embeddings=True)
    base_s = time.perf_counter() - t0

    params = PipelineParams(text_backend=backend) if backend else PipelineParams()
    t0 = time.perf_counter()
    meta = embed_items_text(str(tmp / "items.parquet"), tmp / "out", params)
    step_s = time.perf_counter() - t0  # includes model load and all I/O
    got = np.load(tmp / "out" / "txt.npy")
    cosine = (got * base).sum(axis=1)
    n = len(texts)
    return {"items": n, "cores": os.cpu_count(), "baseline_items_per_s": n / base_s,
            "step_items_per_s_wall": n / step_s,
            "step_items_per_s_encode": meta["throughput_items_per_sec"],
            "speedup_wall": base_s / step_s, "backend": meta.get("text_backend"),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def rss_child(items: Path, backend: str | None) -> dict:
    from item_embeddings.text import embed_items_text

    params = PipelineParams(text_backend=backend) if backend else PipelineParams()
    meta = embed_items_text(str(items), items.parent / "out", params)
    n = meta["count"]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"items": n, "peak_rss_mib": peak_kib / 1024,
            "output_mib": n * meta["embed_dim"] * 4 / 2**20,
            "items_per_s": meta["throughput_items_per_sec"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=Path, default=SAMPLE, help="items parquet (speed mode)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N items only")
    parser.add_argument("--backend", default=None,
                        help="text_backend of the step (default: its default)")
    parser.add_argument("--rss", type=int, nargs="*", metavar="N",
                        help="measure peak RSS of the step at these catalogue sizes")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.backend)))
        return
    if args.rss:
        from item_embeddings.sample import make_sample_catalogue
        from item_embeddings.storage import write_parquet_atomic

        for n in args.rss:
            # The catalogue is generated here, so the child's peak RSS is the step's alone.
            items = Path(tempfile.mkdtemp(prefix="bench-rss-")) / "items.parquet"
            write_parquet_atomic(items, make_sample_catalogue(n))
            cmd = [sys.executable, __file__, "--rss-child", str(items)]
            if args.backend:
                cmd += ["--backend", args.backend]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            print(json.dumps(json.loads(done.stdout.strip().splitlines()[-1])))
        return
    if not args.items.exists():
        sys.exit(f"{args.items} not found (the real sample lives in ../shared/data)")
    print(json.dumps(bench_speed(args.items, args.limit, args.backend), indent=2))


if __name__ == "__main__":
    main()
