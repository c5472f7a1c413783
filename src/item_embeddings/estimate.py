"""Expected wall time and cost of a Vertex AI run, from measured rates and dated list prices.

Every number the model uses comes from ``estimate_rates.json`` (shipped with the package), where
each one carries its basis (``measured`` here, ``list price``, ``published``, ``derived`` from
those, or ``assumed``), its source and its date; the estimate prints the ones it used.

The model (one run of the pipeline with the fan-out over ``shards``):

* every task pays a fixed overhead: VM start and image pull (assumed), interpreter start and the
  step's imports, its model load, reading its row range (measured); the inputs' fingerprint task
  runs first and is only that;
* a text or image shard task then encodes its items at the step's rate on its machine, and
  copies its output to Cloud Storage;
* the shard tasks of a loop run ``max_parallel_shards`` at a time, in waves of equal tasks;
* a merge task per loop concatenates the shard outputs (bytes read and written at the merge
  rate); text and image loops run side by side, fusion waits for both merges (time linear in
  items x epochs), publishing copies every output last;
* cost = each task's duration x its machine's (and accelerator's) price per hour, Spot or
  standard, plus the pipeline run fee.

Example::

    from item_embeddings.estimate import Choices, estimate
    print(estimate(Choices(items=500_000, image_items=500_000, shards=8)).format())
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import STRATEGIES, TEXT_BACKENDS, ConfigError, PipelineParams

RATES_FILE = "estimate_rates.json"
BASES = ("measured", "list price", "published", "derived", "assumed")
GUESSES = ("derived", "assumed")  # listed with the assumptions
TEXT_DIM = 384     # all-MiniLM-L6-v2
IMAGE_DIM = 512    # open_clip ViT-B-32
FLOAT_BYTES = 4
_DEFAULTS = PipelineParams()
# The fan-out's pipeline parameters of the same names and defaults.
DEFAULT_SHARDS = 1
DEFAULT_TEXT_MACHINE = "e2-standard-4"
DEFAULT_IMAGE_MACHINE = "n1-standard-4"
DEFAULT_FUSION_MACHINE = "e2-standard-4"
IMAGE_ACCELERATOR = "NVIDIA_TESLA_T4"  # the image step always runs with one
STRUCTURAL_ASSUMPTIONS = (
    "Items are split into `shards` equal contiguous row ranges; the image items (with an "
    "http(s) URL, after the max_items cap) are spread evenly over the shards.",
    "The shard tasks of one loop run max_parallel_shards at a time (0 = all at once), in waves "
    "of equal tasks; the text and image loops run side by side and each has its own limit.",
    "The never-cached 'Fingerprint inputs' task runs first and costs a small task's fixed part "
    "(with items on gs:// it reads object metadata only: seconds, not modelled).",
    "One merge task per loop, also at shards=1; fusion waits for both merges; publishing is "
    "last.",
    "Each task is billed per second of its whole duration, VM start and image pull included; "
    "waiting in a queue before a VM is assigned is neither billed nor modelled.",
    "Spot preemptions are not modelled (a preempted image task resumes from its last finished "
    "durable shard; a preemption costs a VM start plus the unfinished shard).",
    "CPU encode rates were measured on 2 vCPUs and are scaled linearly to the machine's vCPUs; "
    "the fusion step uses 2 threads by design and is not scaled.",
    "No kNN-graph step: it has no measured rate yet, so it is left out.",
)


@dataclass(frozen=True)
class Quantity:
    """One number of the rates file, with where it came from."""

    path: str
    value: Any
    unit: str
    basis: str
    source: str
    date: str
    note: str = ""

    def line(self) -> str:
        value = self.value
        if isinstance(value, (int, float)):
            value = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.6g}"
        note = f" — {self.note}" if self.note else ""
        return f"{self.path} = {value} {self.unit} [{self.basis}, {self.date}] {self.source}{note}"


class Rates:
    """The rates file; :meth:`get` records the quantities the latest estimate used."""

    def __init__(self, data: dict[str, Any], origin: str):
        self.data = data
        self.origin = origin
        self.used: dict[str, Quantity] = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Rates":
        """The packaged rates file, or ``path`` (a copy with your own prices)."""
        if path is None:
            text = resources.files("item_embeddings").joinpath(RATES_FILE).read_text()
            return cls(json.loads(text), RATES_FILE)
        try:
            return cls(json.loads(Path(path).read_text()), str(path))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read rates file {path}: {exc}") from None

    def node(self, path: str) -> Any:
        """The entry at a dotted ``path`` (ConfigError naming it when absent)."""
        node: Any = self.data
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(f"{self.origin} has no entry {path!r}")
            node = node[key]
        return node

    def get(self, path: str) -> Quantity:
        """The quantity at ``path``, recorded as used."""
        entry = self.node(path)
        if not isinstance(entry, dict) or "value" not in entry:
            raise ConfigError(f"{self.origin}: {path!r} is not a quantity")
        quantity = Quantity(path, entry["value"], entry.get("unit", ""), entry.get("basis", ""),
                            entry.get("source", ""), entry.get("date", ""), entry.get("note", ""))
        self.used.setdefault(path, quantity)
        return quantity

    def number(self, path: str) -> float:
        """The value of the quantity at ``path`` as a float."""
        return float(self.get(path).value)

    def machine(self, name: str, parameter: str) -> dict[str, Any]:
        """Machine type ``name``'s entry (ConfigError naming ``parameter`` and the known ones)."""
        machines = self.node("machines")
        if name not in machines:
            raise ConfigError(f"{parameter} {name!r} has no price in {self.origin}; known: "
                              f"{', '.join(sorted(machines))}")
        return machines[name]


