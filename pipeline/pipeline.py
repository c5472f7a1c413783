"""The item-embeddings pipeline.

    items ─ fingerprint and plan ─┬─ ParallelFor(text workers): text shards ──┐
                                  └─ ParallelFor(image workers): image shards ─┴─ fusion
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
  usable; the other steps run in the slim ``image``.
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
from typing import Any, NamedTuple

from kfp import compiler, dsl

from item_embeddings.components import DEFAULT_IMAGE
from item_embeddings.components.embed_images import make_component as make_embed_images
from item_embeddings.components.embed_text import make_component as make_embed_text
from item_embeddings.components.fingerprint_inputs import make_component as make_fingerprint
from item_embeddings.components.fuse_embeddings import make_component as make_fuse_embeddings
from item_embeddings.components.knn_graphs import make_component as make_knn_graphs
from item_embeddings.components.qa_report import make_component as make_qa_report
from item_embeddings.components.text_machine import make_component as make_text_machine
from item_embeddings.config import PipelineParams, param_description
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


def _docstring() -> str:
    lines = ["Multimodal item embeddings: text, image and fused vectors for every item, their "
             "kNN graphs and a QA report.", "", "Args:"]
    for f in dataclasses.fields(PipelineParams):
        lines.append(f"    {f.name}: {param_description(f.name)}")
    return "\n".join(lines)


def _with_param_signature(fn: Callable) -> Callable:
    """Give ``fn(**params)`` one typed parameter per PipelineParams field."""
    fields = dataclasses.fields(PipelineParams)
    returns = inspect.signature(fn).return_annotation
    names = [f.name for f in fields]

    def with_params(*args, **kwargs):  # KFP passes the parameters positionally
        return fn(**dict(zip(names, args)), **kwargs)

    with_params.__signature__ = inspect.Signature(
        [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                           annotation=type(f.default)) for f in fields],
        return_annotation=returns)
    with_params.__annotations__ = {f.name: type(f.default) for f in fields} | {"return": returns}
    with_params.__name__ = fn.__name__
    with_params.__doc__ = _docstring()
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


def _worker_pool_specs(job: _Job, *, machine_type, accelerator_type="", accelerator_count=0,
                       image=None) -> list[dict]:
    """The job's worker pool with its machine (and image) bound to pipeline values at run time.

    GCPC's launcher drops empty fields, so an empty accelerator type with a count of 0 is a CPU
    machine."""
    pool = copy.deepcopy(job.pool)
    pool["machine_spec"] = {"machine_type": machine_type, "accelerator_type": accelerator_type,
                            "accelerator_count": accelerator_count}
    if image is not None:
        pool["container_spec"]["image_uri"] = image
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


@dataclasses.dataclass
class _Steps:
    """The components of one compile target (each wrapped as a custom job on Vertex)."""

    fingerprint: Any
    embed_text: Any
    embed_images: Any
    fuse: Any
    knn: Any
    report: Any
    jobs: dict[str, _Job]  # Vertex only: the custom jobs above and their worker pools
    text_machine: Any = None  # Vertex only: the text workers' image and accelerator count

    @classmethod
    def make(cls, on_vertex: bool, image: str, gpu_image: str) -> "_Steps":
        made = dict(fingerprint=make_fingerprint(image), embed_text=make_embed_text(image),
                    embed_images=make_embed_images(gpu_image if on_vertex else image),
                    fuse=make_fuse_embeddings(image), knn=make_knn_graphs(image),
                    report=make_qa_report(image))
        if not on_vertex:  # kfp.local runs every step as a plain task, in one image
            return cls(**made, jobs={})
        names = {"fingerprint": "fingerprint-inputs", "embed_text": "embed-text",
                 "embed_images": "embed-images", "fuse": "fuse-embeddings",
                 "knn": "knn-graphs", "report": "qa-report"}
        jobs = {key: _custom_job(made[key], name) for key, name in names.items()}
        return cls(**{key: job.op for key, job in jobs.items()}, jobs=jobs,
                   text_machine=make_text_machine(image))


def _worker_machines(steps: _Steps, p: Mapping[str, Any], image: str, gpu_image: str
                     ) -> tuple[dict, dict]:
    """The text and image workers' custom-job inputs (Vertex): machine and scheduling from
    pipeline parameters; the text workers' image and GPU count from the text-machine task."""
    machine = _bind(steps.text_machine, p, cpu_image=image, gpu_image=gpu_image
                    ).set_display_name("Text machine")
    text = dict(strategy=p["text_strategy"], worker_pool_specs=_worker_pool_specs(
        steps.jobs["embed_text"], machine_type=p["text_machine_type"],
        accelerator_type=p["text_accelerator"],
        accelerator_count=machine.outputs["accelerator_count"], image=machine.outputs["image"]))
    images = dict(strategy=p["image_strategy"], worker_pool_specs=_worker_pool_specs(
        steps.jobs["embed_images"], machine_type=p["image_machine_type"],
        accelerator_type=IMAGE_ACCELERATOR, accelerator_count=1))
    return text, images


