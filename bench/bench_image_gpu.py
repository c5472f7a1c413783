"""The image step on a GPU: images/s end to end against encode-only and a plain open_clip loop.

For whoever gets a CUDA device (the T4 of a Vertex image worker, or any other). In one run,
on the same photos (``../shared/data/abo_images`` upscaled to ``--long-side`` px and re-encoded
as JPEG quality 90; synthetic product photos where that folder is absent, e.g. on a lent
machine), within ``--budget-s`` (10 minutes by default) from start to the JSON:

1. **plain loop**: open_clip ViT-B-32 as one writes it for speed: ``model.half()``, batches of
   ``--batch-size`` (256) uint8 images in pinned memory copied with ``non_blocking``, normalised
   in fp16 on the GPU, with and without channels-last (reported apart; the faster is the
   baseline);
2. **encode only**: the step's own ``ImageEncoder.encode`` (fp16 autocast) on the same decoded
   batches: what the encoder costs inside the step;
3. **fetch + decode only**: the step's download and decode pool over the photos served by a
   loopback host (a child process), no encoder: the CPU side's ceiling on this machine;
4. **the step**: ``embed_items_images`` end to end over the same host (``image_decode`` fast,
   ``image_batch_size`` = ``--batch-size``), with its own ``download_wall_s``,
   ``decode_cpu_s`` and ``encode_wall_s``; sized to fit the budget left.

Without CUDA it refuses (exit 2). ``--device cpu --smoke`` runs every section with a handful of
images in float32 on the CPU, to check the script itself::

    python bench/bench_image_gpu.py --json image_gpu.json          # on a GPU machine
    python bench/bench_image_gpu.py --device cpu --smoke           # anywhere, seconds
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_image_decode import cpu_model, fetch_only  # noqa: E402
from bench_shard_overhead import upscaled  # noqa: E402

from image_server import ServerProcess, product_photo  # noqa: E402
from item_embeddings.config import PipelineParams  # noqa: E402
from item_embeddings.image import embed_items_images, load_image_encoder  # noqa: E402
from item_embeddings.runtime import GpuUnavailableError, require_cuda  # noqa: E402


class Budget:
    """Seconds left until the deadline; every section checks it before it starts."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def photos(folder: str, count: int, long_side: int) -> tuple[list[bytes], str]:
    """``count`` JPEG bodies (the real photos cycled, or synthetic ones) and where from."""
    files = sorted(glob.glob(f"{folder}/*.jpg"))
    if files:
        distinct = [upscaled(Path(f).read_bytes(), long_side) for f in files[:count]]
        source = f"{len(distinct)} photos of {folder} at {long_side} px"
    else:
        distinct = []
        for seed in range(min(count, 32)):
            buf = io.BytesIO()
            product_photo((long_side, long_side * 3 // 4), seed).save(buf, "JPEG", quality=90)
            distinct.append(buf.getvalue())
        source = f"{len(distinct)} synthetic product photos at {long_side} px ({folder} absent)"
    return [distinct[i % len(distinct)] for i in range(count)], source


def timed_batches(fn, batches: list, budget: Budget, share_s: float, sync) -> dict:
    """Run ``fn`` over the batches (two warm-up calls first) until done or ``share_s`` is
    spent; images/s over the batches that ran."""
    for batch in batches[:2]:
        fn(batch)
    sync()
    stop = time.monotonic() + min(share_s, max(budget.left(), 0))
    images, started = 0, time.perf_counter()
    for batch in batches:
        fn(batch)
        images += len(batch)
        if time.monotonic() > stop:
            break
    sync()
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1)}


def plain_loop(pixels: list[np.ndarray], device: str, budget: Budget, share_s: float) -> dict:
    """open_clip as one writes it for speed: fp16 weights, pinned uint8 batches, async copies."""
    import open_clip
    import torch

    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32  # CPU smoke runs: float32
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model = model.to(device=device, dtype=dtype).eval()
    norm = preprocess.transforms[-1]
    mean = torch.tensor(norm.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    host = [torch.from_numpy(p) for p in pixels]
    if cuda:
        host = [t.pin_memory() for t in host]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {"dtype": str(dtype).replace("torch.", "")}
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=fmt)

        @torch.inference_mode()
        def encode(batch, model=model, fmt=fmt):  # this layout's (bound now, not at call)
            x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).to(dtype).div_(255)
            x = x.sub_(mean).div_(std).contiguous(memory_format=fmt)
            return model.encode_image(x)

        out[layout] = timed_batches(encode, host, budget, share_s / 2, sync)
    out["best"] = max(("contiguous", "channels_last"), key=lambda k: out[k]["images_per_s"])
    out["images_per_s"] = out[out["best"]]["images_per_s"]
    return out


