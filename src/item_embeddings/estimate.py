"""Expected wall time and cost of a Vertex AI run, from measured rates and dated list prices.

Every number the model uses comes from ``estimate_rates.json`` (shipped with the package), where
each one carries its basis (``measured`` here, ``list price``, ``published``, ``derived`` from
those, or ``assumed``), its source and its date; the estimate prints the ones it used.

The model follows the DAG (``pipeline/pipeline.py``) and its fan-out (``fanout.plan_shards``):

* every task pays a fixed part: VM start and image pull (assumed; on a persistent resource,
  ``persistent_resource_id``, the assumed start on a warm node instead), interpreter start and
  the step's imports, its model load (measured). Five tasks run one after another, one per
  role: the first task (the inputs' fingerprint, the previous set verified once, the plan), the
  text and image workers side by side, fusion (which merges the shards first), the kNN graphs,
  the QA report (which publishes);
* the items are cut into ``shards`` row ranges; the text workers get the shards with rows, the
  image workers only the shards with images to embed (``fanout.deal_by_work``), at most
  ``max_parallel_shards`` each: a worker pays its fixed part once, then per shard its row
  range, the encoding at the step's rate on its machine and the copy of the shard's output to
  Cloud Storage; a loop lasts as long as its busiest worker. The image cap (``max_items``) is
  global: the first ``max_items`` URL rows in input order, so with the cap the image work sits
  in the first shards and fewer image workers start;
* fusion reads the shard outputs, concatenates and hashes them (measured merge rate), writes
  the merged files, then fuses (time linear in items x epochs); the kNN graphs (measured at
  100k and 500k, the exact search up to ``knn_exact_max_items``), the QA report and publishing
  follow;
* an incremental run (``changed_fraction`` < 1, with ``previous_uri``) encodes only the changed
  items' text and images; its first task hashes the previous set once, and each worker reads
  the previous keys once and per shard only its reused rows; fusion with
  ``fusion_mode=apply`` computes only the changed codes; the kNN graphs recompute the rows
  that need it (``knn.incremental_share`` of the full compute at the changed share it is
  stated for, scaled linearly, a rebuild at most);
* cost = each task's duration x its machine's (and accelerator's) price per hour, Spot or
  standard, plus the pipeline run fee.

Example (500,000 items on eight shards):

>>> from item_embeddings.config import PipelineParams
>>> from item_embeddings.estimate import Choices, estimate
>>> print(estimate(Choices(500_000, 500_000, PipelineParams(shards=8))).format())
500,000 items, 500,000 with an image URL, 150,000 image items after max_items=150,000, ...
<BLANKLINE>
step                   machine                                 tasks  items/task      task ...
fingerprint and plan   e2-standard-4 (standard)                    1     500,000 ...
text workers           e2-standard-4 (standard)                    8      62,500 ...
image workers          n1-standard-4 + NVIDIA_TESLA_T4 (Spot)      3      62,500 ...
...
total (critical path) ...
"""

from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from .config import ConfigError, PipelineParams
from .estimate_rates import (
    BASES,
    GUESSES,
    IMAGE_ACCELERATOR,
    PER_HOST,
    RATES_FILE,
    Machine,
    Quantity,
    Rates,
    image_rates,
    knn_seconds,
    priced_machine,
    text_rate,
)

__all__ = ["BASES", "ESTIMATE_PARAMS", "Choices", "Estimate", "Quantity", "Rates", "Step",
           "count_items", "duration", "estimate", "money", "parse_count", "shard_work"]

TEXT_DIM = 384     # all-MiniLM-L6-v2
IMAGE_DIM = 512    # open_clip ViT-B-32
FLOAT_BYTES = 4
KNN_ID_BYTES = 4 + 4  # int32 neighbour + float32 score per listed pair
# The pipeline parameters the estimate depends on (the CLI's shortcut options).
ESTIMATE_PARAMS = ("shards", "max_parallel_shards", "text_machine_type", "text_accelerator",
                   "text_strategy", "text_backend", "image_machine_type", "image_strategy",
                   "max_items", "image_decode", "download_concurrency", "fusion_machine_type",
                   "fusion_epochs", "fusion_mode",
                   "knn_machine_type", "knn_k", "knn_exact_max_items", "publish_uri",
                   "persistent_resource_id")