def _workers(steps: _Steps, p: Mapping[str, Any], items, plan, runtime: dict, *,
             local_loops: tuple | None, image: str, gpu_image: str):
    """The two worker loops: a text worker per item of the plan's ``workers``, an image
    worker per item of its ``image_workers`` (only the workers with images to embed: no T4
    starts for nothing). Their cache keys hold the inputs' fingerprint through the loop item.
    Returns (the text task, the image task, their shard outputs collected); the tasks are None
    locally."""
    if local_loops:
        text_loop, image_loop = local_loops
        text = _bind(text_loop, p, loop_items=plan.outputs["workers"], items=items
                     ).set_display_name("Embed text")
        images = _bind(image_loop, p, loop_items=plan.outputs["image_workers"], items=items
                       ).set_display_name("Embed images")
        return None, None, text.output, images.output
    text_job, image_job = _worker_machines(steps, p, image, gpu_image)
    with dsl.ParallelFor(plan.outputs["workers"], name="text-workers") as worker:
        text = _bind(steps.embed_text, p, items=items, worker=worker, **text_job, **runtime
                     ).set_display_name("Embed text")
    with dsl.ParallelFor(plan.outputs["image_workers"], name="image-workers") as worker:
        images = _bind(steps.embed_images, p, items=items, worker=worker, require_gpu=True,
                       **image_job, **runtime).set_display_name("Embed images")
    return (text, images, dsl.Collected(text.outputs["text_shards"]),
            dsl.Collected(images.outputs["image_shards"]))


def _local_loop(component, name: str, output: str, explicit: dict):
    """A loop of ``component`` over its ``loop_items`` input, as a small pipeline of its own
    returning the workers' ``output`` collected. kfp.local (2.17.3) iterates only over a task's
    single output named ``Output`` or over a pipeline's input, not over one of several named
    outputs; wrapped so, the local DAG runs the same tasks with the same edges as Vertex's."""
    fields = {f.name: f for f in dataclasses.fields(PipelineParams)}
    names = [n for n in component.component_spec.inputs if n in fields]

    def loop(loop_items, items, *args):  # KFP passes the inputs positionally
        q = dict(zip(names, args))
        with dsl.ParallelFor(loop_items, name=name) as worker:
            task = _bind(component, q, items=items, worker=worker, **explicit)
        return dsl.Collected(task.outputs[output])

    loop.__signature__ = inspect.Signature(
        [inspect.Parameter("loop_items", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           annotation=list),
         inspect.Parameter("items", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           annotation=dsl.Input[dsl.Dataset]),
         *(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             default=fields[n].default, annotation=type(fields[n].default))
           for n in names)],
        return_annotation=list[dsl.Dataset])
    loop.__name__ = name.replace("-", "_")
    loop.__doc__ = f"The {name} loop (kfp.local)."
    return dsl.pipeline(name=name)(loop)


def _machine(steps: _Steps, key: str, p: Mapping[str, Any], parameter: str | None = None
             ) -> dict:
    """A CPU custom job's machine: a pipeline parameter's, or the small machine (Vertex;
    nothing locally)."""
    if key not in steps.jobs:
        return {}
    machine = p[parameter] if parameter else SMALL_MACHINE
    return dict(worker_pool_specs=_worker_pool_specs(steps.jobs[key], machine_type=machine))


def _vertex_policies(workers: Sequence, steps: Sequence) -> None:
    """Retries: Spot preemptions of the workers, transient failures of the steps."""
    for task in workers:
        task.set_retry(WORKER_RETRIES, backoff_duration="60s")
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
    # the run-time inputs of the steps that log experiment runs
    runtime = dict(project=PROJECT_PLACEHOLDER if on_vertex else "",
                   location=LOCATION_PLACEHOLDER if on_vertex else "")

    # built outside the pipeline's own context (KFP refuses a pipeline defined inside another)
    local_loops = None if on_vertex else (
        _local_loop(steps.embed_text, "text-workers", "text_shards", runtime),
        _local_loop(steps.embed_images, "image-workers", "image_shards",
                    dict(runtime, require_gpu=False)))

    def item_embeddings(**p) -> Outputs:
        items = dsl.importer(artifact_uri=p["items_uri"], artifact_class=dsl.Dataset,
                             reimport=False).set_display_name("Items").output
        plan = _bind(steps.fingerprint, p, items=items, **_machine(steps, "fingerprint", p)
                     ).set_display_name("Fingerprint and plan")
        plan.set_caching_options(False)  # it is what tells changed contents apart
        text, images, text_shards, image_shards = _workers(
            steps, p, items, plan, runtime, local_loops=local_loops, image=image,
            gpu_image=gpu_image)
        fused = _bind(steps.fuse, p, text_shards=text_shards, image_shards=image_shards,
                      workers=plan.outputs["workers"], image_workers=plan.outputs["image_workers"],
                      previous_set=plan.outputs["previous_set"],
                      inputs_fingerprint=plan.outputs["fingerprint"],
                      **_machine(steps, "fuse", p, "fusion_machine_type"), **runtime
                      ).set_display_name("Fuse embeddings")
        text_out = fused.outputs["text_embeddings"]
        image_out = fused.outputs["image_embeddings"]
        fused_out = fused.outputs["fused_embeddings"]
        knn = _bind(steps.knn, p, text_embeddings=text_out, fused_embeddings=fused_out,
                    **_machine(steps, "knn", p, "knn_machine_type"), **runtime
                    ).set_display_name("kNN graphs")
        report = _bind(steps.report, p, items=items, text_embeddings=text_out,
                       image_embeddings=image_out, fused_embeddings=fused_out,
                       knn_graphs=knn.outputs["graphs"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                       **_machine(steps, "report", p)).set_display_name("QA report")
        report.set_caching_options(False)  # it publishes: a side effect, not a result to reuse
        if on_vertex:  # locally a failure is a bug to see at once, not a preemption to retry
            _vertex_policies(workers=(text, images), steps=(plan, fused, knn, report))
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
