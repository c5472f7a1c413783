"""Fusion step speed and memory on a synthetic catalogue, against a plain in-memory baseline
and, with ``--compare-rev``, against the step of another git revision in the same run.

The step (``fuse_item_embeddings``, defaults: 5 epochs, batch 512, hidden 256, output 128) runs in
a child process per size, timed end to end (validation, training, writing: "wall s"; "process s"
adds the interpreter's start and the imports of torch and the package), with its peak
anonymous memory (heap; memory-mapped input pages are file-backed and reclaimable) and peak RSS.
The baseline is the plain way to write it: load both arrays, materialise the zero-padded
[N, 897] concatenation in memory and train an ``nn.Sequential`` on dense batches with the same
objective, epochs and batch size. ``--compare-rev REV`` exports ``src/`` of that revision
(``git archive``) and runs its step on the same inputs, alternating with this tree's step
``--repeat`` times, so both see the same machine load.

Usage::

    flock /tmp/bench.lock python bench/bench_fusion.py --sizes 25000 100000 --image-fraction 0.3
    flock /tmp/bench.lock python bench/bench_fusion.py --sizes 100000 --image-fraction 1.0
    flock /tmp/bench.lock python bench/bench_fusion.py --sizes 500000 --no-baseline \\
        --compare-rev f52d438 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _anon_kib() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["RssAnon"].split()[0]), int(fields["VmHWM"].split()[0])


class PeakMemory:
    """Samples RssAnon every 20 ms in a thread; VmHWM gives peak RSS."""

    def __init__(self):
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, _anon_kib()[0])
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, _anon_kib()[0])


def run_step(text_dir: str, image_dir: str, out: str, threads: int) -> dict:
    from item_embeddings.fusion import fuse_item_embeddings

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        meta = fuse_item_embeddings(text_dir, image_dir, out, num_threads=threads, run_id="bench")
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "load_s": meta["load_time_sec"], "train_s": meta["train_time_sec"],
            "write_s": meta["write_time_sec"], "final_loss": meta["final_loss"],
            "best_epoch": meta.get("best_epoch"),
            "peak_anon_mib": mem.peak_anon / 1024, "peak_rss_mib": _anon_kib()[1] / 1024}


def run_baseline(text_dir: str, image_dir: str, threads: int, epochs: int = 5,
                 batch_size: int = 512, seed: int = 0) -> dict:
    """The plain version: dense [N, 897] matrix in memory, one nn.Sequential, same objective."""
    import pyarrow.parquet as pq
    import torch

    from item_embeddings.fusion.model import NORM_WEIGHT, TAU

    def neighbourhood_kl(z, target):  # plain autograd: KL(softmax(target/tau) || softmax(zzᵀ/tau))
        self_mask = torch.eye(len(z), dtype=torch.bool)
        log_p = torch.log_softmax((target / TAU).masked_fill(self_mask, -1e9), dim=1)
        log_q = torch.log_softmax((z @ z.T / TAU).masked_fill(self_mask, -1e9), dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        text = np.load(Path(text_dir) / "txt.npy")
        image = np.load(Path(image_dir) / "img.npy")
        ids = pq.read_table(Path(text_dir) / "txt_items.parquet").column("id").to_pylist()
        items = pq.read_table(Path(image_dir) / "img_items.parquet").to_pydict()
        index = {item: i for i, item in enumerate(ids)}
        x = np.zeros((len(ids), text.shape[1] + image.shape[1] + 1), dtype=np.float32)
        x[:, :text.shape[1]] = text
        for item, row in zip(items["id"], items["row"]):
            x[index[item], text.shape[1]:-1] = image[row]
            x[index[item], -1] = 1.0
        del text, image
        data = torch.from_numpy(x)
        scale = torch.where(data[:, -1] > 0, 0.5 ** 0.5, 1.0)
        model = torch.nn.Sequential(torch.nn.Linear(data.shape[1], 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 128))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            perm = torch.from_numpy(rng.permutation(len(ids)))
            for start in range(0, len(ids), batch_size):
                batch = data[perm[start:start + batch_size]]
                if len(batch) < 2:
                    continue
                h = model(batch)
                z = torch.nn.functional.normalize(h, dim=1)
                with torch.no_grad():  # cosine of the zero-padded concatenation
                    unit = batch[:, :-1] * scale[perm[start:start + batch_size]].unsqueeze(1)
                    target = unit @ unit.T
                loss = neighbourhood_kl(z, target) + \
                    NORM_WEIGHT * (h.norm(dim=1) - 1).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            fused = torch.cat([torch.nn.functional.normalize(model(data[s:s + 65536]), dim=1)
                               for s in range(0, len(ids), 65536)]).numpy()
        wall = time.perf_counter() - t0
    assert fused.shape == (len(ids), 128)
    return {"wall_s": wall, "peak_anon_mib": mem.peak_anon / 1024,
            "peak_rss_mib": _anon_kib()[1] / 1024}


def _child(args: list[str], src: str | None = None) -> dict:
    """Run one measurement in a fresh interpreter (importing the package from ``src`` when
    given); ``process_s`` adds its start-up and imports."""
    env = dict(os.environ, PYTHONPATH=src) if src else None
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                          text=True, env=env)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    # CPU time of the child (user + system, all threads): on a shared machine it follows the
    # work done far more closely than wall time does
    result["cpu_s"] = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    return result


def export_src(rev: str, into: Path) -> str:
    """``src/`` of git revision ``rev``, exported under ``into``; returns the import path."""
    dest = into / f"src-{rev}"
    dest.mkdir()
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return str(dest / "src")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--image-fraction", type=float, default=0.3,
                        help="share of items with an image (pipeline default caps images at "
                             "150k of a 500k catalogue: 0.3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--compare-rev", help="git revision whose step runs on the same inputs")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each step per size, alternating with --compare-rev's")
    parser.add_argument("--work-dir", help="where the synthetic inputs go (default: a temp dir)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "TEXT", "IMAGE", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, text_dir, image_dir, out = args.child
        result = run_step(text_dir, image_dir, out, args.threads) if kind == "step" else \
            run_baseline(text_dir, image_dir, args.threads)
        print(json.dumps(result))
        return 0

    from item_embeddings.fusion.synthetic import write_synthetic_catalogue

    print("| items | with image | run | wall s | process s | process CPU s | items x epochs / s "
          "| train s | peak anon MiB | peak RSS MiB | best epoch | load after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        other_src = export_src(args.compare_rev, Path(tmp)) if args.compare_rev else None
        for n in args.sizes:
            root = Path(tmp) / str(n)
            write_synthetic_catalogue(root / "text", root / "image", n=n,
                                      image_fraction=args.image_fraction, seed=0)

            def step(root: Path = root) -> list[str]:
                return ["--child", "step", str(root / "text"), str(root / "image"),
                        str(root / "out"), "--threads", str(args.threads)]

            runs = []
            for _ in range(args.repeat):
                runs.append(("step", step(), None))
                if other_src:
                    runs.append((f"step at {args.compare_rev}", step(), other_src))
            if not args.no_baseline:
                runs.append(("baseline (dense, in memory)",
                             ["--child", "baseline", str(root / "text"), str(root / "image"),
                              str(root / "out"), "--threads", str(args.threads)], None))
            for name, child_args, src in runs:
                r = _child(child_args, src)
                print(f"| {n} | {args.image_fraction:.0%} | {name} | {r['wall_s']:.1f} "
                      f"| {r['process_s']:.1f} | {r['cpu_s']:.1f} | {5 * n / r['wall_s']:.0f} "
                      f"| {r.get('train_s', float('nan')):.1f} | {r['peak_anon_mib']:.0f} "
                      f"| {r['peak_rss_mib']:.0f} | {r.get('best_epoch', '–')} "
                      f"| {os.getloadavg()[0]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
