"""The item-embeddings pipeline.

    items ─ fingerprint ─ plan ─┬─ text workers (on Vertex: a CPU or a GPU job) ─ merge text ─┐
                                └─ image workers ──────────────────────────── merge images ─┤
                        ┌───────────────────────────────────────────────────────────────────┘
                        └─ fusion ─ kNN graphs ─ QA report ─ publish (optional)

Its parameters are generated from :class:`item_embeddings.config.PipelineParams`, so every knob
(with its default and description) is a pipeline parameter that a Vertex AI UI rerun can change.
Every component input named like a pipeline parameter is bound to it by name (:func:`_bind`);
only artifacts and run-time inputs are passed by hand.
Two compile targets share one DAG:

* ``vertex``: experiment runs go to Vertex AI Experiments (project/location from the runtime
  placeholders). The text and image workers, fusion and the kNN graphs run as Vertex custom jobs
  whose machine (``text_machine_type``, ``text_accelerator``, ``image_machine_type``,
  ``fusion_machine_type``, ``knn_machine_type``) and scheduling (``text_strategy``,
  ``image_strategy``: SPOT/STANDARD) are pipeline parameters;
  they run as the pipeline's own service account, in its network, with its CMEK key (runtime
  placeholders). The image workers run on a T4 in ``gpu_image`` and fail if the GPU is not
  usable; the other steps run in the slim ``image``. The text workers' job is chosen at compile
  time, each with a constant image and GPU count (:func:`_text_workers`): a CPU job in ``image``
  when ``text_accelerator`` is empty, else a one-GPU job in ``gpu_image``.
* ``local``: for ``kfp.local``, which cannot run the custom-job wrapper: every step is a plain
  task on this machine (the machine parameters are ignored); experiment runs go to the local
  store.

Caching: the steps that read the items or the previous set take the inputs' content
fingerprint as an input (the fingerprint task itself is never cached), so a cached result is
only reused for the same contents, on submit, schedules and UI reruns alike.
"""

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, List, NamedTuple  # noqa: UP035 (KFP reads typing.List[Dataset])

from kfp import compiler, dsl

from item_embeddings.components import DEFAULT_IMAGE
from item_embeddings.components.embed_images import make_component as make_embed_images
from item_embeddings.components.embed_text import make_component as make_embed_text
from item_embeddings.components.fingerprint_inputs import make_component as make_fingerprint
from item_embeddings.components.fuse_embeddings import make_component as make_fuse_embeddings
from item_embeddings.components.knn_graphs import make_component as make_knn_graphs
from item_embeddings.components.merge_images import make_component as make_merge_images
from item_embeddings.components.merge_text import make_component as make_merge_text
from item_embeddings.components.plan_shards import make_component as make_plan_shards
from item_embeddings.components.publish_outputs import make_component as make_publish_outputs
from item_embeddings.components.qa_report import make_component as make_qa_report
from item_embeddings.config import PARAM_FIELDS, param_description
from item_embeddings.errors import UsageError

PIPELINE_NAME = "item-embeddings"
TARGETS = ("vertex", "local")
PROJECT_PLACEHOLDER = "{{$.pipeline_google_cloud_project_id}}"
LOCATION_PLACEHOLDER = "{{$.pipeline_google_cloud_location}}"

# Vertex resources. The machines of the custom jobs are pipeline parameters; these are the
# plain tasks' (fingerprint, plan, merges, report, publish) and the jobs' fixed parts.
CPU_STEP_CPU, CPU_STEP_MEMORY = "4", "15G"
IMAGE_ACCELERATOR = "NVIDIA_TESLA_T4"
JOB_TIMEOUT = "86400s"
STEP_RETRIES = 2
WORKER_RETRIES = 5  # Spot preemptions; a retried worker resumes from its finished shards


class Outputs(NamedTuple):
    text_embeddings: dsl.Dataset
    image_embeddings: dsl.Dataset
    fused_embeddings: dsl.Dataset
    knn_graphs: dsl.Dataset
    report: dsl.Dataset