def step_run(bodies: list[bytes], encoder, batch: int, budget: Budget, rate_guess: float,
             workers: int | None) -> dict:
    """The whole step over a loopback host; as many images as the budget left allows."""
    n = int(min(len(bodies), max(batch, 0.6 * budget.left() * rate_guess)))
    images = {f"p{i}.jpg": (b, "image/jpeg") for i, b in enumerate(bodies[:n])}
    with ServerProcess(images) as port, tempfile.TemporaryDirectory() as tmp:
        items = Path(tmp) / "items.parquet"
        pq.write_table(pa.table({"asin": [f"B{i:09d}" for i in range(n)],
                                 "image_url": [f"http://127.0.0.1:{port}/img/{name}"
                                               for name in images]}), items)
        started = time.perf_counter()
        meta = embed_items_images(
            str(items), Path(tmp) / "out",
            PipelineParams(image_model="ViT-B-32", image_pretrained="none",
                           image_batch_size=batch, image_decode="fast",
                           allow_private_hosts=True, shard_size=max(n, 1)),
            encoder=encoder, run_id="bench-gpu", decode_workers=workers)
        seconds = time.perf_counter() - started
    return {"images": n, "embedded": meta["count"], "seconds": round(seconds, 2),
            "images_per_s": round(n / seconds, 1),
            **{k: meta[k] for k in ("download_wall_s", "decode_cpu_s", "encode_wall_s",
                                    "throughput_items_per_sec", "device", "dtype")}}


def fetch_decode(bodies: list[bytes], encoder, workers: int | None) -> dict:
    images = {f"p{i}.jpg": (b, "image/jpeg") for i, b in enumerate(bodies)}
    with ServerProcess(images) as port:
        return fetch_only(encoder, [f"http://127.0.0.1:{port}/img/{n}" for n in images],
                          workers or min(8, os.cpu_count() or 1))


def environment(device: str) -> dict:
    import open_clip
    import torch

    env = {"device": device, "torch": torch.__version__, "open_clip": open_clip.__version__,
           "cuda": torch.version.cuda, **cpu_model(),
           "load_average_1m": round(os.getloadavg()[0], 2)}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --smoke")
    p.add_argument("--smoke", action="store_true", help="a handful of images: checks the script")
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "abo_images"))
    p.add_argument("--count", type=int, default=4096, help="photos per section (default 4096)")
    p.add_argument("--long-side", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--decode-workers", type=int, help="default: the step's (min(8, CPUs))")
    p.add_argument("--budget-s", type=float, default=600, help="whole run (default 10 min)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        import torch

        try:
            if not torch.cuda.is_available():
                raise GpuUnavailableError(f"torch {torch.__version__} (CUDA "
                                          f"{torch.version.cuda or 'none'}) sees no CUDA device")
            require_cuda("bench_image_gpu")  # a kernel runs, not only a device listed
        except GpuUnavailableError as exc:
            print(f"refused: {str(exc).split('; failing')[0]}. This benchmark measures a GPU: "
                  "run it on a GPU machine, or check the script with --device cpu --smoke.",
                  file=sys.stderr)
            return 2
    elif not args.smoke:
        print("refused: this benchmark measures a GPU; on a CPU only --device cpu --smoke runs "
              "(to check the script)", file=sys.stderr)
        return 2
    if args.smoke:
        args.count, args.batch_size, args.long_side = 8, 4, 400
    budget = Budget(args.budget_s)
    return run(args, budget)


def run(args, budget: Budget) -> int:
    bodies, source = photos(args.images, args.count, args.long_side)
    encoder = load_image_encoder("ViT-B-32", "none", device=args.device)
    decoder = encoder.decoder("fast")
    pixels = np.stack([decoder(b) for b in bodies[:args.count]])
    batches = [pixels[i:i + args.batch_size] for i in range(0, len(pixels), args.batch_size)]
    result = {"smoke": args.smoke, "photos": source, "batch_size": args.batch_size,
              "budget_s": args.budget_s, **environment(args.device)}
    share = budget.left() / 6  # plain loop 2 shares, encode-only 1, fetch ~1, the step the rest
    result["plain_loop"] = plain_loop(batches, args.device, budget, 2 * share)
    sync = (lambda: __import__("torch").cuda.synchronize()) if args.device.startswith("cuda") \
        else (lambda: None)
    result["encode_only"] = timed_batches(encoder.encode, batches, budget, share, sync)
    result["fetch_decode_only"] = fetch_decode(bodies, encoder, args.decode_workers)
    guess = min(result["encode_only"]["images_per_s"],
                result["fetch_decode_only"]["images_per_s"])
    result["step"] = step_run(bodies, encoder, args.batch_size, budget, guess,
                              args.decode_workers)
    step, plain = result["step"]["images_per_s"], result["plain_loop"]["images_per_s"]
    result["step_over_encode_only"] = round(step / result["encode_only"]["images_per_s"], 3)
    result["step_over_plain_loop"] = round(step / plain, 3)
    result["encode_only_over_plain_loop"] = round(
        result["encode_only"]["images_per_s"] / plain, 3)
    result["seconds_left_of_budget"] = round(budget.left(), 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
