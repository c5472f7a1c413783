"""What every component shares (as google_cloud_pipeline_components keeps its shared utils):

* :func:`pipeline_inputs`: a component's inputs named like pipeline parameters get their default
  and their description from :class:`~item_embeddings.config.PipelineParams`, so each is stated
  once for the pipeline, the components and the core;
* :func:`pipeline_params`: a component's typed parameters, from its inputs;
* :func:`component_step`: the parameters, the experiment tracker and the run id of a step, its
  output staged off gcsfuse on Vertex, and its ``Metrics`` output;
* :func:`run_worker`: a fan-out worker's shards, run in turn with what is set up once;
* :func:`merge_worker_shards`: the text and image workers' shards merged into the two steps'
  outputs, each reported as its step;
* :func:`as_component`: the KFP component of a function, in the project's image.

A component then reads::

    @pipeline_inputs
    def embed_text(items: Input[Dataset], text_embeddings: Output[Dataset],
                   metrics: Output[Metrics], text_model: str, ..., experiment: str, ...):
        \"\"\"Embeds ... (the summary and the artifacts' Args; the rest is added).\"\"\"
        from item_embeddings.components.shared import component_step
        from item_embeddings.text.step import TEXT_STEP, embed_items_text

        with component_step(locals(), text_embeddings, metrics, "text") as step:
            meta = embed_items_text(items.uri, step.out_dir, step.params, run_id=step.run_id,
                                    tracker=step.tracker)
            step.report(meta, TEXT_STEP, metadata=("count",))
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from item_embeddings.config import PARAM_FIELDS, PipelineParams, param_description
from item_embeddings.fanout import WHOLE_TABLE, ShardPlan, merge_image_shards, merge_text_shards
from item_embeddings.image.step import IMAGE_STEP
from item_embeddings.step import StepKind
from item_embeddings.text.step import TEXT_STEP
from item_embeddings.tracking import ExperimentTracker, NullTracker

# Component inputs that are not pipeline parameters, with their defaults: the pipeline binds
# them to runtime placeholders (project and location of the Vertex run, the pipeline job's name)
# or to what its compile target decides (whether the task's machine has a GPU).
RUNTIME_INPUTS = {
    "project": ("", "Google Cloud project (the pipeline passes the runtime placeholder)."),
    "location": ("", "Google Cloud region (the pipeline passes the runtime placeholder)."),
    "run_id": ("", "Pipeline run id (the pipeline passes the job name placeholder)."),
    "require_gpu": (False, "The task's machine has a GPU: fail if torch cannot use it (set by "
                           "the pipeline)."),
    "worker": (WHOLE_TABLE, "This worker's shards, from the plan task: row ranges of the "
                            "items table (default: the whole table as one shard)."),
    "workers": ([WHOLE_TABLE], "Every text worker's shards: the plan task's output."),
    "image_workers": ([WHOLE_TABLE], "Every image worker's shards: the plan task's output."),
    "previous_set": ({}, "What the first task verified of the previous output set (its files' "
                         "sizes, sha256 and versions): the step checks only that they are "
                         "unchanged."),
    "inputs_fingerprint": ("", "Content hash of the items table and the previous output set "
                               "(from the fingerprint task): part of the cache key, so changed "
                               "contents are recomputed."),
}
TRACKING_INPUTS = ("experiment", "tracking_backend", "tracking_dir", "project", "location")


def pipeline_inputs(fn: Callable) -> Callable:
    """Give ``fn``'s parameter inputs their defaults and docstring entries.

    The artifacts come first (no default); every later parameter is a pipeline parameter (its
    default and help from ``PipelineParams``) or one of :data:`RUNTIME_INPUTS`.
    The function's own docstring holds the summary and the artifacts' ``Args`` entries; KFP
    shows the completed docstring as the component's description in the Vertex AI UI.
    """
    parameters = list(inspect.signature(fn).parameters.values())
    first = next(i for i, p in enumerate(parameters)
                 if p.name in PARAM_FIELDS or p.name in RUNTIME_INPUTS)
    defaults, docs = [], []
    for p in parameters[first:]:
        if p.name in PARAM_FIELDS:
            defaults.append(PARAM_FIELDS[p.name].default)
            docs.append(f"    {p.name}: {param_description(p.name)}")
        elif p.name in RUNTIME_INPUTS:
            default, help_text = RUNTIME_INPUTS[p.name]
            defaults.append(default)
            docs.append(f"    {p.name}: {help_text}")
        else:
            raise TypeError(f"{fn.__name__}: input {p.name!r} is neither an artifact (those come "
                            "first) nor a pipeline parameter nor a runtime input")
    fn.__defaults__ = tuple(defaults)
    # the entries end the Args section: KFP reads no input's help after a Returns section
    args, returns_header, returns = inspect.cleandoc(fn.__doc__ or "Args:").partition(
        "\nReturns:")
    fn.__doc__ = "\n".join([args.rstrip(), *docs, returns_header.strip() + returns]).rstrip() + "\n"
    return fn


def as_component(fn: Callable, base_image: str):
    """``fn`` as a lightweight KFP component in ``base_image`` (the project's image, which
    carries the package: nothing is pip-installed when a task starts)."""
    from kfp import dsl

    return dsl.component(fn, base_image=base_image, install_kfp_package=False)


def pipeline_params(inputs: Mapping[str, Any]) -> PipelineParams:
    """The typed parameters of a component's ``inputs`` (its ``locals()``): those named like a
    pipeline parameter, the others at their defaults."""
    return PipelineParams(**{k: v for k, v in inputs.items() if k in PARAM_FIELDS})


@dataclass
class ComponentStep:
    """A core step as one component runs it."""

    params: PipelineParams
    tracker: ExperimentTracker
    run_id: str                 # the pipeline run, read from the output's path (see tracking)
    out_dir: Path               # where the core step writes (local disk when staged)
    artifact_uri: str           # the output's durable URI (gs:// on Vertex): what runs log
    output: Any                 # the Output[Dataset]
    metrics: Any                # the Output[Metrics]
    prefix: str                 # metric key prefix: Vertex merges all steps' Metrics in one row
    reported: dict[str, Any] = field(default_factory=dict)

    def report(self, meta: Mapping[str, Any], kind: StepKind, *,
               metadata: Sequence[str]) -> None:
        """Copy ``metadata`` keys of the step's meta onto the output artifact, and the step's
        metrics (``kind.metrics``: what its experiment run logged) into the Metrics artifact
        as ``<prefix>_<key>``."""
        from item_embeddings.tracking import write_metrics_artifact

        self.output.metadata.update({k: meta[k] for k in metadata})
        write_metrics_artifact(self.metrics, self.prefix, kind.metrics(meta))


@contextlib.contextmanager
def component_step(inputs: Mapping[str, Any], output, metrics=None, prefix: str = "", *,
                   stage: bool = True) -> Iterator[ComponentStep]:
    """Set up a step from a component's ``inputs`` (its ``locals()``): logging, the typed
    parameters, the tracker and the run id; stage ``output`` off gcsfuse while the step writes
    (the files are copied to the artifact, meta file last, when the block succeeds).

    ``stage=False`` (fan-out workers): ``out_dir`` is the artifact itself, and each shard is
    staged on its own (:func:`shard_output`), so a retried task keeps the finished shards
    (:func:`pending_shards` leaves them out).
    """
    from item_embeddings.incremental import pinned_previous
    from item_embeddings.outputs import META_FILES
    from item_embeddings.progress import setup_logging
    from item_embeddings.storage import staged_output_dir
    from item_embeddings.tracking import make_tracker, run_id_from_output_uri

    setup_logging()
    params = pipeline_params(inputs)
    tracker = (make_tracker(inputs["tracking_backend"], experiment=inputs["experiment"],
                            project=inputs["project"], location=inputs["location"],
                            tracking_dir=inputs["tracking_dir"])
               if "tracking_backend" in inputs else NullTracker())  # a step that logs no run
    # lineage: which contents these outputs come from (a worker has it in its loop item)
    fingerprint = inputs.get("inputs_fingerprint") or dict(inputs.get("worker") or {}).get(
        "inputs_fingerprint")
    if fingerprint:
        output.metadata["inputs_fingerprint"] = fingerprint
        # the previous set the first task resolved the publish prefix to: the whole run reads it
        if params.previous_uri and pinned_previous(fingerprint):
            params = dataclasses.replace(params, previous_uri=pinned_previous(fingerprint))

    def step(out_dir: Path) -> ComponentStep:
        # Same output URI on every retry of the task, so the same run id (and checkpoints).
        return ComponentStep(params=params, tracker=tracker,
                             run_id=run_id_from_output_uri(output.uri), out_dir=out_dir,
                             artifact_uri=output.uri, output=output, metrics=metrics,
                             prefix=prefix)

    if not stage:
        Path(output.path).mkdir(parents=True, exist_ok=True)
        yield step(Path(output.path))
        return
    with staged_output_dir(output.path, META_FILES) as out_dir:
        yield step(out_dir)


def run_worker(step: ComponentStep, worker: Mapping[str, Any], output, meta_name: str,
               run_shard: Callable[..., Any]) -> None:
    """Run a worker's shards that an earlier attempt did not place, one after another, each
    staged and placed as ``<output>/shard-NNNNN``: ``run_shard(shard, out_dir, setup=...,
    tracker=..., run_id=..., artifact_uri=...)``. One :class:`~item_embeddings.worker.WorkerSetup`
    serves every shard (the encoder loaded and the previous set opened once, checked against
    what the first task verified). A shard logs an experiment run of its own only with
    ``log_shard_runs``; otherwise its detail reaches the step's run through the merge."""
    from item_embeddings.fanout import worker_shards
    from item_embeddings.incremental import VerifiedSet
    from item_embeddings.worker import WorkerSetup

    tracker = step.tracker if step.params.log_shard_runs else NullTracker()
    with WorkerSetup(VerifiedSet.from_dict(worker.get("previous"))) as setup:
        for shard in pending_shards(output, worker_shards(worker), meta_name):
            with shard_output(output, shard) as out_dir:
                run_shard(shard, out_dir, setup=setup, tracker=tracker,
                          run_id=f"{step.run_id}-{shard.dirname}",
                          artifact_uri=f"{output.uri}/{shard.dirname}")