PIPELINE_SUMMARY = ("Multimodal item embeddings: text, image and fused vectors for every item, "
                    "their kNN graphs and a QA report.")


def _with_param_signature(fn: Callable, summary: str = PIPELINE_SUMMARY,
                          names: Sequence[str] = tuple(PARAM_FIELDS),
                          artifacts: Mapping[str, tuple[Any, str]] | None = None) -> Callable:
    """Give ``fn(*artifacts, **params)`` one typed parameter per name of ``names`` (fields of
    PipelineParams, with their defaults and help), after its ``artifacts`` (name -> annotation,
    help), and a docstring KFP shows as the pipeline's description."""
    artifacts = artifacts or {}
    fields = [PARAM_FIELDS[name] for name in names]
    returns = inspect.signature(fn).return_annotation
    positional = [*artifacts, *names]

    def with_params(*args, **kwargs):  # KFP passes the parameters positionally
        return fn(**dict(zip(positional, args)), **kwargs)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind, annotation=annotation)
                  for name, (annotation, _) in artifacts.items()]
    parameters += [inspect.Parameter(f.name, kind, default=f.default, annotation=type(f.default))
                   for f in fields]
    with_params.__signature__ = inspect.Signature(parameters, return_annotation=returns)
    with_params.__annotations__ = {q.name: q.annotation for q in parameters} | {"return": returns}
    with_params.__name__ = fn.__name__
    with_params.__doc__ = "\n".join(
        [summary, "", "Args:"] + [f"    {name}: {doc}" for name, (_, doc) in artifacts.items()]
        + [f"    {name}: {param_description(name)}" for name in names])
    return with_params


class _Job(NamedTuple):
    """A component wrapped as a Vertex custom job, and its worker pool spec to fill."""

    op: Any
    pool: dict


def _custom_job(component, display_name: str) -> _Job:
    """``component`` as a Vertex custom job (GCPC's wrapper).

    The wrapper would run the job as the Vertex custom-code service agent, outside the user's
    VPC and without CMEK; the runtime placeholders give it the pipeline job's own service
    account, network and encryption key instead (empty when the job has none). The run's
    labels reach the job too: Vertex propagates pipeline run labels to its CustomJobs. The
    machine is filled in per task (:func:`_worker_pool_specs`) from pipeline parameters.
    """
    from google_cloud_pipeline_components import _placeholders
    from google_cloud_pipeline_components.v1.custom_job import (
        create_custom_training_job_from_component,
    )

    op = create_custom_training_job_from_component(
        component, display_name=display_name, timeout=JOB_TIMEOUT,
        service_account=_placeholders.SERVICE_ACCOUNT_PLACEHOLDER,
        network=_placeholders.NETWORK_PLACEHOLDER,
        encryption_spec_key_name=_placeholders.ENCRYPTION_SPEC_KMS_KEY_NAME_PLACEHOLDER)
    (pool,) = op.component_spec.inputs["worker_pool_specs"].default
    return _Job(op, pool)


def _worker_pool_specs(job: _Job, *, machine_type, accelerator_type="",
                       accelerator_count: int = 0) -> list[dict]:
    """The job's worker pool with its machine bound to pipeline values at run time; its image
    stays the component's own and its GPU count a constant (only ``machine_spec`` placeholders
    are a path Vertex documents and exercises, kubeflow/pipelines#10883).

    GCPC's launcher drops empty fields, so an empty accelerator type with a count of 0 is a CPU
    machine."""
    pool = copy.deepcopy(job.pool)
    pool["machine_spec"] = {"machine_type": machine_type, "accelerator_type": accelerator_type,
                            "accelerator_count": accelerator_count}
    return [pool]


def _bind(component, p: Mapping[str, Any], **explicit):
    """A task of ``component``: every input named like a pipeline parameter is bound to that
    parameter, so none can silently keep its default; ``explicit`` gives the rest (artifacts,
    run-time inputs, a job's machine), never a pipeline parameter."""
    inputs = component.component_spec.inputs or {}
    restated = sorted(name for name in explicit if name in p)
    if restated:
        raise TypeError(f"{component.name}: pipeline parameters are bound by name, not passed: "
                        f"{restated}")
    return component(**{name: p[name] for name in inputs if name in p}, **explicit)


