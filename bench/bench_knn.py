"""kNN graphs at catalogue scale: the approximate path's time and recall, the exact path's
throughput against a plain ``X @ X.T`` block + ``np.argpartition`` baseline, in one run.

Data: ``item_embeddings.knn.synthetic.clustered_unit_vectors`` (topics of log-normal sizes, each
varying along its own 12-d subspace, plus isotropic noise), at each dimension asked for.

    flock /tmp/bench.lock python bench/bench_knn.py                      # 500k, d=128 and 384
    flock /tmp/bench.lock python bench/bench_knn.py --n 20000 --dims 64  # a quick look

For each dimension it reports: the whole ``build_knn_graph`` call forced onto the IVF path
(``exact_max_items=0``: normalising, k-means, adding, nprobe tuning, searching all N rows, and
measuring recall@k on ``--queries`` random rows against exact search); the exact path
(``exact_knn``) on ``--exact-queries`` rows against all N rows; and the baseline on the same
rows, whose neighbours must agree with the exact path's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from typing import Any

import numpy as np
import torch

from item_embeddings.knn import build_knn_graph, exact_knn, recall_at_k, unit_rows
from item_embeddings.knn.graph import QUERY_BLOCK
from item_embeddings.knn.synthetic import clustered_unit_vectors
from item_embeddings.progress import setup_logging

BASELINE_BLOCK = 256    # query rows per baseline block: [256, N] float32 = 0.5 GB at N = 500k


def baseline_knn(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain way: a block of query rows times all rows, argpartition, sort the k + 1."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), BASELINE_BLOCK):
        rows = queries[start:start + BASELINE_BLOCK]
        block = x[rows] @ x.T
        block[np.arange(len(rows)), rows] = -np.inf            # self
        top = np.argpartition(-block, k, axis=1)[:, :k]
        top_scores = np.take_along_axis(block, top, 1)
        order = np.argsort(-top_scores, axis=1)
        ids[start:start + len(rows)] = np.take_along_axis(top, order, 1)
        scores[start:start + len(rows)] = np.take_along_axis(top_scores, order, 1)
    return ids, scores


def bench_dim(n: int, dim: int, k: int, queries: int, exact_queries: int, seed: int,
              full_exact: bool) -> dict[str, Any]:
    started = time.perf_counter()
    raw = clustered_unit_vectors(n, dim, seed=seed)
    generate = time.perf_counter() - started

    started = time.perf_counter()
    graph = build_knn_graph(raw, k, exact_max_items=0, recall_queries=queries, seed=seed,
                            what=f"{dim}-d vectors")
    approx_wall = time.perf_counter() - started

    x = unit_rows(raw, k)
    del raw
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, exact_queries, replace=False))
    started = time.perf_counter()
    ids, scores = exact_knn(x, k, queries=rows, device=torch.device("cpu"))
    exact_time = time.perf_counter() - started
    started = time.perf_counter()
    base_ids, base_scores = baseline_knn(x, rows, k)
    base_time = time.perf_counter() - started
    np.testing.assert_allclose(scores, base_scores, atol=1e-5)
    agree = float((ids == base_ids).mean())
    params = graph.index_params
    measured: dict[str, Any] = {}
    if full_exact:  # the whole exact graph, and the approximate graph's recall over every row
        started = time.perf_counter()
        exact = build_knn_graph(x, k, exact_max_items=n, recall_queries=queries, seed=seed,
                                what=f"{dim}-d vectors")
        measured = {"exact_full_graph_sec": time.perf_counter() - started,
                    "approx_recall_all_rows": recall_at_k(x, graph.neighbours, np.arange(n),
                                                          exact.scores)}
    return {**measured, "n": n, "dim": dim, "k": k, "generate_sec": generate,
            "approx_wall_sec": approx_wall, "approx_build_sec": graph.build_time_sec,
            "approx_tune_sec": params["tune_time_sec"], "approx_query_sec": graph.query_time_sec,
            "approx_recall_sec": graph.recall_time_sec, "recall_at_k": graph.recall_at_k,
            "recall_queries": graph.recall_queries, "index": params["index"],
            "nprobe": params["nprobe"], "tune_recall_by_nprobe": params["tune_recall_by_nprobe"],
            "exact_queries": exact_queries, "exact_qps": exact_queries / exact_time,
            "baseline_qps": exact_queries / base_time,
            "exact_vs_baseline": base_time / exact_time, "exact_baseline_id_agreement": agree,
            "exact_full_graph_est_sec": n * exact_time / exact_queries,
            "baseline_full_graph_est_sec": n * base_time / exact_queries}


def _exact_graph(result: dict[str, Any]) -> str:
    if "exact_full_graph_sec" in result:
        return (f"{result['exact_full_graph_sec']:.0f} s measured (approximate graph's recall "
                f"over all rows {result['approx_recall_all_rows']:.4f})")
    return f"{result['exact_full_graph_est_sec']:.0f} s (est.)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--dims", default="128,384", help="comma-separated dimensions")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--queries", type=int, default=1000, help="recall sample")
    parser.add_argument("--exact-queries", type=int, default=2 * QUERY_BLOCK,
                        help="rows searched by the exact path and the baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-exact", action="store_true",
                        help="also build the whole exact graph (time, and the approximate "
                             "graph's recall over every row)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    setup_logging(logging.INFO)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"load average at start: {' '.join(load)}; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}", flush=True)
    results = []
    for dim in (int(d) for d in args.dims.split(",")):
        result = bench_dim(args.n, dim, args.k, args.queries, args.exact_queries, args.seed,
                           args.full_exact)
        result["loadavg_after"] = open("/proc/loadavg").read().split()[0]
        results.append(result)
        print(json.dumps(result), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MiB\n")
    print("| d | approx wall (build / tune / search / recall) | index, nprobe | recall@k "
          "| exact q/s | baseline q/s | exact vs baseline | exact full graph |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dim']} | {r['approx_wall_sec']:.0f} s ({r['approx_build_sec']:.0f} / "
              f"{r['approx_tune_sec']:.0f} / {r['approx_query_sec']:.0f} / "
              f"{r['approx_recall_sec']:.0f}) | {r['index']}, {r['nprobe']} | "
              f"{r['recall_at_k']:.4f} | {r['exact_qps']:.0f} | {r['baseline_qps']:.0f} | "
              f"{r['exact_vs_baseline']:.2f}x | {_exact_graph(r)} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"loadavg_start": load, "peak_rss_mib": peak, "results": results}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
