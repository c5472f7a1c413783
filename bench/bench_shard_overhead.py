"""What a shard task pays before and around its real work: the fixed costs the estimator needs.

Measured here, each in a fresh interpreter where it matters (a shard task is a fresh process):

1. imports: start an interpreter and import what each step imports (text, image, fusion);
2. model loads: the text encoder of each backend (``torch``, ``onnx``, ``onnx-int8``; the ONNX
   models taken from the cache, as the image bakes them) and open_clip ViT-B-32 with random
   weights (``pretrained='none'``: the same model build, without reading a checkpoint);
3. reading one shard's row range of a 500,000-row items table (the 2,000 real items tiled, ids
   made unique) with the ``item_embeddings.items`` helpers, for the first and the last of
   ``--shards`` shards: streaming from the start with ``iter_batches`` and skipping rows (what the
   helpers give today), and ``open_items(...).take(rows)``; once for a table written as one row
   group (pyarrow's default at this size) and once with 50,000-row groups;
4. CPU cost of decoding one real product photo into the encoder's input (``decode_image`` with
   open_clip's resize and crop), one thread: the CPU side of the T4 image step. The sample
   photos are 256-pixel thumbnails; catalogue photos are larger, so they are also decoded after
   upscaling to ``--long-sides`` pixels (re-encoded as JPEG quality 90), as JPEG decoding costs
   grow with the pixel count;
5. bytes per item of an id file (the step's ``*_items.parquet``), for the publish copy;
6. the CPU side of the text step on a GPU: batched tokenization of the real texts (batches of
   128, the encoder's maximum sequence length), and the tokens per item, from which the model's
   GFLOP per item follow (6 layers, hidden 384, FFN 1536: 2 x (4 h^2 + 2 h f) per token per
   layer for the products, plus 4 h t per token per layer for attention over t tokens).

Not measured here: the merge of per-shard outputs does not exist yet; its throughput at 500k rows
is to be measured by the step's own benchmark once it does (``merge`` in
``src/item_embeddings/estimate_rates.json`` says so, and the estimator marks merge times as
assumed until then).

Run from the project root (wrap in ``flock /tmp/bench.lock`` on a shared machine)::

    python bench/bench_shard_overhead.py --items ../shared/data/amazon_electronics_2000.parquet \
        --images ../shared/data/abo_images --json shard_overhead.json

``--sections fixed,rows,tokens,decode`` runs a subset (1-2, 3 and 5, 6, 4).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TOTAL_ROWS = 500_000
STEP_IMPORTS = {
    "text": "import item_embeddings.text.step",
    "image": "import item_embeddings.image.step, open_clip",
    "fusion": "import item_embeddings.fusion.step",
}
TEXT_LOAD = ("from item_embeddings.text import load_text_encoder; "
             "load_text_encoder(backend={backend!r}, device='cpu')")
IMAGE_LOAD = ("from item_embeddings.image import load_image_encoder; "
              "load_image_encoder('ViT-B-32', 'none', device='cpu')")


def process_wall_seconds(code: str) -> float:
    """Wall seconds of a fresh interpreter that runs ``code`` (interpreter start included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def load_seconds(setup: str, timed: str) -> float:
    """Seconds ``timed`` takes in a fresh interpreter after ``setup`` (clocked inside it)."""
    code = (f"{setup}; import time; t0 = time.perf_counter(); {timed}; "
            "print(time.perf_counter() - t0)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def median_of(repeats: int, fn) -> tuple[float, list[float]]:
    runs = [fn() for _ in range(repeats)]
    return statistics.median(runs), runs


def write_catalogue(sample: str, path: Path, row_group_size: int) -> None:
    """500,000 rows: the real sample tiled, each copy's ids suffixed so they stay unique."""
    base = pq.read_table(sample)
    copies = []
    for k in range(TOTAL_ROWS // base.num_rows):
        ids = pc.binary_join_element_wise(base["asin"], pa.scalar(f"-{k}"), "")
        copies.append(base.set_column(base.schema.get_field_index("asin"), "asin", ids))
    pq.write_table(pa.concat_tables(copies), path, row_group_size=row_group_size)


def read_range_streaming(uri: str, columns: list[str], start: int, stop: int) -> int:
    """Rows [start, stop) through ``iter_batches``: every row before ``start`` is read too."""
    from item_embeddings.items import iter_batches

    seen = kept = 0
    for batch in iter_batches(uri, columns):
        lo, hi = max(start - seen, 0), min(stop - seen, batch.num_rows)
        if hi > lo:
            kept += batch.slice(lo, hi - lo).num_rows
        seen += batch.num_rows
        if seen >= stop:
            break
    return kept


def read_range_take(uri: str, columns: list[str], start: int, stop: int) -> int:
    """Rows [start, stop) through ``open_items(...).take`` (reads the row groups holding them)."""
    from item_embeddings.items import open_items

    return open_items(uri).take(pa.array(range(start, stop)), columns=columns).num_rows


def time_range_reads(uri: str, shards: int) -> dict:
    columns = ["asin", "title", "description"]
    size = TOTAL_ROWS // shards
    out = {}
    for name, reader in (("iter_batches_skip", read_range_streaming), ("take", read_range_take)):
        for which, start in (("first", 0), ("last", (shards - 1) * size)):
            t0 = time.perf_counter()
            rows = reader(uri, columns, start, start + size)
            out[f"{name}_{which}_s"] = time.perf_counter() - t0
            assert rows == size, (name, which, rows)
    out["rows_per_shard"] = size
    return out


def upscaled(body: bytes, long_side: int) -> bytes:
    """The photo resized to ``long_side`` pixels on its long side, re-encoded as JPEG (q 90)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(body)) as img:
        scale = long_side / max(img.size)
        big = img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)),
                                        Image.LANCZOS)
    out = io.BytesIO()
    big.save(out, "JPEG", quality=90)
    return out.getvalue()


def decode_cpu_seconds(images_dir: str, limit: int, long_side: int | None) -> dict:
    """CPU seconds per photo of ``decode_image`` (one thread), at the files' size or upscaled."""
    from item_embeddings.image import decode_image, load_image_encoder

    transform = load_image_encoder("ViT-B-32", "none", device="cpu").pil_transform
    bodies = [Path(f).read_bytes() for f in sorted(glob.glob(f"{images_dir}/*.jpg"))[:limit]]
    if not bodies:
        sys.exit(f"no .jpg files in {images_dir}")
    if long_side:
        bodies = [upscaled(b, long_side) for b in bodies]
    decode_image(bodies[0], transform)  # first call: plugin registration
    c0, t0 = time.process_time(), time.perf_counter()
    for body in bodies:
        decode_image(body, transform)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"images": len(bodies), "long_side": long_side or "as stored",
            "cpu_s_per_image": cpu / len(bodies), "wall_s_per_image": wall / len(bodies),
            "mean_jpeg_bytes": sum(map(len, bodies)) / len(bodies)}


def text_tokens(sample: str, batch: int = 128) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from item_embeddings.items import item_text
    from item_embeddings.text import resolve_text_model

    location = resolve_text_model("sentence-transformers/all-MiniLM-L6-v2").location
    tokenizer = AutoTokenizer.from_pretrained(location)
    cfg = AutoConfig.from_pretrained(location)
    table = pq.read_table(sample, columns=["title", "description"]).to_pydict()
    texts = [item_text(t, d) for t, d in zip(table["title"], table["description"])]
    max_len = 256  # all-MiniLM-L6-v2's max_seq_length
    tokenizer(texts[:batch], truncation=True, max_length=max_len)  # warm-up
    t0 = time.perf_counter()
    lengths = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], truncation=True, max_length=max_len)
        lengths += [len(ids) for ids in enc["input_ids"]]
    wall = time.perf_counter() - t0
    h, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    flops = sum(layers * (2 * (4 * h * h + 2 * h * f) * t + 4 * h * t * t) for t in lengths)
    return {"items": len(texts), "tokenize_items_per_s": len(texts) / wall,
            "mean_tokens": statistics.mean(lengths), "gflop_per_item": flops / len(texts) / 1e9}