def _runtime_inputs(on_vertex: bool) -> dict:
    """The run-time inputs of the steps that log experiment runs (Vertex's placeholders)."""
    return dict(project=PROJECT_PLACEHOLDER if on_vertex else "",
                location=LOCATION_PLACEHOLDER if on_vertex else "")


# The text workers' machine inputs (Vertex) besides text_accelerator, which embed-text reads too.
TEXT_JOB_PARAMS = ("text_machine_type", "text_strategy")


def _text_job_machine(job: _Job, p: Mapping[str, Any], *, gpu: bool) -> dict:
    """The text job's scheduling and machine, from pipeline parameters: on a GPU, one of
    ``text_accelerator``; else none (a CPU machine)."""
    on_gpu = dict(accelerator_type=p["text_accelerator"], accelerator_count=1) if gpu else {}
    return dict(strategy=p["text_strategy"], worker_pool_specs=_worker_pool_specs(
        job, machine_type=p["text_machine_type"], **on_gpu))


def _text_workers_pipeline(component, name: str, runtime: dict, job: _Job | None = None, *,
                           gpu: bool = False):
    """The text workers as a pipeline of their own: one ``component`` task per item of the
    plan, their shards returned collected. A pipeline because ``dsl.OneOf`` (which joins the
    CPU and GPU branches) takes a task's output, never a ``dsl.Collected``. On Vertex
    (``job``) each task is that custom job, with its machine from the parameters."""
    names = [n for n in PARAM_FIELDS if n in component.component_spec.inputs
             or (job is not None and n in TEXT_JOB_PARAMS)]

    def text_workers(items, workers, **p) -> List[dsl.Dataset]:  # noqa: UP006
        machine = {} if job is None else _text_job_machine(job, p, gpu=gpu)
        with dsl.ParallelFor(workers, name="text-workers") as worker:
            task = _bind(component, p, items=items, worker=worker, **machine, **runtime
                         ).set_display_name("Embed text")
            if job is not None:
                _worker_retries(task)
        return dsl.Collected(task.outputs["text_shards"])

    text_workers.__name__ = name
    where = ("on one GPU each, in the GPU image" if gpu else "on CPU machines") if job else ""
    summary = f"The text workers{' ' + where if where else ''}: one per item of the plan."
    artifacts = {"items": (dsl.Input[dsl.Dataset], "The items table, from the importer."),
                 "workers": (list, "The plan's workers (each its shards).")}
    return dsl.pipeline(name=name.replace("_", "-"))(
        _with_param_signature(text_workers, summary, names, artifacts))


@dataclasses.dataclass
class _Steps:
    """The components of one compile target (the jobs wrapped as custom jobs on Vertex)."""

    fingerprint: Any
    plan: Any
    merge_text: Any
    merge_images: Any
    report: Any
    publish: Any
    text_workers: Any  # the text workers' pipeline (on Vertex: their CPU jobs)
    embed_images: Any
    fuse: Any
    knn: Any
    jobs: dict[str, _Job]  # Vertex only: the custom jobs and their worker pools
    text_workers_gpu: Any = None  # Vertex only: the text workers' GPU jobs

    @classmethod
    def make(cls, on_vertex: bool, image: str, gpu_image: str) -> "_Steps":
        plain = dict(fingerprint=make_fingerprint(image), plan=make_plan_shards(image),
                     merge_text=make_merge_text(image), merge_images=make_merge_images(image),
                     report=make_qa_report(image), publish=make_publish_outputs(image))
        runtime = _runtime_inputs(on_vertex)
        if not on_vertex:  # kfp.local runs every step as a plain task, in one image
            return cls(**plain, text_workers=_text_workers_pipeline(
                make_embed_text(image), "text_workers", runtime),
                embed_images=make_embed_images(image), fuse=make_fuse_embeddings(image),
                knn=make_knn_graphs(image), jobs={})
        jobs = {"embed_text": _custom_job(make_embed_text(image), "embed-text"),
                "embed_text_gpu": _custom_job(make_embed_text(gpu_image), "embed-text"),
                "embed_images": _custom_job(make_embed_images(gpu_image), "embed-images"),
                "fuse": _custom_job(make_fuse_embeddings(image), "fuse-embeddings"),
                "knn": _custom_job(make_knn_graphs(image), "knn-graphs")}
        text = {f"text_workers{suffix}": _text_workers_pipeline(
            jobs[key].op, f"text_workers{suffix}", runtime, jobs[key], gpu=bool(suffix))
            for key, suffix in (("embed_text", ""), ("embed_text_gpu", "_gpu"))}
        return cls(**plain, **text, embed_images=jobs["embed_images"].op,
                   fuse=jobs["fuse"].op, knn=jobs["knn"].op, jobs=jobs)