APPLY_ASSUMPTION = ("fusion_mode=apply: the changed items' codes are computed in one pass, "
                    "costed as one training epoch over them (an upper bound).")
STRUCTURAL_ASSUMPTIONS = (
    "Image URLs are spread evenly over the rows; the max_items cap takes the first URL rows in "
    "input order, so the capped image work sits in the first shards, dealt to as many image "
    "workers as have images (largest first).",
    "The first task fingerprints the items from object metadata (with items on gs://), reads "
    "the id and URL columns once to plan (measured validation rate) and, with previous_uri, "
    "reads and hashes every file of the previous set once, HASH_THREADS files at a time each at "
    "the copy rate.",
    "Each task is billed per second of its whole duration, VM start and image pull included; "
    "waiting in a queue before a VM is assigned is neither billed nor modelled.",
    "With persistent_resource_id the tasks run on the resource's warm machines: each pays the "
    "assumed start on a warm node instead of a VM start, and the run is charged the machine "
    "time its tasks take (the resource bills every node while it runs, busy or not: the idle "
    "time between runs is the team's choice to keep it warm, not a cost of this run).",
    "Spot preemptions are not modelled (a preempted worker resumes from its last finished "
    "shard: a preemption costs a VM start plus the unfinished shard).",
    "CPU rates were measured on 2 vCPUs and are scaled linearly to the machine's vCPUs (text "
    "encoding, decoding, kNN search, tokenizing); the fusion step uses 2 threads by design and "
    "is not scaled.",
    "An incremental run re-downloads the previous set's failed images (retry_failed_images): "
    "their count is not known here and not modelled.",
    "An image worker's downloads, its CPU (decoding as image_decode asks, plus the downloads' "
    "own CPU, on every vCPU) and its T4 overlap: the slowest sets its rate. Downloads keep "
    "download_concurrency requests in flight, each taking the assumed latency, and keep to "
    "each host's request rate (below, when one is set); a catalogue on fewer than "
    "download_concurrency / 32 hosts has fewer in flight (32 connections per host), which is "
    "not modelled.",
)
# Without a catalogue to measure (--items-file), the share of the image URLs on the largest
# host: a catalogue served from its own CDN, one host, is the common case.
DEFAULT_LARGEST_HOST_SHARE = 1.0