@dataclass(frozen=True)
class Choices:
    """What the estimate is for: the catalogue and the run's pipeline parameters."""

    items: int
    image_items: int  # items with an http(s) image URL, before the max_items cap
    shards: int = DEFAULT_SHARDS
    max_parallel_shards: int = 0  # 0 = every shard at once
    text_machine_type: str = DEFAULT_TEXT_MACHINE
    image_machine_type: str = DEFAULT_IMAGE_MACHINE
    fusion_machine_type: str = DEFAULT_FUSION_MACHINE
    text_accelerator: str = ""    # "" = CPU; an accelerator runs the text step on Spot
    text_backend: str = _DEFAULTS.text_backend
    max_items: int = _DEFAULTS.max_items
    fusion_epochs: int = _DEFAULTS.fusion_epochs
    image_strategy: str = _DEFAULTS.image_strategy
    publish: bool = True

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable choice."""
        checks = (
            (self.items >= 1, f"items must be >= 1, got {self.items}"),
            (0 <= self.image_items <= self.items,
             f"image items must be between 0 and items ({self.items}), got {self.image_items}"),
            (self.shards >= 1, f"shards must be >= 1, got {self.shards}"),
            (self.shards <= self.items,
             f"shards ({self.shards}) must not exceed items ({self.items})"),
            (self.max_parallel_shards >= 0,
             f"max_parallel_shards must be >= 0 (0 = all), got {self.max_parallel_shards}"),
            (self.max_items >= 0, f"max_items must be >= 0 (0 = no cap), got {self.max_items}"),
            (self.fusion_epochs >= 1, f"fusion_epochs must be >= 1, got {self.fusion_epochs}"),
            (self.text_backend in TEXT_BACKENDS,
             f"text_backend must be one of {', '.join(TEXT_BACKENDS)}, got {self.text_backend!r}"),
            (self.image_strategy in STRATEGIES,
             f"image_strategy must be one of {', '.join(STRATEGIES)}, "
             f"got {self.image_strategy!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def selected_images(self) -> int:
        """Image items after the ``max_items`` cap (0 = no cap)."""
        return min(self.image_items, self.max_items) if self.max_items else self.image_items


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

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able data (``estimate --json``)."""
        choices = {**asdict(self.choices), "selected_images": self.choices.selected_images}
        return {"choices": choices,
                "steps": [asdict(s) for s in self.steps],
                "total": {"wall_s": self.wall_s, "cost_usd": self.cost_usd,
                          "machine_hours": sum(s.machine_hours for s in self.steps)},
                "storage": {"gb": self.storage_gb, "usd_per_month": self.storage_usd_month},
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
        lines = [
            f"{c.items:,} items, {c.image_items:,} with an image URL, {c.selected_images:,} "
            f"image items after max_items={c.max_items:,}; shards={c.shards}, "
            f"max_parallel_shards={c.max_parallel_shards or 'all'}, "
            f"text_backend={c.text_backend}, fusion_epochs={c.fusion_epochs}, "
            f"image_strategy={c.image_strategy}", ""]
        for row in (header, *rows):
            lines.append("  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))).rstrip())
        lines += ["", f"storage: {self.storage_gb:.2f} GB of outputs and intermediates, "
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


def count_items(uri: str, image_url_column: str = _DEFAULTS.image_url_column) -> tuple[int, int]:
    """(rows, rows with an http(s) image URL) of an items table (parquet file or folder)."""
    from .image.selection import READ_BATCH_ROWS, usable_url
    from .items import ItemsError, iter_batches, open_items

    names = open_items(uri).schema.names
    if image_url_column not in names:
        raise ItemsError(f"items table {uri} has no column {image_url_column!r} (columns: "
                         f"{', '.join(names)}); name the image URL column with "
                         "--image-url-column")
    rows = with_url = 0
    for batch in iter_batches(uri, [image_url_column], READ_BATCH_ROWS):
        rows += batch.num_rows
        with_url += sum(usable_url(v) is not None for v in batch.column(0).to_pylist())
    return rows, with_url


@dataclass(frozen=True)
class _Machine:
    label: str
    vcpus: int
    memory_gb: float
    cpu_kind: str
    usd_per_hour: float


def _machine(rates: Rates, name: str, parameter: str, accelerator: str, spot: bool) -> _Machine:
    spec = rates.machine(name, parameter)
    price_key = "spot_usd_per_hour" if spot else "on_demand_usd_per_hour"
    usd = rates.number(f"machines.{name}.{price_key}")
    label = name
    if accelerator:
        if accelerator not in rates.node("accelerators"):
            raise ConfigError(f"accelerator {accelerator!r} has no price in {rates.origin}; "
                              f"known: {', '.join(sorted(rates.node('accelerators')))}")
        families = rates.get(f"accelerators.{accelerator}.machine_families").value
        if name.split("-")[0] not in families:
            raise ConfigError(f"{parameter} {name!r} cannot take {accelerator}: it attaches to "
                              f"{'/'.join(families)} machine types only")
        usd += rates.number(f"accelerators.{accelerator}.{price_key}")
        label = f"{name} + {accelerator}"
    return _Machine(f"{label} ({'Spot' if spot else 'standard'})",
                    int(rates.number(f"machines.{name}.vcpus")),
                    rates.number(f"machines.{name}.memory_gb"),
                    str(rates.get(f"machines.{name}.cpu_kind").value), usd)


def _gpu_items_per_s(rates: Rates, accelerator: str, gflop_per_item: float) -> float:
    """Items/s the accelerator computes at its assumed sustained share of its fp16 peak."""
    peak = rates.number(f"accelerators.{accelerator}.fp16_peak_tflops") * 1e12
    share = rates.number(f"accelerators.{accelerator}.sustained_share_of_peak")
    return peak * share / (gflop_per_item * 1e9)


def _text_rate(rates: Rates, c: Choices, machine: _Machine) -> tuple[str, float]:
    """(concrete backend, items/s) of the text step on ``machine``."""
    backend = c.text_backend
    if c.text_accelerator:
        backend = "torch-fp16" if backend == "auto" else backend
        if backend != "torch-fp16":
            raise ConfigError(f"text_backend {backend!r} has no rate on {c.text_accelerator}: "
                              "on a GPU the text step's rate is known for torch-fp16 (auto) only")
        # sentence-transformers tokenizes a batch, then runs it on the GPU, on one thread: the
        # two take turns.
        tokenize = _per_vcpus(rates, "text.tokenize_items_per_s", machine)
        gpu = _gpu_items_per_s(rates, c.text_accelerator, rates.number("text.gflop_per_item"))
        return backend, 1 / (1 / tokenize + 1 / gpu)
    backend = "onnx-int8" if backend == "auto" else backend
    if backend == "torch-fp16":
        raise ConfigError("text_backend 'torch-fp16' needs a GPU: set text_accelerator")
    return backend, _per_vcpus(rates, f"text.cpu_items_per_s.{machine.cpu_kind}.{backend}",
                               machine)


def _per_vcpus(rates: Rates, path: str, machine: _Machine) -> float:
    """A rate measured on ``cpu.measured_vcpus`` vCPUs, scaled to ``machine``'s."""
    return rates.number(path) * machine.vcpus / rates.number("cpu.measured_vcpus")


def _image_rate(rates: Rates, machine: _Machine) -> float:
    """Downloads and decoding (one thread per vCPU) overlap the encoder: the slowest sets the
    rate."""
    decode = machine.vcpus / rates.number("image.decode_cpu_s_per_image")
    return min(decode, rates.number("image.download_images_per_s"),
               _gpu_items_per_s(rates, IMAGE_ACCELERATOR, rates.number("image.gflop_per_image")))


def _loop(name: str, machine: _Machine, items: int, c: Choices, fixed_s: float, rate: float,
          out_bytes_per_item: float, copy_bps: float) -> Step:
    """The shard tasks of one loop: equal tasks in waves of max_parallel_shards."""
    per_task = math.ceil(items / c.shards)
    task_s = fixed_s + per_task / rate + per_task * out_bytes_per_item / copy_bps
    waves = math.ceil(c.shards / (c.max_parallel_shards or c.shards))
    hours = c.shards * task_s / 3600
    return Step(name, machine.label, c.shards, per_task, task_s, waves * task_s, hours,
                hours * machine.usd_per_hour)


def _single(name: str, machine: _Machine, items: int, task_s: float) -> Step:
    hours = task_s / 3600
    return Step(name, machine.label, 1, items, task_s, task_s, hours, hours * machine.usd_per_hour)


def estimate(choices: Choices, rates: Rates | None = None) -> Estimate:
    """The expected wall time and cost of each step and of the run (see the module doc)."""
    c = choices
    c.check()
    rates = rates or Rates.load()
    rates.used.clear()  # the quantities of this estimate only
    vm_s = rates.number("task.vm_start_s")
    copy_bps = rates.number("storage.copy_bytes_per_s")
    id_bytes = rates.number("rows.id_file_bytes_per_item")
    read_s = rates.number("rows.range_read_s")
    n, m = c.items, c.selected_images
    txt_bytes, img_bytes = TEXT_DIM * FLOAT_BYTES + id_bytes, IMAGE_DIM * FLOAT_BYTES + id_bytes
    fused_bytes = _DEFAULTS.fusion_output_dim * FLOAT_BYTES + id_bytes

    text_m = _machine(rates, c.text_machine_type, "text_machine_type", c.text_accelerator,
                      spot=bool(c.text_accelerator))
    backend, text_rate = _text_rate(rates, c, text_m)
    image_m = _machine(rates, c.image_machine_type, "image_machine_type", IMAGE_ACCELERATOR,
                       spot=c.image_strategy == "SPOT")
    fusion_m = _machine(rates, c.fusion_machine_type, "fusion_machine_type", "", spot=False)
    small_m = _machine(rates, str(rates.get("task.small_task_machine_type").value),
                       "small_task_machine_type", "", spot=False)
    small_fixed = vm_s + rates.number("imports_s.fusion")
    merge_bps = rates.number("merge.bytes_per_s")

    fingerprint = _single("fingerprint inputs", small_m, n, small_fixed)
    text = _loop("text", text_m, n, c,
                 vm_s + rates.number("imports_s.text") + rates.number(f"text.load_s.{backend}")
                 + read_s, text_rate, txt_bytes, copy_bps)
    image = _loop("image", image_m, m, c,
                  vm_s + rates.number("imports_s.image") + rates.number("image.load_s") + read_s,
                  _image_rate(rates, image_m), img_bytes, copy_bps)
    text_merge = _single("text merge", small_m, n, small_fixed + 2 * n * txt_bytes / merge_bps)
    image_merge = _single("image merge", small_m, m, small_fixed + 2 * m * img_bytes / merge_bps)
    fusion = _single("fusion", fusion_m, n,
                     vm_s + rates.number("imports_s.fusion")
                     + (n * txt_bytes + m * img_bytes + n * fused_bytes) / copy_bps
                     + n * c.fusion_epochs / rates.number("fusion.item_epochs_per_s"))
    output_bytes = n * (txt_bytes + fused_bytes) + m * img_bytes
    publish = _single("publish", small_m, n, small_fixed + output_bytes / copy_bps)
    fee = Step("pipeline run fee", "", 0, 0, 0.0, 0.0, 0.0,
               rates.number("prices.pipeline_run_usd"))
    steps = [fingerprint, text, text_merge, image, image_merge, fusion,
             *([publish] if c.publish else []), fee]

    wall = (fingerprint.wall_s
            + max(text.wall_s + text_merge.wall_s, image.wall_s + image_merge.wall_s)
            + fusion.wall_s + (publish.wall_s if c.publish else 0.0))
    # The pipeline root keeps the shard outputs, the merged ones and the fused set; publishing
    # adds a copy of every output.
    stored_gb = (2 * (n * txt_bytes + m * img_bytes) + n * fused_bytes
                 + (output_bytes if c.publish else 0)) / 1e9
    storage_usd = stored_gb * rates.number("prices.storage_usd_per_gb_month")
    warnings = []
    fusion_inputs_gb = (n * txt_bytes + m * img_bytes) / 1e9
    if fusion_inputs_gb > fusion_m.memory_gb:
        # Fusion gathers random rows of its memory-mapped inputs every epoch; its rate was
        # measured with them in the page cache.
        warnings.append(
            f"fusion's inputs ({fusion_inputs_gb:.1f} GB) exceed the {fusion_m.memory_gb:g} GB "
            f"of fusion_machine_type {c.fusion_machine_type}: its random row reads would go to "
            "disk, which the measured rate does not include (not modelled); pick a machine "
            "with more memory")
    assumptions = [*STRUCTURAL_ASSUMPTIONS,
                   f"Text backend {c.text_backend!r} runs as {backend!r} on {text_m.label}.",
                   *(q.line() for q in rates.used.values() if q.basis in GUESSES)]
    return Estimate(c, steps, wall, sum(s.cost_usd for s in steps), stored_gb, storage_usd,
                    assumptions, list(rates.used.values()), rates.origin, warnings)