def _text_workers(steps: _Steps, p: Mapping[str, Any], items, plan):
    """The text workers' shards, collected. On Vertex their job is chosen at compile time, each
    with a constant image and GPU count: the CPU job when ``text_accelerator`` is empty, else
    the GPU job; the merge takes the branch that ran (``dsl.OneOf``). kfp.local cannot select
    an artifact from branches: it runs the one plain loop (its machine parameters are ignored,
    and the worker itself uses the local GPU when ``text_accelerator`` is set)."""
    if steps.text_workers_gpu is None:
        return _bind(steps.text_workers, p, items=items, workers=plan.output
                     ).set_display_name("Text workers").output
    with dsl.If(p["text_accelerator"] == "", name="text-on-cpu"):
        cpu = _bind(steps.text_workers, p, items=items, workers=plan.output
                    ).set_display_name("Text workers (CPU)")
    with dsl.Else(name="text-on-gpu"):
        gpu = _bind(steps.text_workers_gpu, p, items=items, workers=plan.output
                    ).set_display_name("Text workers (GPU)")
    return dsl.OneOf(cpu.output, gpu.output)


def _image_workers(steps: _Steps, p: Mapping[str, Any], items, plan, runtime: dict, *,
                   on_vertex: bool):
    """The loop over the plan's workers: one image worker task per loop item (on Vertex a T4
    job, Spot by default). Their cache keys hold the inputs' fingerprint through the loop item
    (see the plan)."""
    machine = {} if not on_vertex else dict(
        strategy=p["image_strategy"], worker_pool_specs=_worker_pool_specs(
            steps.jobs["embed_images"], machine_type=p["image_machine_type"],
            accelerator_type=IMAGE_ACCELERATOR, accelerator_count=1))
    with dsl.ParallelFor(plan.output, name="image-workers") as worker:
        images = _bind(steps.embed_images, p, items=items, worker=worker, require_gpu=on_vertex,
                       **machine, **runtime).set_display_name("Embed images")
    return images


def _machine(steps: _Steps, key: str, p: Mapping[str, Any], parameter: str) -> dict:
    """A CPU custom job's machine, from a pipeline parameter (Vertex; nothing locally)."""
    if key not in steps.jobs:
        return {}
    return dict(worker_pool_specs=_worker_pool_specs(steps.jobs[key], machine_type=p[parameter]))


def _worker_retries(task) -> None:
    """A worker's retries on Vertex (Spot preemptions): a retried worker resumes from its
    finished shards."""
    task.set_retry(WORKER_RETRIES, backoff_duration="60s")


def _vertex_policies(workers: Sequence, steps: Sequence, plain: Sequence) -> None:
    """Retries (Spot preemptions of the workers, transient failures of the steps) and the
    plain tasks' resources (the custom jobs have a machine of their own)."""
    for task in workers:
        _worker_retries(task)
    for task in steps:
        task.set_retry(STEP_RETRIES)
    for task in plain:
        task.set_cpu_limit(CPU_STEP_CPU).set_memory_limit(CPU_STEP_MEMORY)