def merge_worker_shards(text: ComponentStep, text_shards: Sequence, workers: Sequence,
                        image: ComponentStep, image_shards: Sequence,
                        image_workers: Sequence) -> None:
    """Merge the text and image workers' outputs (``*_shards``, as their loops collected them)
    into the ``text`` and ``image`` steps' outputs, checked against the plan's ``workers`` and
    ``image_workers``, and report each as its step (its meta on the artifact, its metrics)."""
    for merged, merge, shards, plan, kind, metadata in (
            (text, merge_text_shards, text_shards, workers, TEXT_STEP,
             ("count", "embed_dim", "encoder_name", "text_backend")),
            (image, merge_image_shards, image_shards, image_workers, IMAGE_STEP,
             ("count", "embed_dim", "encoder_name"))):
        meta = merge([p.path for p in shards], ShardPlan.from_workers(plan), merged.out_dir,
                     merged.params, run_id=merged.run_id, tracker=merged.tracker,
                     artifact_uri=merged.artifact_uri)
        merged.report(meta, kind, metadata=metadata)


def pending_shards(output, shards: Iterable, meta_name: str) -> Iterator:
    """The ``shards`` a worker still has to run: those an earlier attempt of this task has not
    placed whole in ``output`` (a placed shard's meta file names the same rows)."""
    import json
    import logging

    for shard in shards:
        placed = Path(output.path) / shard.dirname / meta_name
        if placed.is_file() and json.loads(placed.read_text()).get("rows") == (
                list(shard.rows) if shard.rows else None):
            logging.getLogger(__name__).info("%s was placed by an earlier attempt: skipped",
                                             shard.dirname)
            continue
        yield shard


@contextlib.contextmanager
def shard_output(output, shard) -> Iterator[Path]:
    """Where a worker writes one shard: a folder staged off gcsfuse and placed (meta last) into
    ``<output>/shard-NNNNN`` when the block succeeds."""
    from item_embeddings.outputs import META_FILES
    from item_embeddings.storage import staged_output_dir

    with staged_output_dir(Path(output.path) / shard.dirname, META_FILES) as out_dir:
        yield out_dir