@dataclass(frozen=True)
class Choices:
    """What the estimate is for: the catalogue and the run's pipeline parameters.

    Args:
        items: Rows of the items table.
        image_items: Rows with an http(s) image URL, before the ``max_items`` cap.
        params: The run's pipeline parameters (validated when built).
        changed_fraction: Share of the items whose text or image changed since the previous
            set (an incremental run from ``previous_uri``); 1 = a full run.
        largest_host_share: Share of the image URLs on their most frequent host (measured by
            :func:`count_items`); None = :data:`DEFAULT_LARGEST_HOST_SHARE`.
    """

    items: int
    image_items: int
    params: PipelineParams = field(default_factory=PipelineParams)
    changed_fraction: float = 1.0
    largest_host_share: float | None = None

    @property
    def host_share(self) -> float:
        """The largest host's share of the image URLs the estimate uses."""
        return (DEFAULT_LARGEST_HOST_SHARE if self.largest_host_share is None
                else self.largest_host_share)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable choice."""
        checks = (
            (self.items >= 1, f"items must be >= 1, got {self.items}"),
            (0 <= self.image_items <= self.items,
             f"image items must be between 0 and items ({self.items}), got {self.image_items}"),
            (0 < self.changed_fraction <= 1,
             f"changed fraction must be in (0, 1], got {self.changed_fraction}"),
            (0 < self.host_share <= 1,
             f"largest host share must be in (0, 1], got {self.host_share}"),
            (not self.incremental or bool(self.params.previous_uri),
             "an incremental run (changed fraction < 1) reuses the set at previous_uri: set "
             "previous_uri"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def incremental(self) -> bool:
        return self.changed_fraction < 1

    @property
    def selected_images(self) -> int:
        """Image items after the ``max_items`` cap (0 = no cap)."""
        cap = self.params.max_items
        return min(self.image_items, cap) if cap else self.image_items

    def describe(self) -> str:
        """One line: the catalogue and the parameters the estimate depends on."""
        p = self.params
        run = (f"incremental run, {self.changed_fraction:.1%} of the items changed"
               if self.incremental else "full run")
        return (f"{self.items:,} items, {self.image_items:,} with an image URL, "
                f"{self.selected_images:,} image items after max_items={p.max_items:,}, "
                f"{self.host_share:.0%} of the URLs on the largest host; {run}; "
                f"shards={p.shards}, max_parallel_shards={p.max_parallel_shards}, "
                f"text_backend={p.text_backend}, text_strategy={p.text_strategy}, "
                f"image_strategy={p.image_strategy}, image_decode={p.image_decode}, "
                f"download_concurrency={p.download_concurrency}, fusion_mode={p.fusion_mode}, "
                f"fusion_epochs={p.fusion_epochs}, knn_k={p.knn_k}, "
                f"publish={'on' if p.publish_uri else 'off (publish_uri empty)'}, machines="
                + (f"persistent resource {p.persistent_resource_id}"
                   if p.persistent_resource_id else "started per task"))


@dataclass(frozen=True)
class Step:
    """One row of the estimate: a step's tasks, their duration and what they cost."""

    step: str
    machine: str
    tasks: int
    items_per_task: int
    task_s: float
    wall_s: float
    machine_hours: float
    cost_usd: float


@dataclass
class Estimate:
    """The steps' rows, the run's totals, and what the numbers rest on."""

    choices: Choices
    steps: list[Step]
    wall_s: float
    cost_usd: float
    storage_gb: float
    storage_usd_month: float
    assumptions: list[str] = field(default_factory=list)
    rates_used: list[Quantity] = field(default_factory=list)
    rates_origin: str = RATES_FILE
    warnings: list[str] = field(default_factory=list)
    image_rates: dict[str, float] = field(default_factory=dict)  # images/s per worker stage

    def image_worker(self) -> tuple[str, float]:
        """(the stage that bounds an image worker, its images/s)."""
        bound = min(self.image_rates, key=self.image_rates.get)
        return bound, self.image_rates[bound]

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able data (``estimate --json``)."""
        c = self.choices
        choices = {"items": c.items, "image_items": c.image_items,
                   "selected_images": c.selected_images, "changed_fraction": c.changed_fraction,
                   "largest_host_share": c.host_share,
                   "params": {name: getattr(c.params, name) for name in ESTIMATE_PARAMS}}
        return {"choices": choices,
                "steps": [asdict(s) for s in self.steps],
                "total": {"wall_s": self.wall_s, "cost_usd": self.cost_usd,
                          "machine_hours": sum(s.machine_hours for s in self.steps)},
                "storage": {"gb": self.storage_gb, "usd_per_month": self.storage_usd_month},
                "image_worker": {"images_per_s": self.image_worker()[1],
                                 "bound_by": self.image_worker()[0],
                                 "stages_images_per_s": self.image_rates},
                "warnings": self.warnings,
                "assumptions": self.assumptions,
                "rates_used": [asdict(q) for q in self.rates_used],
                "rates_file": self.rates_origin}

    def format(self) -> str:
        """The table, the warnings, the assumptions and the rates used, as text."""
        c = self.choices
        header = ("step", "machine", "tasks", "items/task", "task", "wall", "machine-h", "cost")
        rows = [(s.step, s.machine, str(s.tasks) if s.tasks else "",
                 f"{s.items_per_task:,}" if s.tasks else "",
                 duration(s.task_s) if s.tasks else "", duration(s.wall_s) if s.tasks else "",
                 f"{s.machine_hours:.2f}" if s.tasks else "", money(s.cost_usd))
                for s in self.steps]
        rows.append(("total (critical path)", "", "", "", "", duration(self.wall_s),
                     f"{sum(s.machine_hours for s in self.steps):.2f}", money(self.cost_usd)))
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        numeric = {2, 3, 4, 5, 6, 7}
        lines = [c.describe(), ""]
        for row in (header, *rows):
            lines.append("  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))).rstrip())
        bound, rate = self.image_worker()
        stages = ", ".join(f"{k} {v:,.0f}" for k, v in self.image_rates.items())
        lines += ["", f"image worker: {rate:,.0f} images/s, bound by {bound} ({stages})",
                  f"storage: {self.storage_gb:.2f} GB of outputs and intermediates, "
                  f"{money(self.storage_usd_month)} per month until deleted", ""]
        if self.warnings:
            lines += ["warnings:", *(f"  ! {w}" for w in self.warnings), ""]
        lines += [
                  "assumptions:", *(f"  - {a}" for a in self.assumptions), "",
                  f"measured rates and published prices used ({self.rates_origin}):",
                  *(f"  - {q.line()}" for q in self.rates_used if q.basis not in GUESSES)]
        return "\n".join(lines)


def duration(seconds: float) -> str:
    """``42 s``, ``10.0 min`` or ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def money(usd: float) -> str:
    """Dollars: three decimals below $1, cents above."""
    return f"${usd:.3f}" if usd < 1 else f"${usd:,.2f}"


