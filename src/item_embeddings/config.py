"""Every pipeline knob, its type, default and meaning — in one place.

The pipeline's parameters, the ``--set name=value`` names of the CLI and the keys of a YAML config
file are the fields of :class:`PipelineParams` (read from the user by ``param_sources``). A rerun
from the Vertex AI UI can change any of them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_BACKENDS = ("auto", "torch", "torch-fp16", "onnx", "onnx-int8")
STRATEGIES = ("SPOT", "STANDARD")  # Vertex AI custom-job scheduling strategies
TRACKING_BACKENDS = ("auto", "vertex", "local", "none")
FUSION_MODES = ("train", "apply")
IMAGE_DECODE_MODES = ("fast", "exact")  # image.decoding: JPEG decoded near the input size, or whole
# A worker's outputs are one artifact each, collected by the merge step: Vertex refuses to
# collect more than 100 artifacts from one loop ("Maximum number of artifacts exceeded").
MAX_WORKERS = 100
MAX_SHARDS = 10_000
# Vertex AI machine types: family-series-size, e.g. e2-standard-4, n1-highmem-8, a2-highgpu-1g,
# c3-standard-8-lssd.
MACHINE_TYPE = r"[a-z][a-z0-9]*-[a-z]+-[0-9]+[a-z]*(-[a-z]+)?"
# N1 machine types, the ones a T4 (and a P4, P100 or V100) attaches to.
_N1 = r"n1-(standard|highmem|highcpu)-[0-9]+"
# The Vertex AI GPUs a text worker can take, one per worker, with the machine types that carry
# exactly one of them (cloud.google.com/vertex-ai/docs/training/configure-compute, GPUs). The
# other accelerator types are TPUs (the text step runs torch on CUDA), K80s (end of support) or
# come only in machines of 4 or 8 GPUs.
_ON_N1 = (_N1, "n1 machine types", "n1-standard-4")
TEXT_ACCELERATORS = {  # GPU -> (machine types with one of it, in words, an example)
    "NVIDIA_TESLA_T4": _ON_N1, "NVIDIA_TESLA_P4": _ON_N1, "NVIDIA_TESLA_P100": _ON_N1,
    "NVIDIA_TESLA_V100": _ON_N1,
    "NVIDIA_L4": (r"g2-standard-(4|8|12|16|32)", "g2-standard machine types of 4 to 32 vCPUs",
                  "g2-standard-8"),
    "NVIDIA_TESLA_A100": (r"a2-highgpu-1g", "a2-highgpu-1g", "a2-highgpu-1g"),
    "NVIDIA_A100_80GB": (r"a2-ultragpu-1g", "a2-ultragpu-1g", "a2-ultragpu-1g"),
    "NVIDIA_H100_80GB": (r"a3-highgpu-1g", "a3-highgpu-1g", "a3-highgpu-1g"),
}
# Machine families that come with their GPUs attached: they cannot run without them.
_GPU_FAMILIES = ("a2", "a3", "a4", "a4x", "g2", "g4")
IMAGE_ACCELERATOR = "NVIDIA_TESLA_T4"  # the image workers' GPU (pipeline.py attaches it)
# Vertex AI persistent resource IDs: lower-case letters, digits and '-', a letter first, not '-'
# last, at most 63 (gcloud ai persistent-resources create --persistent-resource-id); or empty.
PERSISTENT_RESOURCE_ID = r"([a-z]([a-z0-9-]{0,61}[a-z0-9])?)?"
# Vertex AI Experiments names: lower-case letters, digits and hyphens, a letter or digit first;
# at most 64 here (Vertex allows 128), because the experiment and each of its run names share
# 121 characters: the rest is left to the steps' run names (tracking.run_name).
EXPERIMENT_NAME = r"[a-z0-9][a-z0-9-]{0,63}"


def _param(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           above: float | None = None, choices: tuple[str, ...] | None = None,
           pattern: str | None = None, nonempty: bool = False) -> Any:
    """A parameter: its default, its help, and the values it allows (checked by
    :func:`check_value`): ``low``/``high`` inclusive bounds, ``above`` an exclusive lower
    bound, ``choices`` the allowed strings, ``pattern`` a full-match regular expression,
    ``nonempty`` a string that may not be empty."""
    allowed = {k: v for k, v in (("low", low), ("high", high), ("above", above),
                                 ("choices", choices), ("pattern", pattern),
                                 ("nonempty", nonempty or None)) if v is not None}
    return field(default=default, metadata={"help": help, "allowed": allowed})


@dataclass(frozen=True)
class PipelineParams:
    """Run-time parameters of the pipeline (all have defaults; only ``items_uri`` must be given).

    Constructing one checks every value against what its field allows and raises
    :class:`ConfigError` naming the parameter, so a bad value never reaches a step.
    """

    # Items input
    items_uri: str = _param(
        "", "Parquet file or folder of parquet files (local path or gs:// URI).")
    id_column: str = _param("asin", "Column with the unique item id.", nonempty=True)
    title_column: str = _param("title", "Column with the item title.", nonempty=True)
    description_column: str = _param(
        "description", "Column with the description (a string or a list of strings).",
        nonempty=True)
    image_url_column: str = _param("image_url", "Column with the image URL (http/https).",
                                   nonempty=True)
    category_column: str = _param(
        "main_category", "Column with the item category: colours the QA report's 2-D maps "
        "(a table without it gets one-colour maps).", nonempty=True)
    # Fan-out and machines (Vertex; ignored locally but for the shards themselves)
    shards: int = _param(
        1, "Contiguous row ranges the items are cut into; the text and image steps run each "
        "on a worker task, merge steps assemble the same files as one run.", low=1,
        high=MAX_SHARDS)
    max_parallel_shards: int = _param(
        16, "Worker tasks per step (at most this many machines at once); a worker runs several "
        "shards one after another when there are more shards.", low=1, high=MAX_WORKERS)
    text_machine_type: str = _param("e2-standard-4", "Vertex machine type of the text workers "
                                    "(e.g. c3-standard-8: VNNI/AMX for onnx-int8).",
                                    pattern=MACHINE_TYPE)
    text_accelerator: str = _param(
        "", "GPU of the text workers, one per worker, e.g. NVIDIA_TESLA_T4 (needs an n1 "
        "machine type); empty = CPU.", choices=("", *TEXT_ACCELERATORS))
    text_strategy: str = _param("STANDARD", "Vertex scheduling of the text workers: SPOT "
                                "(cheaper, preemptible) or STANDARD.", choices=STRATEGIES)
    image_machine_type: str = _param("n1-standard-4", "Vertex machine type of the image workers "
                                     "(n1: the T4 attaches to n1 machines).", pattern=MACHINE_TYPE)
    fusion_machine_type: str = _param("e2-standard-4", "Vertex machine type of the fusion step "
                                      "(memory: its inputs are memory-mapped).",
                                      pattern=MACHINE_TYPE)
    knn_machine_type: str = _param(
        "e2-standard-4", "Vertex machine type of the kNN-graph step (memory: about 3 copies of "
        "the 384-d text vectors, 5 GB per million items; e.g. e2-highmem-8 at 10M).",
        pattern=MACHINE_TYPE)
    persistent_resource_id: str = _param(
        "", "A Vertex AI persistent resource (its ID, in the run's project and region) whose "
        "warm machines run every job of the pipeline instead of starting one each; its resource "
        "pools must offer the machine types the run asks for; empty = machines on demand.",
        pattern=PERSISTENT_RESOURCE_ID)
    # Text step
    text_model: str = _param(
        DEFAULT_TEXT_MODEL,
        "sentence-transformers model: hub id, local directory or gs:// directory.", nonempty=True)
    text_batch_size: int = _param(128, "Texts per encoder batch.", low=1, high=65536)
    text_backend: str = _param(
        "auto", "Text encoder: 'auto' (exact and fastest: onnx fp32 on CPU, torch fp32 on a "
        "GPU), 'torch' (fp32 sentence-transformers), 'onnx' (fp32), or the approximations "
        "'onnx-int8' and 'torch-fp16' (opt-in; checked against the exact model on a sample "
        "of the items first).", choices=TEXT_BACKENDS)
    # Image step
    image_model: str = _param("ViT-B-32", "open_clip model name.", nonempty=True)
    image_pretrained: str = _param(
        "openai", "open_clip pretrained tag, local checkpoint file, gs:// checkpoint, or 'none'.")
    image_batch_size: int = _param(32, "Images per encoder batch.", low=1, high=4096)
    image_decode: str = _param(
        "fast", "'fast': decode JPEGs at the smallest 1/2, 1/4 or 1/8 scale still at least the "
        "encoder's input size, then resize and crop (about a third of the CPU; cosine >= 0.999 "
        "to exact); 'exact': decode every pixel. Other formats are decoded in full either way; "
        "changing it re-encodes every image of an incremental run.",
        choices=IMAGE_DECODE_MODES)
    max_items: int = _param(150000, "Cap on items whose image is downloaded and encoded "
                                    "(0 = no cap).", low=0)
    download_concurrency: int = _param(
        128, "Image downloads in flight at once (at most 32 to one host).", low=1, high=1024)
    download_timeout_s: float = _param(5.0, "Total time allowed per image download attempt (s).",
                                       above=0, high=600)
    download_retries: int = _param(
        2, "Retries after a timeout, connection error, 5xx or 429 (with backoff).", low=0, high=10)
    max_image_bytes: int = _param(10_000_000, "Largest image body accepted (bytes).", low=1)
    allow_private_hosts: bool = _param(
        False, "Allow image hosts on private/loopback addresses (tests, private CDNs).")
    shard_size: int = _param(10000, "Items per durable image shard (resume unit after "
                                    "preemption).", low=1)
    checkpoint_uri: str = _param(
        "", "Where finished image shards are kept (local or gs://); empty = inside the step "
        "output.")
    image_user_agent: str = _param(
        "", "User-Agent of image downloads; empty = the project's default, which names "
        "item-embeddings and where to read about it (add your contact for third-party hosts).")
    download_rate_per_host: float = _param(
        50.0, "Image requests per second to one host, per image worker (0 = no limit); a host "
        "that answers 429 (or 503 with Retry-After) is paused and slowed further.", low=0,
        high=10000)
    host_failure_limit: int = _param(
        20, "Circuit breaker: after this many consecutive connection errors, timeouts or 5xx "
        "from one host, its remaining images fail at once as host_unavailable (a probe after a "
        "cool-down may reopen it); 0 = off.", low=0, high=100_000)
    respect_opt_out: bool = _param(
        True, "Skip images whose response carries X-Robots-Tag noai or noimageai (reason "
        "opted_out).")
    respect_robots_txt: bool = _param(
        False, "Obey each image host's robots.txt (RFC 9309) for the image User-Agent (reason "
        "robots_disallowed); off by default: a catalogue usually fetches its own CDN.")
    image_strategy: str = _param(
        "SPOT", "Vertex scheduling of the image step's T4 machine: SPOT or STANDARD (ignored "
        "locally).", choices=STRATEGIES)
    # Fusion step
    fusion_hidden_dim: int = _param(256, "Hidden width of the fusion MLP.", low=1, high=65536)
    fusion_output_dim: int = _param(128, "Dimension of the fused embedding.", low=1, high=65536)
    fusion_epochs: int = _param(5, "Training epochs of the fusion MLP.", low=1, high=10000)
    fusion_min_steps: int = _param(
        200, "Fewest optimiser steps of the fusion MLP: a catalogue too small for that many in "
        "fusion_epochs trains more epochs (2,000 items at batch 512: 50 epochs); 0 = exactly "
        "fusion_epochs.", low=0, high=100_000)
    fusion_lr: float = _param(1e-3, "Learning rate of the fusion MLP.", above=0, high=10)
    fusion_batch_size: int = _param(
        512, "Mini-batch size of the fusion MLP (its objective holds a few batch x batch float32 "
        "matrices: 256 MiB each at 8192).", low=2, high=8192)
    seed: int = _param(0, "Random seed (fusion training, kNN samples; deterministic on CPU).",
                       low=0)
    # kNN graphs
    knn_k: int = _param(20, "Nearest neighbours listed per item in the text and fused kNN graphs "
                            "(self excluded, most similar first: the first 15 columns are the "
                            "k=15 graph).", low=1, high=1000)
    knn_exact_max_items: int = _param(
        100_000, "Exact kNN search up to this many items; above it a faiss IVF index whose "
        "recall is measured against exact search (see docs/knn.md).", low=0)
    knn_recall_queries: int = _param(
        1000, "Random items whose kNN lists are checked against exact search every run "
        "(recall@k in knn_meta.json and the experiment run).", low=1, high=100_000)
    # Publishing
    publish_uri: str = _param("", "Stable prefix the final outputs are published to; empty = off.")
    # Incremental runs
    previous_uri: str = _param(
        "", "An earlier output set (folder or gs:// prefix, e.g. the publish prefix) whose "
        "vectors are reused for unchanged items and whose kNN graphs are updated rather than "
        "rebuilt; empty = full run.")
    image_revalidate: bool = _param(
        False, "With previous_uri: ask image hosts whether reused images changed (conditional "
        "GET with the recorded ETag/Last-Modified); off = no request for unchanged URLs.")
    retry_failed_images: bool = _param(
        True, "With previous_uri: download again the images that failed in the previous set.")
    fusion_mode: str = _param(
        "train", "'train' a new fusion model, or 'apply' the previous set's fusion model "
        "(needs previous_uri), so unchanged items keep identical fused vectors.",
        choices=FUSION_MODES)
    # Experiment tracking
    experiment: str = _param("recsys-dev", "Vertex AI Experiments experiment (or local store "
                                           "name).", pattern=EXPERIMENT_NAME)
    tracking_backend: str = _param(
        "auto", "Where step runs are logged: 'vertex', 'local', 'none' or 'auto' "
        "(vertex when a Google Cloud project is known, else local when tracking_dir is set).",
        choices=TRACKING_BACKENDS)
    tracking_dir: str = _param("", "Root of the local experiment store (local runs).")
    log_shard_runs: bool = _param(
        False, "Also log one experiment run per shard of the text and image workers "
        "(<step>-<run>-shard-NNNNN); off: only the steps' runs, whose metrics hold the shard "
        "detail (fanout_shards, shard_wall_time_max_sec).")

    def __post_init__(self) -> None:
        problems = [problem for name in PARAM_FIELDS
                    if (problem := check_value(name, getattr(self, name)))]
        if self.shards > 1 and self.image_pretrained.strip().lower() in ("", "none"):
            problems.append("image_pretrained 'none' draws random weights in every worker: "
                            "their vectors could not be merged; with shards > 1 give a "
                            "pretrained tag or a checkpoint")
        if not self.image_user_agent.isprintable() or not self.image_user_agent.isascii():
            problems.append(f"parameter 'image_user_agent' must be printable ASCII on one line, "
                            f"got {self.image_user_agent!r}")
        if self.fusion_mode == "apply" and not self.previous_uri:
            problems.append("fusion_mode 'apply' needs previous_uri (the set whose fusion "
                            "model is applied)")
        if problems:
            raise ConfigError("; ".join(problems))

    def fusion_batches_per_epoch(self, count: int) -> int:
        """Optimiser steps of one fusion epoch over ``count`` items: batches of
        ``fusion_batch_size``, a last batch of one item joined to the one before (it has no pair).

        >>> PipelineParams().fusion_batches_per_epoch(1025)   # 512 + 513
        2
        >>> PipelineParams().fusion_batches_per_epoch(1026)   # 512 + 512 + 2
        3
        >>> PipelineParams().fusion_batches_per_epoch(120)    # one batch, smaller than the size
        1
        """
        return max(1, count // self.fusion_batch_size + (count % self.fusion_batch_size > 1))

    def fusion_epochs_for(self, count: int) -> int:
        """Epochs the fusion MLP trains on ``count`` items: ``fusion_epochs``, or more where
        these would make fewer than ``fusion_min_steps`` optimiser steps (a small catalogue).

        >>> PipelineParams().fusion_epochs_for(2000)      # 4 steps an epoch: 50 make 200
        50
        >>> PipelineParams().fusion_epochs_for(500_000)   # 977 steps an epoch
        5
        """
        steps = self.fusion_batches_per_epoch(count)
        return max(self.fusion_epochs, -(-self.fusion_min_steps // steps))


PARAM_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(PipelineParams)}


class ConfigError(UsageError):
    """A config file, ``--set`` override or parameter value that cannot be used; the message
    names the parameter and says what is allowed."""


def allowed_values(name: str) -> str:
    """What parameter ``name`` allows, in words ('' when any value of its type)."""
    allowed = PARAM_FIELDS[name].metadata["allowed"]
    words = []
    if "choices" in allowed:
        words.append("one of " + ", ".join(c or "'' (empty)" for c in allowed["choices"]))
    if "pattern" in allowed:
        words.append({EXPERIMENT_NAME: "lower-case letters, digits and '-', starting with a "
                                       "letter or digit, at most 64",
                      MACHINE_TYPE: "a Vertex AI machine type such as e2-standard-4 "
                                    "(family-series-size)",
                      PERSISTENT_RESOURCE_ID: "empty or a persistent resource ID: lower-case "
                                              "letters, digits and '-', a letter first, at "
                                              "most 63"}.get(allowed["pattern"],
                                                                f"matching {allowed['pattern']}"))
    if "nonempty" in allowed:
        words.append("not empty")
    bounds = []
    if "above" in allowed:
        bounds.append(f"> {allowed['above']:g}")
    if "low" in allowed:
        bounds.append(f">= {allowed['low']:g}")
    if "high" in allowed:
        bounds.append(f"<= {allowed['high']:g}")
    if bounds:
        words.append(" and ".join(bounds))
    return "; ".join(words)


def check_value(name: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for parameter ``name`` (a message naming both), or None."""
    allowed = PARAM_FIELDS[name].metadata["allowed"]
    kind = type(PARAM_FIELDS[name].default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        if not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
            return f"parameter {name!r} expects {kind.__name__}, got {value!r}"
    ok = True
    if "choices" in allowed:
        ok = value in allowed["choices"]
    if "pattern" in allowed:
        ok = ok and re.fullmatch(allowed["pattern"], value) is not None
    if "nonempty" in allowed:
        ok = ok and bool(value.strip())
    if "above" in allowed:
        ok = ok and value > allowed["above"]
    if "low" in allowed:
        ok = ok and value >= allowed["low"]
    if "high" in allowed:
        ok = ok and value <= allowed["high"]
    if kind is float and not math.isfinite(value):
        ok = False
    return None if ok else f"parameter {name!r} must be {allowed_values(name)}, got {value!r}"


def machine_problems(params: PipelineParams) -> list[str]:
    """Why the machines a run asks Vertex for cannot be had (one message each, naming the
    parameters), from the pairings Vertex allows: a GPU attaches to its machine families only
    (a T4 to n1), and the GPU machine families (a2, g2, ...) do not run without their GPUs.
    Not part of ``PipelineParams`` itself: a component builds its params from its own inputs,
    the other machine parameters being defaults there."""
    problems = []
    accelerator = params.text_accelerator
    if accelerator:
        pattern, words, example = TEXT_ACCELERATORS[accelerator]
        if not re.fullmatch(pattern, params.text_machine_type):
            problems.append(f"parameter 'text_accelerator' {accelerator} attaches to {words} "
                            f"only, but text_machine_type is {params.text_machine_type!r} (e.g. "
                            f"text_machine_type={example})")
    if not re.fullmatch(_N1, params.image_machine_type):
        problems.append(f"parameter 'image_machine_type' {params.image_machine_type!r} cannot take "
                        f"the image workers' {IMAGE_ACCELERATOR}: it attaches to n1 machine types "
                        "only (e.g. n1-standard-4)")
    cpu_only = [("fusion_machine_type", params.fusion_machine_type),
                ("knn_machine_type", params.knn_machine_type)]
    if not accelerator:
        cpu_only.insert(0, ("text_machine_type", params.text_machine_type))
    for name, machine in cpu_only:
        if machine.split("-")[0] in _GPU_FAMILIES:
            problems.append(f"parameter {name!r} {machine!r} is a GPU machine type, which does "
                            "not run without its GPUs; this step takes a CPU machine type "
                            "(e.g. e2-standard-4)")
    return problems


def check_machines(params: PipelineParams) -> None:
    """Raise :class:`ConfigError` with every :func:`machine_problems`."""
    problems = machine_problems(params)
    if problems:
        raise ConfigError("; ".join(problems))


def param_description(name: str) -> str:
    """The help of parameter ``name`` with what it allows (``--help``, the Vertex AI UI)."""
    allowed = allowed_values(name)
    help_text = PARAM_FIELDS[name].metadata["help"]
    return f"{help_text} Allowed: {allowed}." if allowed else help_text


def param_help() -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) for every parameter — for ``--help`` and docs."""
    return [(f.name, type(f.default).__name__, f.default, param_description(f.name))
            for f in dataclasses.fields(PipelineParams)]