def id_file_bytes_per_item(uri: str, tmp: Path) -> float:
    ids = pq.read_table(uri, columns=["asin"])
    path = tmp / "ids.parquet"
    pq.write_table(ids, path)
    return path.stat().st_size / ids.num_rows


def fixed_costs(args: argparse.Namespace, result: dict) -> None:
    for step, imports in STEP_IMPORTS.items():
        med, runs = median_of(args.repeats, partial(process_wall_seconds, imports))
        result[f"import_{step}_s"] = med
        print(f"interpreter start + {step} step imports: {med:.2f} s (runs {runs})")
    loads = {f"text_{b}": TEXT_LOAD.format(backend=b) for b in ("torch", "onnx", "onnx-int8")}
    loads["image_vit_b_32"] = IMAGE_LOAD
    for name, code in loads.items():
        setup = ("import item_embeddings.image, open_clip" if name.startswith("image")
                 else "import item_embeddings.text, torch")
        med, runs = median_of(args.repeats, partial(load_seconds, setup, code))
        result[f"load_{name}_s"] = med
        print(f"model load {name}: {med:.2f} s (runs {runs})")


def rows(args: argparse.Namespace, result: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for label, group in (("one_group", TOTAL_ROWS), ("groups_50k", 50_000)):
            path = tmp / f"items_{label}.parquet"
            write_catalogue(args.items, path, group)
            reads = time_range_reads(str(path), args.shards)
            result[f"range_read_{label}"] = {**reads, "file_bytes": path.stat().st_size}
            print(f"row range ({reads['rows_per_shard']} of {TOTAL_ROWS} rows, {label}): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in reads.items() if k.endswith("_s")))
        result["id_file_bytes_per_item"] = id_file_bytes_per_item(
            str(tmp / "items_one_group.parquet"), tmp)
        print(f"id file: {result['id_file_bytes_per_item']:.1f} bytes per item")


def tokens(args: argparse.Namespace, result: dict) -> None:
    result["text_tokens"] = t = text_tokens(args.items)
    print(f"tokenize (batches of 128): {t['tokenize_items_per_s']:.0f} items/s; "
          f"{t['mean_tokens']:.1f} tokens/item -> {t['gflop_per_item']:.2f} GFLOP/item")


def decode(args: argparse.Namespace, result: dict) -> None:
    for long_side in (None, *args.long_sides):
        d = decode_cpu_seconds(args.images, args.decode_limit, long_side)
        result[f"decode_{long_side or 'stored'}"] = d
        print(f"decode + resize/crop, 1 thread, long side {d['long_side']}: "
              f"{1000 * d['cpu_s_per_image']:.1f} CPU ms/image ({d['images']} photos, mean "
              f"{d['mean_jpeg_bytes'] / 1024:.0f} KiB)")


SECTIONS = {"fixed": fixed_costs, "rows": rows, "tokens": tokens, "decode": decode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", default=str(ROOT.parent / "shared" / "data"
                                          / "amazon_electronics_2000.parquet"))
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "abo_images"))
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per import/load")
    p.add_argument("--decode-limit", type=int, default=200)
    p.add_argument("--long-sides", type=int, nargs="*", default=[1000],
                   help="also decode the photos upscaled to these long sides (pixels)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args()

    result: dict = {"date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
                    "cores": os.cpu_count(), "load_average_start": os.getloadavg()[0]}
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    for name in args.sections.split(","):
        SECTIONS[name.strip()](args, result)
    result["load_average_end"] = os.getloadavg()[0]
    print(f"load average at the end {result['load_average_end']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
