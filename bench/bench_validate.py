"""Cost of the items-table validation: the full check against the id-only baseline.

``validate_items`` reads every file's footer (schemas compared with the first file's) and scans
the needed string columns once for valid UTF-8 while it reads the ids. The baseline is what the
validation read before: the id column alone, with the same null/duplicate check. The table is
the real sample (``../shared/data/amazon_electronics_2000.parquet``) tiled to ``--rows`` rows
with unique ids, written as ``--files`` parquet files (without dictionary encoding) in a
temporary folder.

Usage::

    flock /tmp/bench.lock python bench/bench_validate.py --rows 500000 --files 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from item_embeddings.items import ItemColumns, id_problems, open_items, validate_items

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / \
    "amazon_electronics_2000.parquet"


def write_folder(root: Path, rows: int, files: int) -> tuple[str, int]:
    """The sample tiled to ``rows`` rows in ``files`` files; returns (folder, bytes on disk)."""
    sample = pq.read_table(SAMPLE, columns=["asin", "title", "description", "image_url"])
    copies = -(-rows // sample.num_rows)
    table = pa.concat_tables([sample] * copies).slice(0, rows)
    suffix = pa.array([f"-{i // sample.num_rows}" for i in range(rows)])
    table = table.set_column(0, "asin", pc.binary_join_element_wise(table["asin"], suffix, ""))
    step = -(-rows // files)
    for i in range(files):
        # No dictionary encoding: a tiled sample would otherwise be decoded from a few
        # distinct values, far cheaper than a real catalogue's distinct texts.
        pq.write_table(table.slice(i * step, step), root / f"part-{i:03d}.parquet",
                       use_dictionary=False)
    return str(root), sum(p.stat().st_size for p in root.iterdir())


def baseline(uri: str, columns: ItemColumns) -> int:
    """The id-only validation: read the ids, check nulls and duplicates."""
    ids = open_items(uri).to_table(columns=[columns.id]).column(columns.id)
    assert not id_problems(ids)
    return len(ids)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    columns = ItemColumns()
    with tempfile.TemporaryDirectory() as tmp:
        uri, size = write_folder(Path(tmp), args.rows, args.files)
        print(f"{args.rows:,} rows in {args.files} files, {size / 2**20:.0f} MiB; median of "
              f"{args.repeats} runs")
        cases = [
            ("baseline: id column only", lambda: baseline(uri, columns)),
            ("validate_items, image step (id + image_url)",
             lambda: validate_items(uri, columns, need_text=False, need_image_url=True)),
            ("validate_items, text step (id + title + description)",
             lambda: validate_items(uri, columns)),
            ("validate_items, run-local (all four columns)",
             lambda: validate_items(uri, columns, need_image_url=True)),
        ]
        print("| check | seconds | rows/s |\n|---|---:|---:|")
        for name, fn in cases:
            seconds = timed(fn, args.repeats)
            print(f"| {name} | {seconds:.2f} | {args.rows / seconds:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
