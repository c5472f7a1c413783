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
  in the first shards and fewer image workers start; the shards left without images ride
  along and cost nothing (the plan counts their URL rows, so the worker reads neither their
  rows nor the previous set for them);
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

from dataclasses import dataclass

from .estimate_inputs import (
    ESTIMATE_PARAMS,
    Choices,
    count_items,
    parse_count,
)
from .estimate_rates import (
    BASES,
    GUESSES,
    IMAGE_ACCELERATOR,
    PER_HOST,
    Machine,
    Quantity,
    Rates,
    image_rates,
    knn_seconds,
    priced_machine,
    text_rate,
)
from .estimate_table import Estimate, Step, duration, money

__all__ = ["BASES", "ESTIMATE_PARAMS", "Choices", "Estimate", "Quantity", "Rates", "Step",
           "count_items", "duration", "estimate", "money", "parse_count", "shard_work"]

TEXT_DIM = 384     # all-MiniLM-L6-v2
IMAGE_DIM = 512    # open_clip ViT-B-32
FLOAT_BYTES = 4
KNN_ID_BYTES = 4 + 4  # int32 neighbour + float32 score per listed pair
APPLY_ASSUMPTION = ("fusion_mode=apply: the changed items' codes are computed in one pass, "
                    "costed as one training epoch over them (an upper bound).")
STRUCTURAL_ASSUMPTIONS = (
    "Image URLs are spread evenly over the rows; the max_items cap takes the first URL rows in "
    "input order, so the capped image work sits in the first shards, dealt to as many image "
    "workers as have images (largest first); a shard without images reads nothing and writes "
    "four small files (their latency is not modelled).",
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
                 copy_bps: float, reused_bytes_per_item: float) -> Step:
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
    """Each worker's shards with items, as their item counts: a shard without any costs its
    worker nothing (an image shard without images is written from the plan's counts, reading
    nothing; a text shard without rows, more shards than rows, has no rows to read)."""
    return [[counts[i] for i in shards if counts[i]] for shards in dealt]


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

    def worker_fixed(step: str, load: str, keys: int) -> float:
        # the encoder loaded once, the previous keys read once (the previous set's rows of
        # that step: every item's text, the selected images), whatever the shard
        return (r.vm_s + rates.number(f"imports_s.{step}") + rates.number(load)
                + keys * key_bytes / r.copy_bps)

    steps = {
        "plan": _first_task(r),
        "text": _worker_loop(
            "text workers", r.text_m, c, _dealt(rows, deal_by_rows(rows, p.max_parallel_shards)),
            worker_fixed("text", f"text.load_s.{backend}", n), r.read_s, text_per_s, r.txt_bytes,
            r.copy_bps, r.txt_bytes if r.previous else 0.0),
        "image": _worker_loop(
            "image workers", r.image_m, c,
            _dealt(images, deal_by_work(images, p.max_parallel_shards)),
            worker_fixed("image", "image.load_s", m), r.read_s,
            min(image_rates(rates, p, r.image_m, c.host_share).values()), r.img_bytes,
            r.copy_bps, r.img_bytes if r.previous else 0.0),
    }
    merged = n * r.txt_bytes + m * r.img_bytes  # read from the shards, merged, written back
    fused_rows = round(n * c.changed_fraction) if p.fusion_mode == "apply" else n
    epochs = 1 if p.fusion_mode == "apply" else p.fusion_epochs_for(n)  # apply: one pass
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