def build_pipeline(target: str = "vertex", image: str = DEFAULT_IMAGE,
                   gpu_image: str | None = None, pipeline_root: str | None = None):
    """The pipeline function for ``target`` ('vertex' or 'local').

    Args:
        target: Where the template runs.
        image: The slim CPU image of the CPU steps.
        gpu_image: The CUDA image of the image workers (and of text workers given a
            ``text_accelerator``) on Vertex (default: ``image``).
        pipeline_root: Default ``gs://`` root of the run's artifacts (the UI needs one).
    """
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    on_vertex = target == "vertex"
    gpu_image = gpu_image or image
    steps = _Steps.make(on_vertex, image, gpu_image)
    runtime = _runtime_inputs(on_vertex)

    def item_embeddings(**p) -> Outputs:
        items = dsl.importer(artifact_uri=p["items_uri"], artifact_class=dsl.Dataset,
                             reimport=False).set_display_name("Items").output
        fingerprint = _bind(steps.fingerprint, p, items=items
                            ).set_display_name("Fingerprint inputs")
        fingerprint.set_caching_options(False)  # it is what tells changed contents apart
        plan = _bind(steps.plan, p, items=items, inputs_fingerprint=fingerprint.output
                     ).set_display_name("Plan shards")
        text_shards = _text_workers(steps, p, items, plan)
        images = _image_workers(steps, p, items, plan, runtime, on_vertex=on_vertex)
        merged_text = _bind(steps.merge_text, p, workers=plan.output, **runtime,
                            text_shards=text_shards).set_display_name("Merge text")
        merged_images = _bind(steps.merge_images, p, workers=plan.output, **runtime,
                              image_shards=dsl.Collected(images.outputs["image_shards"])
                              ).set_display_name("Merge images")
        text_out = merged_text.outputs["text_embeddings"]
        image_out = merged_images.outputs["image_embeddings"]
        fused = _bind(steps.fuse, p, text_embeddings=text_out, image_embeddings=image_out,
                      inputs_fingerprint=fingerprint.output,
                      **_machine(steps, "fuse", p, "fusion_machine_type"), **runtime
                      ).set_display_name("Fuse embeddings")
        fused_out = fused.outputs["fused_embeddings"]
        knn = _bind(steps.knn, p, text_embeddings=text_out, fused_embeddings=fused_out,
                    inputs_fingerprint=fingerprint.output,
                    **_machine(steps, "knn", p, "knn_machine_type"), **runtime
                    ).set_display_name("kNN graphs")
        report = _bind(steps.report, p, items=items, text_embeddings=text_out,
                       image_embeddings=image_out, fused_embeddings=fused_out,
                       knn_graphs=knn.outputs["graphs"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER
                       ).set_display_name("QA report")
        if on_vertex:  # locally a failure is a bug to see at once, not a preemption to retry
            _vertex_policies(workers=(images,),
                             steps=(plan, merged_text, merged_images, fused, knn, report),
                             plain=(plan, merged_text, merged_images, report))
        with dsl.If(p["publish_uri"] != "", name="publish-enabled"):
            _bind(steps.publish, p, text_embeddings=text_out, image_embeddings=image_out,
                  fused_embeddings=fused_out, knn_graphs=knn.outputs["graphs"],
                  report=report.outputs["report"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                  ).set_display_name("Publish outputs").set_caching_options(False)
        return Outputs(text_out, image_out, fused_out, knn.outputs["graphs"],
                       report.outputs["report"])

    return dsl.pipeline(name=PIPELINE_NAME, pipeline_root=pipeline_root)(
        _with_param_signature(item_embeddings))


def compile_pipeline(output: "str | Path", target: str = "vertex", image: str = DEFAULT_IMAGE,
                     gpu_image: str | None = None, pipeline_root: str | None = None) -> Path:
    """Compile the pipeline to a YAML template at ``output`` (arguments as
    :func:`build_pipeline`)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(target, image, gpu_image, pipeline_root),
                                package_path=str(output))
    return output
