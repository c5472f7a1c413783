"""The item-embeddings pipeline.

    items ─ fingerprint and plan ─┬─ text workers (on Vertex: a CPU or a GPU job) ──┐
                                  └─ ParallelFor(image workers): image shards ───┴─ fusion
                                      (merges the shards first) ─ kNN graphs ─ QA report
                                      (publishes when publish_uri is set)

Five tasks in a row, one per role; no task only moves files (the merges run in the fusion
task, publishing in the report task), so a run starts as few machines one after another as
its roles need.

Its parameters are generated from :class:`item_embeddings.config.PipelineParams`, so every knob
(with its default and description) is a pipeline parameter that a Vertex AI UI rerun can change.
Every component input named like a pipeline parameter is bound to it by name (:func:`_bind`);
only artifacts and run-time inputs are passed by hand.
Two compile targets share one DAG:

* ``vertex``: experiment runs go to Vertex AI Experiments (project/location from the runtime
  placeholders). Every task runs as a Vertex custom job: the text and image workers, fusion and
  the kNN graphs on machines (``text_machine_type``, ``text_accelerator``,
  ``image_machine_type``, ``fusion_machine_type``, ``knn_machine_type``) and scheduling
  (``text_strategy``, ``image_strategy``: SPOT/STANDARD) that are pipeline parameters, the first
  task and the report on an e2-standard-4; all of them on the persistent resource
  ``persistent_resource_id`` when one is given (warm machines instead of one started per task);
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
from item_embeddings.components.qa_report import make_component as make_qa_report
from item_embeddings.config import PARAM_FIELDS, param_description
from item_embeddings.errors import UsageError

PIPELINE_NAME = "item-embeddings"
TARGETS = ("vertex", "local")
PROJECT_PLACEHOLDER = "{{$.pipeline_google_cloud_project_id}}"
LOCATION_PLACEHOLDER = "{{$.pipeline_google_cloud_location}}"

# Vertex resources. The machines of the workers, fusion and kNN are pipeline parameters; the
# first task and the report take this one (4 vCPU, 16 GB).
SMALL_MACHINE = "e2-standard-4"
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


def _custom_job(component) -> _Job:
    """``component`` as a Vertex custom job (GCPC's wrapper), named after the component.

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
        component, timeout=JOB_TIMEOUT,
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
# The worker task of each kind of shards, as the run's graph names it (on Vertex and locally).
WORKER_TASKS = {"text_shards": "Embed text", "image_shards": "Embed images"}


def _text_job_machine(job: _Job, p: Mapping[str, Any], *, gpu: bool) -> dict:
    """The text job's scheduling and machine, from pipeline parameters: on a GPU, one of
    ``text_accelerator``; else none (a CPU machine)."""
    on_gpu = dict(accelerator_type=p["text_accelerator"], accelerator_count=1) if gpu else {}
    return dict(strategy=p["text_strategy"], worker_pool_specs=_worker_pool_specs(
        job, machine_type=p["text_machine_type"], **on_gpu))


def _workers_pipeline(component, name: str, output: str, runtime: dict,
                      job: _Job | None = None, *, gpu: bool = False):
    """Workers as a pipeline of their own: one ``component`` task per item of its ``workers``
    input, their ``output`` returned collected. A pipeline because ``dsl.OneOf`` (which joins
    the CPU and GPU text branches) takes a task's output, never a ``dsl.Collected``, and
    kfp.local iterates over a pipeline's input but not over one of a task's several named
    outputs. On Vertex (``job``: the text workers) each task is that custom job, with its
    machine from the parameters."""
    names = [n for n in PARAM_FIELDS if n in component.component_spec.inputs
             or (job is not None and n in TEXT_JOB_PARAMS)]
    loop_name = name.removesuffix("_gpu").replace("_", "-")

    def workers_loop(items, workers, **p) -> List[dsl.Dataset]:  # noqa: UP006
        machine = {} if job is None else _text_job_machine(job, p, gpu=gpu)
        with dsl.ParallelFor(workers, name=loop_name) as worker:
            task = _bind(component, p, items=items, worker=worker, **machine, **runtime
                         ).set_display_name(WORKER_TASKS[output])
            if job is not None:
                _worker_retries(task)
        return dsl.Collected(task.outputs[output])

    workers_loop.__name__ = name
    # (a nested pipeline's description is not compiled into the template: its inputs' are)
    summary = "Workers: one per item of the plan."
    artifacts = {"items": (dsl.Input[dsl.Dataset], "The items table, from the importer."),
                 "workers": (list, "The plan's workers (each its shards).")}
    return dsl.pipeline(name=name.replace("_", "-"))(
        _with_param_signature(workers_loop, summary, names, artifacts))


@dataclasses.dataclass
class _Steps:
    """The components of one compile target (each wrapped as a custom job on Vertex)."""

    fingerprint: Any
    text_workers: Any  # the text workers' pipeline (on Vertex: their CPU jobs)
    embed_images: Any  # on Vertex the image worker's job; locally the image workers' pipeline
    fuse: Any
    knn: Any
    report: Any
    jobs: dict[str, _Job]  # Vertex only: the custom jobs and their worker pools
    text_workers_gpu: Any = None  # Vertex only: the text workers' GPU jobs

    @classmethod
    def make(cls, on_vertex: bool, image: str, gpu_image: str) -> "_Steps":
        made = dict(fingerprint=make_fingerprint(image), embed_text=make_embed_text(image),
                    embed_images=make_embed_images(gpu_image if on_vertex else image),
                    fuse=make_fuse_embeddings(image), knn=make_knn_graphs(image),
                    report=make_qa_report(image))
        runtime = _runtime_inputs(on_vertex)
        if not on_vertex:  # kfp.local runs every step as a plain task, in one image
            return cls(
                fingerprint=made["fingerprint"], fuse=made["fuse"], knn=made["knn"],
                report=made["report"], jobs={},
                text_workers=_workers_pipeline(made["embed_text"], "text_workers", "text_shards",
                                               runtime),
                embed_images=_workers_pipeline(made["embed_images"], "image_workers",
                                               "image_shards", dict(runtime, require_gpu=False)))
        made["embed_text_gpu"] = make_embed_text(gpu_image)
        jobs = {key: _custom_job(component) for key, component in made.items()}
        text = {f"text_workers{suffix}": _workers_pipeline(
            jobs[key].op, f"text_workers{suffix}", "text_shards", runtime, jobs[key],
            gpu=bool(suffix)) for key, suffix in (("embed_text", ""), ("embed_text_gpu", "_gpu"))}
        return cls(**{key: jobs[key].op for key in ("fingerprint", "embed_images", "fuse", "knn",
                                                    "report")}, **text, jobs=jobs)


def _text_workers(steps: _Steps, p: Mapping[str, Any], items, plan):
    """The text workers' shards, collected. On Vertex their job is chosen at compile time, each
    with a constant image and GPU count: the CPU job when ``text_accelerator`` is empty, else
    the GPU job; fusion (which merges the shards) takes the branch that ran
    (``dsl.OneOf``). kfp.local cannot select
    an artifact from branches: it runs the one plain loop (its machine parameters are ignored,
    and the worker itself uses the local GPU when ``text_accelerator`` is set)."""
    if steps.text_workers_gpu is None:
        return _bind(steps.text_workers, p, items=items, workers=plan.outputs["workers"]
                     ).set_display_name("Text workers").output
    with dsl.If(p["text_accelerator"] == "", name="text-on-cpu"):
        cpu = _bind(steps.text_workers, p, items=items, workers=plan.outputs["workers"]
                    ).set_display_name("Text workers (CPU)")
    with dsl.Else(name="text-on-gpu"):
        gpu = _bind(steps.text_workers_gpu, p, items=items, workers=plan.outputs["workers"]
                    ).set_display_name("Text workers (GPU)")
    return dsl.OneOf(cpu.output, gpu.output)


def _image_workers(steps: _Steps, p: Mapping[str, Any], items, plan, runtime: dict, *,
                   on_vertex: bool):
    """An image worker per item of the plan's ``image_workers`` (only the workers with images
    to embed: no T4 starts for nothing; on Vertex a T4 job, Spot by default). Their cache keys
    hold the inputs' fingerprint through the loop item. Returns (the loop's task, None
    locally; the shards collected)."""
    if not on_vertex:  # kfp.local: the loop in a pipeline of its own (see _workers_pipeline)
        loop = _bind(steps.embed_images, p, items=items, workers=plan.outputs["image_workers"]
                     ).set_display_name("Image workers")
        return None, loop.output
    machine = dict(strategy=p["image_strategy"], worker_pool_specs=_worker_pool_specs(
        steps.jobs["embed_images"], machine_type=p["image_machine_type"],
        accelerator_type=IMAGE_ACCELERATOR, accelerator_count=1))
    with dsl.ParallelFor(plan.outputs["image_workers"], name="image-workers") as worker:
        images = _bind(steps.embed_images, p, items=items, worker=worker, require_gpu=True,
                       **machine, **runtime).set_display_name(WORKER_TASKS["image_shards"])
    return images, dsl.Collected(images.outputs["image_shards"])


def _machine(steps: _Steps, key: str, p: Mapping[str, Any], parameter: str | None = None
             ) -> dict:
    """A CPU custom job's machine: a pipeline parameter's, or the small machine (Vertex;
    nothing locally)."""
    if key not in steps.jobs:
        return {}
    machine = p[parameter] if parameter else SMALL_MACHINE
    return dict(worker_pool_specs=_worker_pool_specs(steps.jobs[key], machine_type=machine))


def _worker_retries(task) -> None:
    """A worker's retries on Vertex (Spot preemptions): a retried worker resumes from its
    finished shards."""
    task.set_retry(WORKER_RETRIES, backoff_duration="60s")


def _vertex_policies(workers: Sequence, steps: Sequence) -> None:
    """Retries: Spot preemptions of the workers, transient failures of the steps."""
    for task in workers:
        _worker_retries(task)
    for task in steps:
        task.set_retry(STEP_RETRIES)


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
        plan = _bind(steps.fingerprint, p, items=items, **_machine(steps, "fingerprint", p)
                     ).set_display_name("Fingerprint and plan")
        plan.set_caching_options(False)  # it is what tells changed contents apart
        text_shards = _text_workers(steps, p, items, plan)
        images, image_shards = _image_workers(steps, p, items, plan, runtime,
                                              on_vertex=on_vertex)
        fingerprint = plan.outputs["fingerprint"]
        fused = _bind(steps.fuse, p, text_shards=text_shards, image_shards=image_shards,
                      workers=plan.outputs["workers"], image_workers=plan.outputs["image_workers"],
                      previous_set=plan.outputs["previous_set"], inputs_fingerprint=fingerprint,
                      **_machine(steps, "fuse", p, "fusion_machine_type"), **runtime
                      ).set_display_name("Fuse embeddings")
        text_out = fused.outputs["text_embeddings"]
        image_out = fused.outputs["image_embeddings"]
        fused_out = fused.outputs["fused_embeddings"]
        knn = _bind(steps.knn, p, text_embeddings=text_out, fused_embeddings=fused_out,
                    inputs_fingerprint=fingerprint,
                    **_machine(steps, "knn", p, "knn_machine_type"), **runtime
                    ).set_display_name("kNN graphs")
        report = _bind(steps.report, p, items=items, text_embeddings=text_out,
                       image_embeddings=image_out, fused_embeddings=fused_out,
                       knn_graphs=knn.outputs["graphs"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                       **_machine(steps, "report", p)).set_display_name("QA report")
        report.set_caching_options(False)  # it publishes: a side effect, not a result to reuse
        if on_vertex:  # locally a failure is a bug to see at once, not a preemption to retry
            _vertex_policies(workers=(images,), steps=(plan, fused, knn, report))
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
