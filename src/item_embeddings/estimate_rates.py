"""The estimator's numbers: the rates file (every quantity with its basis, source and date)
and the per-item rates of the steps' machines derived from it (see :mod:`.estimate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ConfigError, PipelineParams

RATES_FILE = "estimate_rates.json"
BASES = ("measured", "list price", "published", "derived", "assumed")
GUESSES = ("derived", "assumed")  # listed with the assumptions
IMAGE_ACCELERATOR = "NVIDIA_TESLA_T4"  # the image step always runs with one
PER_HOST = "per-host rate"  # the image worker stage that download_rate_per_host bounds


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
    def load(cls, path: str | Path | None = None) -> Rates:
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
class Machine:
    """A machine type as the estimate prices it."""

    label: str
    vcpus: int
    memory_gb: float
    cpu_kind: str
    usd_per_hour: float


def priced_machine(rates: Rates, name: str, parameter: str, accelerator: str = "",
                   spot: bool = False) -> Machine:
    """Machine type ``name`` (with ``accelerator``) at its Spot or standard price."""
    rates.machine(name, parameter)  # ConfigError naming an unknown machine type
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
    return Machine(f"{label} ({'Spot' if spot else 'standard'})",
                   int(rates.number(f"machines.{name}.vcpus")),
                   rates.number(f"machines.{name}.memory_gb"),
                   str(rates.get(f"machines.{name}.cpu_kind").value), usd)


def gpu_items_per_s(rates: Rates, accelerator: str, gflop_per_item: float,
                    precision: str = "fp16") -> float:
    """Items/s the accelerator computes at its assumed sustained share of its peak."""
    peak = rates.number(f"accelerators.{accelerator}.{precision}_peak_tflops") * 1e12
    share = rates.number(f"accelerators.{accelerator}.sustained_share_of_peak")
    return peak * share / (gflop_per_item * 1e9)


def per_vcpus(rates: Rates, path: str, machine: Machine) -> float:
    """A rate measured on ``cpu.measured_vcpus`` vCPUs, scaled to ``machine``'s."""
    return rates.number(path) * machine.vcpus / rates.number("cpu.measured_vcpus")


def text_rate(rates: Rates, p: PipelineParams, machine: Machine) -> tuple[str, float]:
    """(concrete backend, items/s) of the text step on ``machine``, resolved as the step
    resolves ``auto`` (exact: torch on a GPU, onnx float32 on a CPU)."""
    on_gpu = bool(p.text_accelerator)
    backend = p.text_backend
    if backend == "auto":
        backend = "torch" if on_gpu else "onnx"
    if backend in ("torch", "torch-fp16") and on_gpu:
        # sentence-transformers tokenizes a batch, then runs it on the GPU, on one thread: the
        # two take turns.
        tokenize = per_vcpus(rates, "text.tokenize_items_per_s", machine)
        gpu = gpu_items_per_s(rates, p.text_accelerator, rates.number("text.gflop_per_item"),
                               "fp16" if backend == "torch-fp16" else "fp32")
        return backend, 1 / (1 / tokenize + 1 / gpu)
    if backend == "torch-fp16":
        raise ConfigError("text_backend 'torch-fp16' needs a GPU: set text_accelerator")
    return backend, per_vcpus(rates, f"text.cpu_items_per_s.{machine.cpu_kind}.{backend}",
                               machine)


def image_rates(rates: Rates, p: PipelineParams, machine: Machine,
                largest_host_share: float = 1.0) -> dict[str, float]:
    """Images/s of an image worker's stages, which overlap (the slowest sets its rate):
    downloads (``download_concurrency`` in flight), the per-host rate (``download_rate_per_host``
    requests/s to the host holding ``largest_host_share`` of the image URLs caps the whole
    stream at rate / share; absent when the rate is 0, no limit), the CPU (decoding as
    ``image_decode`` asks and the downloads' own CPU, one decode thread per vCPU) and the T4."""
    cpu_s = (rates.number(f"image.decode_cpu_s_per_image.{p.image_decode}")
             + rates.number("image.download_cpu_s_per_image"))
    stages = {"downloads": p.download_concurrency / rates.number("image.download_latency_s")}
    if p.download_rate_per_host > 0:
        stages[PER_HOST] = p.download_rate_per_host / largest_host_share
    stages.update({"CPU": machine.vcpus / cpu_s,
                   "T4": gpu_items_per_s(rates, IMAGE_ACCELERATOR,
                                         rates.number("image.gflop_per_image"))})
    return stages


def knn_seconds(rates: Rates, n: int, space: str, exact_max: int, machine: Machine) -> float:
    """One kNN graph's compute time: the exact search grows as n^2 from its measurement at
    ``knn.exact_items``, the IVF path as n^exponent from its measurement at ``knn.ivf_items``;
    both scaled to the machine's vCPUs."""
    scale = rates.number("cpu.measured_vcpus") / machine.vcpus
    if n <= exact_max:
        ref = rates.number("knn.exact_items")
        return rates.number(f"knn.exact_s.{space}") * (n / ref) ** 2 * scale
    ref = rates.number("knn.ivf_items")
    exponent = rates.number("knn.ivf_exponent")
    return rates.number(f"knn.ivf_s.{space}") * (n / ref) ** exponent * scale