def parse_count(text: str) -> int:
    """``"500000"``, ``"500_000"``, ``"500k"`` or ``"10M"`` -> an int (ConfigError otherwise)."""
    match = re.fullmatch(r"\s*(\d[\d_]*(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise ConfigError(f"expected a count such as 500000, 500k or 10M, got {text!r}")
    scale = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    value = float(match.group(1).replace("_", "")) * scale
    if not value.is_integer():
        raise ConfigError(f"expected a whole number of items, got {text!r}")
    return int(value)


class ItemCounts(NamedTuple):
    """What :func:`count_items` counts in an items table."""

    items: int
    image_items: int                   # rows with an http(s) image URL
    largest_host_share: float | None   # share of those URLs on their most frequent host


def count_items(uri: str, image_url_column: str = PipelineParams().image_url_column
                ) -> ItemCounts:
    """Rows, rows with an http(s) image URL, and the largest host's share of those URLs (the
    host as the downloader counts it, ``image/hosts.py``) of an items table (file or folder)."""
    from .image.hosts import host_of
    from .image.selection import READ_BATCH_ROWS, usable_url
    from .items import ItemsError, iter_batches, open_items

    names = open_items(uri).schema.names
    if image_url_column not in names:
        raise ItemsError(f"items table {uri} has no column {image_url_column!r} (columns: "
                         f"{', '.join(names)}); name the image URL column with "
                         "--image-url-column")
    rows = with_url = 0
    hosts: collections.Counter = collections.Counter()
    for batch in iter_batches(uri, [image_url_column], READ_BATCH_ROWS):
        rows += batch.num_rows
        urls = [url for v in batch.column(0).to_pylist() if (url := usable_url(v)) is not None]
        with_url += len(urls)
        hosts.update(host_of(url) for url in urls)
    largest = max(hosts.values()) / with_url if with_url else None
    return ItemCounts(rows, with_url, largest)


def shard_work(c: Choices) -> tuple[list[int], list[int]]:
    """(rows, selected image rows) of each planned shard, as :func:`fanout.plan_shards` cuts
    them, with the URL rows spread evenly over the rows."""
    from .fanout import image_quotas, shard_bounds

    n, k = c.items, c.params.shards
    bounds = shard_bounds(n, k)
    rows = [bounds[i + 1] - bounds[i] for i in range(k)]
    urls = [c.image_items * bounds[i + 1] // n - c.image_items * bounds[i] // n for i in range(k)]
    quotas = image_quotas(urls, c.params.max_items)
    return rows, [u if q is None else q for u, q in zip(urls, quotas)]


def _worker_loop(name: str, machine: Machine, c: Choices, workers: list[list[int]],
                 fixed_s: float, per_shard_s: float, rate: float, out_bytes_per_item: float,
                 copy_bps: float, reused_bytes_per_item: float = 0.0) -> Step:
    """The worker tasks of one loop, given each worker's shards (their items), which it runs
    one after another; an incremental run reads each shard's reused rows of the previous set
    (``reused_bytes_per_item`` each, only those rows)."""
    width = len(workers)
    reused = 1 - c.changed_fraction
    durations = [fixed_s + sum(per_shard_s + round(items * c.changed_fraction) / rate
                               + items * (out_bytes_per_item + reused * reused_bytes_per_item)
                               / copy_bps for items in shards)
                 for shards in workers]
    busiest = max(range(width), key=lambda w: durations[w])
    hours = sum(durations) / 3600
    return Step(name, machine.label, width, sum(workers[busiest]), durations[busiest],
                durations[busiest], hours, hours * machine.usd_per_hour)


def _single(name: str, machine: Machine, items: int, task_s: float) -> Step:
    hours = task_s / 3600
    return Step(name, machine.label, 1, items, task_s, task_s, hours, hours * machine.usd_per_hour)


@dataclass(frozen=True)
class _Run:
    """What every step's estimate reads: the choices, the rates, the machines and the sizes."""

    c: Choices
    rates: Rates
    text_m: Machine
    image_m: Machine
    fusion_m: Machine
    knn_m: Machine
    small_m: Machine
    vm_s: float           # a task's VM start and image pull (or start on a persistent resource)
    copy_bps: float       # to and from Cloud Storage
    read_s: float         # a worker's read of its row range, per shard
    txt_bytes: float      # per item of each output, its id file included
    img_bytes: float
    fused_bytes: float
    knn_bytes: float

    @property
    def small_fixed(self) -> float:
        """The fixed part of a small task: VM start, interpreter and imports."""
        return self.vm_s + self.rates.number("imports_s.fusion")

    @property
    def previous(self) -> bool:
        """Whether the run reads a previous set (``previous_uri``)."""
        return bool(self.c.params.previous_uri)


def _dealt(counts: list[int], dealt: list[list[int]]) -> list[list[int]]:
    """Each worker's shards as their item counts."""
    return [[counts[i] for i in shards] for shards in dealt]


def _first_task(r: _Run) -> Step:
    """Fingerprint, the previous set verified once (every file read and hashed, HASH_THREADS
    at a time), the plan."""
    from .incremental import HASH_THREADS

    n = r.c.items
    verify_s = _output_bytes(r) / (r.copy_bps * HASH_THREADS) if r.previous else 0.0
    return _single("fingerprint and plan", r.small_m, n,
                   r.small_fixed + n / r.rates.number("plan.rows_per_s") + verify_s)


def _knn_compute_s(r: _Run) -> float:
    """Both graphs' compute; an incremental run's share of it (a rebuild at most)."""
    c, p = r.c, r.c.params
    full = sum(knn_seconds(r.rates, c.items, space, p.knn_exact_max_items, r.knn_m)
               for space in ("text_384", "fused_128"))
    if not (r.previous and c.incremental):
        return full
    share = r.rates.number("knn.incremental_share") * c.changed_fraction / r.rates.number(
        "knn.incremental_at_changed")
    return full * min(1.0, share)


def _steps(r: _Run, backend: str, text_per_s: float, rows: list[int], images: list[int]
           ) -> dict[str, Step]:
    """Every step's row, in DAG order."""
    from .fanout import deal_by_rows, deal_by_work

    c, p, rates = r.c, r.c.params, r.rates
    n, m = c.items, c.selected_images
    key_bytes = rates.number("storage.previous_key_bytes_per_item") if r.previous else 0.0

    def worker_fixed(step: str, load: str) -> float:
        # the encoder loaded once, the previous keys read once (n of them, whatever the shard)
        return (r.vm_s + rates.number(f"imports_s.{step}") + rates.number(load)
                + n * key_bytes / r.copy_bps)

    steps = {
        "plan": _first_task(r),
        "text": _worker_loop(
            "text workers", r.text_m, c, _dealt(rows, deal_by_rows(rows, p.max_parallel_shards)),
            worker_fixed("text", f"text.load_s.{backend}"), r.read_s, text_per_s, r.txt_bytes,
            r.copy_bps, r.txt_bytes if r.previous else 0.0),
        "image": _worker_loop(
            "image workers", r.image_m, c,
            _dealt(images, deal_by_work(images, p.max_parallel_shards)),
            worker_fixed("image", "image.load_s"), r.read_s,
            min(image_rates(rates, p, r.image_m, c.host_share).values()), r.img_bytes,
            r.copy_bps, r.img_bytes if r.previous else 0.0),
    }
    merged = n * r.txt_bytes + m * r.img_bytes  # read from the shards, merged, written back
    fused_rows = round(n * c.changed_fraction) if p.fusion_mode == "apply" else n
    epochs = 1 if p.fusion_mode == "apply" else p.fusion_epochs  # apply: one forward pass
    steps["fusion"] = _single(
        "fusion", r.fusion_m, n, r.vm_s + rates.number("imports_s.fusion")
        + 2 * merged / r.copy_bps + merged / rates.number("merge.bytes_per_s")
        + n * r.fused_bytes / r.copy_bps
        + fused_rows * epochs / rates.number("fusion.item_epochs_per_s"))
    previous_graphs = n * r.knn_bytes if r.previous and c.incremental else 0.0
    steps["knn"] = _single(
        "kNN graphs", r.knn_m, n, r.vm_s + rates.number("imports_s.knn")
        + (n * r.txt_bytes + n * r.fused_bytes + n * r.knn_bytes + previous_graphs) / r.copy_bps
        + _knn_compute_s(r))
    publish_s = _output_bytes(r) / r.copy_bps if p.publish_uri else 0.0
    steps["report"] = _single(
        "QA report", r.small_m, n,  # publishing included (publish_uri set)
        r.small_fixed + rates.number("report.fixed_s") + n * rates.number("report.s_per_item")
        + (n * (r.txt_bytes + r.fused_bytes + r.knn_bytes) + m * r.img_bytes) / r.copy_bps
        + publish_s)
    steps["fee"] = Step("pipeline run fee", "", 0, 0, 0.0, 0.0, 0.0,
                        rates.number("prices.pipeline_run_usd"))
    return steps


def _output_bytes(r: _Run) -> float:
    n, m = r.c.items, r.c.selected_images
    return n * (r.txt_bytes + r.fused_bytes + r.knn_bytes) + m * r.img_bytes


def _warnings(r: _Run) -> list[str]:
    """What would make the estimate, or the run, go wrong with these choices."""
    c, p = r.c, r.c.params
    n, m = c.items, c.selected_images
    warnings = []
    fusion_inputs_gb = (n * r.txt_bytes + m * r.img_bytes) / 1e9
    if fusion_inputs_gb > r.fusion_m.memory_gb:
        # Fusion gathers random rows of its memory-mapped inputs every epoch; its rate was
        # measured with them in the page cache.
        warnings.append(
            f"fusion's inputs ({fusion_inputs_gb:.1f} GB) exceed the {r.fusion_m.memory_gb:g} "
            f"GB of fusion_machine_type {p.fusion_machine_type}: its random row reads would go "
            "to disk, which the measured rate does not include (not modelled); pick a machine "
            "with more memory")
    knn_gb = n * r.rates.number("knn.peak_bytes_per_item") / 1e9
    if knn_gb > r.knn_m.memory_gb:
        fits = sorted((r.rates.number(f"machines.{name}.memory_gb"), name)
                      for name in r.rates.node("machines")
                      if r.rates.number(f"machines.{name}.memory_gb") >= knn_gb)
        warnings.append(
            f"the kNN step needs about {knn_gb:.0f} GB at {n:,} items (measured peak per item "
            f"at 500k), more than the {r.knn_m.memory_gb:g} GB of knn_machine_type "
            f"{p.knn_machine_type}: the step refuses it before any work; "
            + (f"set knn_machine_type={fits[0][1]} ({fits[0][0]:g} GB)" if fits else
               "no machine type in the rates file has that much memory"))
    return warnings


def _per_host_assumption(c: Choices, stages: dict[str, float]) -> str:
    """How the per-host rate enters the image worker's rate (the bound, or not)."""
    p = c.params
    measured = ("measured in the items file" if c.largest_host_share is not None else
                "the default, one host: a catalogue on its own CDN; --items-file measures it, "
                "--largest-host-share sets it")
    binds = ("so it bounds the downloads: raise download_rate_per_host (or set 0) when the "
             "images are on your own CDN (docs/images.md)"
             if stages[PER_HOST] < stages["downloads"] else "above the downloads' rate")
    return (f"The largest image host holds {c.host_share:.0%} of the image URLs ({measured}); "
            f"one image worker sends it at most download_rate_per_host = "
            f"{p.download_rate_per_host:g}/s per image worker, so it downloads at most "
            f"{stages[PER_HOST]:,.0f} images/s: {binds}.")


def estimate(choices: Choices, rates: Rates | None = None) -> Estimate:
    """The expected wall time and cost of each step and of the run (see the module doc)."""
    c, p = choices, choices.params
    c.check()
    rates = rates or Rates.load()
    rates.used.clear()  # the quantities of this estimate only
    vm_s = rates.number("task.persistent_resource_start_s" if p.persistent_resource_id
                        else "task.vm_start_s")
    copy_bps = rates.number("storage.copy_bytes_per_s")
    id_bytes = rates.number("rows.id_file_bytes_per_item")
    read_s = rates.number("rows.range_read_s")
    text_m = priced_machine(rates, p.text_machine_type, "text_machine_type", p.text_accelerator,
                            spot=p.text_strategy == "SPOT")
    backend, text_per_s = text_rate(rates, p, text_m)
    r = _Run(c, rates, text_m,
             priced_machine(rates, p.image_machine_type, "image_machine_type",
                            IMAGE_ACCELERATOR, spot=p.image_strategy == "SPOT"),
             priced_machine(rates, p.fusion_machine_type, "fusion_machine_type"),
             priced_machine(rates, p.knn_machine_type, "knn_machine_type"),
             priced_machine(rates, str(rates.get("task.small_task_machine_type").value),
                            "small_task_machine_type"),
             vm_s, copy_bps, read_s, TEXT_DIM * FLOAT_BYTES + id_bytes,
             IMAGE_DIM * FLOAT_BYTES + id_bytes, p.fusion_output_dim * FLOAT_BYTES + id_bytes,
             2 * p.knn_k * KNN_ID_BYTES)
    rows, images = shard_work(c)
    s = _steps(r, backend, text_per_s, rows, images)
    wall = (s["plan"].wall_s + max(s["text"].wall_s, s["image"].wall_s)
            + s["fusion"].wall_s + s["knn"].wall_s + s["report"].wall_s)
    # The pipeline root keeps the shard outputs, the merged ones, the fused set and the graphs;
    # publishing adds a copy of every output.
    n, m = c.items, c.selected_images
    stored_gb = (2 * (n * r.txt_bytes + m * r.img_bytes) + n * (r.fused_bytes + r.knn_bytes)
                 + (_output_bytes(r) if p.publish_uri else 0)) / 1e9
    storage_usd = stored_gb * rates.number("prices.storage_usd_per_gb_month")
    warnings = _warnings(r)
    stages = image_rates(rates, p, r.image_m, c.host_share)
    assumptions = [*STRUCTURAL_ASSUMPTIONS,
                   *([APPLY_ASSUMPTION] if p.fusion_mode == "apply" else []),
                   f"Text backend {p.text_backend!r} runs as {backend!r} on {text_m.label}.",
                   *([_per_host_assumption(c, stages)] if PER_HOST in stages else []),
                   *(q.line() for q in rates.used.values() if q.basis in GUESSES)]
    steps = [s[k] for k in ("plan", "text", "image", "fusion", "knn", "report", "fee")]
    return Estimate(c, steps, wall, sum(step.cost_usd for step in steps), stored_gb,
                    storage_usd, assumptions, list(rates.used.values()), rates.origin, warnings,
                    stages)
