"""Fan-out: the catalogue cut into ``shards`` contiguous row ranges, spread over worker tasks.

A planning step cuts the items table (in input row order) into ``shards`` ranges of near-equal
size and hands them to at most ``max_parallel_shards`` workers per step, so the parameter bounds
how many machines run at once even though KFP's own loop parallelism is fixed at compile time.
The image cap ``max_items`` applies to the whole catalogue: the plan gives each shard the number
of its URL rows that a single run would select (the first ``max_items`` usable URLs in input
order), so the same items are embedded.

Each step gets only the machines that have work: the text workers are one per shard with rows
(worker ``w`` of ``W`` gets shards ``w, w + W, ...``); the image workers one per shard with
images to embed, at most ``max_parallel_shards``, the shards dealt by their image rows (largest
first, to the worker with the fewest so far), so with the cap filling the first shards few T4
machines start; shards without work ride along with the others: the plan records each shard's
URL rows, so a shard with no image to select writes empty outputs without reading anything.

Merges then concatenate the shards' outputs in shard order: the files a single run writes.

Example::

    plan = plan_shards("items.parquet", PipelineParams(shards=4, max_parallel_shards=2))
    plan.workers[0]  # {"worker": 0, "shards": [{"index": 0, "start": 0, ...}, {"index": 2, ...}]}
    plan.image_workers  # the image step's workers, dealt by image rows
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import PipelineParams
from .errors import ItemEmbeddingsError
from .image.selection import rows_to_select, usable_url
from .image.step import IMAGE_STEP
from .items import ItemColumns, iter_batches, validate_items
from .outputs import IMG_ARRAY, IMG_FAILURES, IMG_ITEMS, IMG_META, TXT_ARRAY, TXT_ITEMS, TXT_META
from .storage import atomic_npy, write_parquet_atomic
from .text.step import TEXT_STEP, text_settings
from .tracking import ExperimentTracker

logger = logging.getLogger(__name__)

SHARD_DIR = "shard-{:05d}"  # a worker's output holds one such folder per shard it ran
_NONE = -1  # loop items are protobuf Structs, which hold no nulls: -1 stands for None
# A worker given no plan (a component called on its own) runs the whole table as shard 0.
WHOLE_TABLE = {"worker": 0, "shards": [{"index": 0, "start": 0, "stop": _NONE,
                                        "image_quota": _NONE, "url_rows": _NONE}]}


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of the items table, in input order."""

    index: int
    start: int
    stop: int | None          # None: the whole table (a worker run without a plan)
    image_quota: int | None   # URL rows of this shard the image step selects (None: no cap)
    url_rows: int | None = None  # rows of this shard with a usable image URL (None: not counted)

    @property
    def dirname(self) -> str:
        return SHARD_DIR.format(self.index)

    @property
    def rows(self) -> tuple[int, int] | None:
        """The row range for the steps; None for the whole table (``max_items`` applies)."""
        return None if self.stop is None else (self.start, self.stop)

    @property
    def image_rows(self) -> int | None:
        """The rows the image step selects here (its quota, or every URL row without a cap);
        None when not counted (a worker run without a plan)."""
        return rows_to_select(self.image_quota, self.url_rows)

    def as_dict(self) -> dict[str, Any]:
        return {k: _NONE if v is None else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Shard:
        """Back from a loop item; KFP carries its numbers as floats (a protobuf Struct)."""
        def number(key):
            return None if value.get(key, _NONE) in (None, _NONE) else int(value[key])

        return cls(int(value["index"]), int(value["start"]), number("stop"),
                   number("image_quota"), number("url_rows"))


@dataclass(frozen=True)
class ShardPlan:
    """Every shard, and which worker of each step runs which."""

    rows: int | None          # None: the plan's last shard runs to the end of the table
    shards: list[Shard]
    workers: list[dict[str, Any]]   # {"worker": w, "shards": [shard dicts]}: the text loop's items
    image_workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # image loop's

    @classmethod
    def from_workers(cls, workers: list[dict[str, Any]]) -> ShardPlan:
        """The plan back from the loop's items (what the merge steps are given)."""
        shards = sorted((s for w in workers for s in worker_shards(w)), key=lambda s: s.index)
        if [s.index for s in shards] != list(range(len(shards))):
            raise MergeError(f"the plan's shards are not 0..{len(shards) - 1}: "
                             f"{[s.index for s in shards][:10]}")
        return cls(shards[-1].stop if shards else 0, shards, workers)  # stop None: unknown


def _url_rows_per_shard(items_uri: str, columns: ItemColumns, bounds: list[int]) -> list[int]:
    """How many rows with a usable image URL each range holds (one pass over two columns)."""
    counts = [0] * (len(bounds) - 1)
    row, shard = 0, 0
    for batch in iter_batches(items_uri, [columns.image_url]):
        for url in batch.column(0).to_pylist():
            while row >= bounds[shard + 1]:
                shard += 1
            counts[shard] += usable_url(url) is not None
            row += 1
    return counts


def shard_bounds(rows: int, shards: int) -> list[int]:
    """The ``shards + 1`` row bounds of ``shards`` contiguous ranges of ``rows`` rows, whose
    sizes differ by at most one (empty ranges when there are more shards than rows).

    >>> shard_bounds(10, 3)
    [0, 3, 6, 10]
    >>> shard_bounds(2, 4)
    [0, 0, 1, 1, 2]
    """
    return [i * rows // shards for i in range(shards + 1)]


def image_quotas(url_rows: Sequence[int], max_items: int) -> list[int | None]:
    """Each shard's share of the catalogue-wide image cap, given its URL rows: the first
    ``max_items`` URL rows in input order, as one run selects them (None each: no cap).

    >>> image_quotas([40, 40, 40], max_items=100)
    [40, 40, 20]
    >>> image_quotas([40, 40], max_items=0)
    [None, None]
    """
    if not max_items:
        return [None] * len(url_rows)
    quotas, before = [], 0
    for urls in url_rows:
        quotas.append(max(0, min(urls, max_items - before)))
        before += urls
    return quotas


def deal(shards: Sequence[Any], max_parallel_shards: int) -> list[list[Any]]:
    """The shards of each of ``min(len(shards), max_parallel_shards)`` workers: worker ``w``
    runs shards ``w, w + W, w + 2W, ...``.

    >>> deal([0, 1, 2, 3, 4], max_parallel_shards=2)
    [[0, 2, 4], [1, 3]]
    """
    width = min(len(shards), max_parallel_shards)
    return [list(shards[w::width]) for w in range(width)]


def _with_idle(dealt: list[list[Any]], idle: Sequence[Any]) -> list[list[Any]]:
    """``dealt`` with the ``idle`` shards added round-robin (a step needs every shard's
    output, even an empty one)."""
    for i, shard in enumerate(idle):
        dealt[i % len(dealt)].append(shard)
    return dealt


def deal_by_rows(rows: Sequence[int], max_parallel_shards: int) -> list[list[int]]:
    """Shard numbers per text worker: one worker per shard with rows (at most
    ``max_parallel_shards``, at least one), dealt round-robin (their rows differ by one at
    most); shards without rows (more shards than rows) ride along.

    >>> deal_by_rows([0, 1, 0, 1, 1], max_parallel_shards=5)
    [[1, 0], [3, 2], [4]]
    """
    working = [i for i, n in enumerate(rows) if n > 0]
    return _with_idle(deal(working, max_parallel_shards) or [[]],
                      [i for i, n in enumerate(rows) if n <= 0])


def deal_by_work(work: Sequence[int], max_parallel_shards: int) -> list[list[int]]:
    """Shard numbers per image worker: one worker per shard with images to embed (at most
    ``max_parallel_shards``, at least one), the shards dealt largest first to the worker with
    the fewest images so far (ties: shard order, then the lower worker); shards without images
    ride along round-robin.

    >>> deal_by_work([40, 40, 20, 0, 0, 0], max_parallel_shards=4)
    [[0, 3], [1, 4], [2, 5]]
    >>> deal_by_work([10, 0, 0, 7, 7], max_parallel_shards=2)
    [[0, 1], [3, 4, 2]]
    """
    working = sorted((i for i, n in enumerate(work) if n > 0), key=lambda i: (-work[i], i))
    width = max(1, min(len(working), max_parallel_shards))
    dealt: list[list[int]] = [[] for _ in range(width)]
    loads = [0] * width
    for i in working:
        w = min(range(width), key=lambda w: (loads[w], w))
        dealt[w].append(i)
        loads[w] += work[i]
    return _with_idle(dealt, [i for i, n in enumerate(work) if n <= 0])


def _loop_items(shards: Sequence[Shard], dealt: list[list[int]]) -> list[dict[str, Any]]:
    return [{"worker": w, "shards": [shards[i].as_dict() for i in sorted(mine)]}
            for w, mine in enumerate(dealt)]


def plan_shards(items_uri: str, params: PipelineParams) -> ShardPlan:
    """Cut the items into ``params.shards`` ranges and give them to the workers.

    Ranges differ in size by at most one row; with more shards than rows, the extra shards are
    empty (and produce empty outputs). Raises ItemsError for an unusable items table.
    """
    columns = ItemColumns.from_params(params)
    n = validate_items(items_uri, columns, need_image_url=True).num_rows
    bounds = shard_bounds(n, params.shards)
    urls = _url_rows_per_shard(items_uri, columns, bounds)
    quotas = image_quotas(urls, params.max_items)
    shards = [Shard(i, bounds[i], bounds[i + 1], quota, url_rows)
              for i, (quota, url_rows) in enumerate(zip(quotas, urls))]
    rows = [bounds[i + 1] - bounds[i] for i in range(params.shards)]
    images = [s.image_rows for s in shards]
    return ShardPlan(n, shards, _loop_items(shards, deal_by_rows(rows, params.max_parallel_shards)),
                     _loop_items(shards, deal_by_work(images, params.max_parallel_shards)))


def worker_shards(worker: dict[str, Any]) -> Iterator[Shard]:
    """The shards one worker runs (the loop item the pipeline hands it)."""
    for value in worker["shards"]:
        yield Shard.from_dict(value)


class MergeError(ItemEmbeddingsError, RuntimeError):
    """The shard outputs do not make up the planned catalogue (missing, extra or mismatched)."""


# How a merged meta file is made from the shards' meta files: these keys are summed, these must
# be equal in every shard (the same encoder and settings), everything else is the first shard's.
_TEXT_SUMS = ("count", "empty_text_count", "null_title_count", "null_description_count",
              "reused_count", "encoded_count", "encode_time_sec")
_IMAGE_SUMS = ("count", "failed_count", "attempted_count", "no_url_count", "capped_count",
               "total_rows", "retried_items", "encoded_count", "reused_count",
               "revalidated_count", "failures_reused_count", "encoded_this_attempt",
               "encode_time_sec", "download_time_sec_total", "downloaded_bytes", "shards",
               "resumed_shards", "download_wall_s", "decode_cpu_s", "encode_wall_s")
_SAME = ("encoder_fingerprint", "embed_dim", "encoder_name", "items_uri", "id_column")
_PER_SHARD = ("files", "run_id", "wall_time_sec", "rows", "image_quota", "checkpoint_location",
              "fingerprint")
MERGE_VERSIONS = ("numpy", "pyarrow")  # what a merge's meta file records: it encodes nothing


def shard_dirs(parts: Sequence[str | os.PathLike], plan: ShardPlan, meta_name: str) -> list[Path]:
    """The planned shards' output folders, in shard order, from the workers' outputs.

    Raises:
        MergeError: a planned shard is missing or incomplete, or a shard is there twice.
    """
    found: dict[int, Path] = {}
    for part in parts:
        for folder in sorted(Path(part).glob(SHARD_DIR.format(0).replace("00000", "*"))):
            index = int(folder.name.rsplit("-", 1)[1])
            if index in found:
                raise MergeError(f"shard {index} is in two worker outputs: {found[index]} and "
                                 f"{folder}")
            found[index] = folder
    missing = [s.index for s in plan.shards
               if s.index not in found or not (found[s.index] / meta_name).is_file()]
    if missing:
        raise MergeError(f"shard(s) {missing[:10]} of {len(plan.shards)} have no complete "
                         f"{meta_name} in the workers' outputs")
    extra = sorted(set(found) - {s.index for s in plan.shards})
    if extra:
        raise MergeError(f"shard folder(s) {extra[:10]} are not in the plan")
    return [found[s.index] for s in plan.shards]


def _merged_meta(metas: list[dict[str, Any]], sums: Sequence[str]) -> dict[str, Any]:
    for key in _SAME:
        values = {json.dumps(m.get(key), sort_keys=True) for m in metas}
        if len(values) > 1:
            raise MergeError(f"the shards disagree on {key!r}: {sorted(values)[:3]} (made with "
                             "other settings or code?)")
    merged = {k: v for k, v in metas[0].items() if k not in _PER_SHARD}
    for key in sums:
        if key in merged:
            merged[key] = sum(m.get(key) or 0 for m in metas)
    # the shards' own detail, for the step's experiment run (a shard logs none by default)
    merged["shard_wall_time_max_sec"] = max(m.get("wall_time_sec") or 0.0 for m in metas)
    return merged


def _concat_arrays(dirs: list[Path], name: str, dest: Path, dim: int) -> int:
    """Stream the shards' arrays into one, shard after shard (memory: one shard's map)."""
    total = sum(np.load(d / name, mmap_mode="r").shape[0] for d in dirs)
    with atomic_npy(dest, (total, dim)) as out:
        row = 0
        for d in dirs:
            part = np.load(d / name, mmap_mode="r")
            out[row:row + len(part)] = part
            row += len(part)
    return total


def merge_text_shards(parts: Sequence[str | os.PathLike], plan: ShardPlan,
                      output_dir: str | os.PathLike, params: PipelineParams, *,
                      run_id: str = "", tracker: ExperimentTracker | None = None,
                      artifact_uri: str = "") -> dict[str, Any]:
    """Concatenate the shards' text outputs into ``txt.npy``, ``txt_items.parquet`` and
    ``txt_meta.json``: the files one text step over the whole catalogue writes."""
    dirs = shard_dirs(parts, plan, TXT_META)
    metas = [json.loads((d / TXT_META).read_text()) for d in dirs]
    meta = _merged_meta(metas, _TEXT_SUMS)
    with TEXT_STEP.run(output_dir, text_settings(params, meta.get("items_uri")), run_id=run_id,
                       tracker=tracker, artifact_uri=artifact_uri, shards=len(dirs)) as run:
        count = _concat_arrays(dirs, TXT_ARRAY, run.out / TXT_ARRAY, meta["embed_dim"])
        if plan.rows not in (None, count) or count != meta["count"]:
            raise MergeError(f"the shards hold {count} text rows, the plan {plan.rows}")
        write_parquet_atomic(run.out / TXT_ITEMS, pa.concat_tables(
            [pq.read_table(d / TXT_ITEMS) for d in dirs]))
        encoded, seconds = meta.get("encoded_count", count), meta["encode_time_sec"]
        meta.update(fanout_shards=len(dirs), rows=[0, count], batch_size=params.text_batch_size,
                    throughput_items_per_sec=encoded / seconds if seconds > 0 else 0.0)
        return run.finish_step(meta, versions=MERGE_VERSIONS)


def merge_image_shards(parts: Sequence[str | os.PathLike], plan: ShardPlan,
                       output_dir: str | os.PathLike, params: PipelineParams, *,
                       run_id: str = "", tracker: ExperimentTracker | None = None,
                       artifact_uri: str = "") -> dict[str, Any]:
    """Concatenate the shards' image outputs (``img_items.parquet`` rows renumbered) into the
    files one image step over the whole catalogue writes."""
    dirs = shard_dirs(parts, plan, IMG_META)
    metas = [json.loads((d / IMG_META).read_text()) for d in dirs]
    meta = _merged_meta(metas, _IMAGE_SUMS)
    # the run's parameters as the workers recorded them (this step is not given them all)
    with IMAGE_STEP.run(output_dir, meta, run_id=run_id, tracker=tracker,
                        artifact_uri=artifact_uri, shards=len(dirs)) as run:
        count = _concat_arrays(dirs, IMG_ARRAY, run.out / IMG_ARRAY, meta["embed_dim"])
        items, offset = [], 0
        for d in dirs:
            table = pq.read_table(d / IMG_ITEMS)
            rows = table.column("row").to_numpy() + offset
            items.append(table.set_column(table.schema.get_field_index("row"), "row",
                                          pa.array(rows, pa.int64())))
            offset += np.load(d / IMG_ARRAY, mmap_mode="r").shape[0]
        write_parquet_atomic(run.out / IMG_ITEMS, pa.concat_tables(items))
        write_parquet_atomic(run.out / IMG_FAILURES, pa.concat_tables(
            [pq.read_table(d / IMG_FAILURES) for d in dirs]))
        by_reason: collections.Counter = collections.Counter()
        unavailable: collections.Counter = collections.Counter()
        for m in metas:
            by_reason.update(m.get("failures_by_reason", {}))
            unavailable.update(m.get("unavailable_hosts", {}))
        encoded, seconds = meta.get("encoded_this_attempt", 0), meta["encode_time_sec"]
        # a worker's rate: all encoded images over the time the workers spent on them
        busy = sum(m["encoded_this_attempt"] / m["throughput_items_per_sec"] for m in metas
                   if m.get("throughput_items_per_sec"))
        meta.update(max_items=params.max_items, failures_by_reason=dict(sorted(by_reason.items())),
                    unavailable_hosts=dict(sorted(unavailable.items(),
                                                  key=lambda kv: (-kv[1], kv[0]))),
                    fanout_shards=len(dirs), rows=[0, meta["total_rows"]],
                    throughput_items_per_sec=encoded / busy if busy > 0 else 0.0,
                    encode_only_items_per_sec=encoded / seconds if seconds > 0 else 0.0)
        if count != meta["count"]:
            raise MergeError(f"the shards hold {count} image rows, their meta files "
                             f"{meta['count']}")
        return run.finish_step(meta, versions=MERGE_VERSIONS)

