"""The item-embeddings pipeline.

    items ─ fingerprint ─ plan ─┬─ ParallelFor(worker): text shards ∥ image shards ─┐
                                └──────────────── merge text, merge images ◄──────────┘
                                      ─ fusion ─ kNN graphs ─ QA report ─ publish (optional)

Its parameters are generated from :class:`item_embeddings.config.PipelineParams`, so every knob
(with its default and description) is a pipeline parameter that a Vertex AI UI rerun can change.
Two compile targets share one DAG:

* ``vertex``: experiment runs go to Vertex AI Experiments (project/location from the runtime
  placeholders). The text and image workers, fusion and the kNN graphs run as Vertex custom jobs
  whose machine (``text_machine_type``, ``text_accelerator``, ``image_machine_type``,
  ``fusion_machine_type``, ``knn_machine_type``) and scheduling (``text_strategy``,
  ``image_strategy``: SPOT/STANDARD) are pipeline parameters;
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
from pathlib import Path
from typing import Any, Callable, NamedTuple

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
from item_embeddings.components.text_machine import make_component as make_text_machine
from item_embeddings.config import PipelineParams, param_description

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
    from google_cloud_pipeline_components.v1.custom_job import \
        create_custom_training_job_from_component

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
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    on_vertex = target == "vertex"
    gpu_image = gpu_image or image
    fingerprint_op, plan_op = make_fingerprint(image), make_plan_shards(image)
    merge_text_op, merge_images_op = make_merge_text(image), make_merge_images(image)
    report_op, publish_op = make_qa_report(image), make_publish_outputs(image)
    if on_vertex:
        text_job = _custom_job(make_embed_text(image), "embed-text")
        image_job = _custom_job(make_embed_images(gpu_image), "embed-images")
        fuse_job = _custom_job(make_fuse_embeddings(image), "fuse-embeddings")
        knn_job = _custom_job(make_knn_graphs(image), "knn-graphs")
        embed_text_op, embed_images_op, fuse_op, knn_op = (
            text_job.op, image_job.op, fuse_job.op, knn_job.op)
    else:
        embed_text_op, embed_images_op, fuse_op, knn_op = (
            make_embed_text(image), make_embed_images(image), make_fuse_embeddings(image),
            make_knn_graphs(image))

    def item_embeddings(**p) -> Outputs:
        tracking = dict(experiment=p["experiment"], tracking_backend=p["tracking_backend"],
                        tracking_dir=p["tracking_dir"],
                        project=PROJECT_PLACEHOLDER if on_vertex else "",
                        location=LOCATION_PLACEHOLDER if on_vertex else "")
        items = dsl.importer(artifact_uri=p["items_uri"], artifact_class=dsl.Dataset,
                             reimport=False).set_display_name("Items")
        fingerprint = fingerprint_op(items=items.output, previous_uri=p["previous_uri"]
                                     ).set_display_name("Fingerprint inputs")
        fingerprint.set_caching_options(False)  # it is what tells changed contents apart
        plan = plan_op(
            items=items.output, shards=p["shards"], max_parallel_shards=p["max_parallel_shards"],
            id_column=p["id_column"], image_url_column=p["image_url_column"],
            max_items=p["max_items"], inputs_fingerprint=fingerprint.output,
        ).set_display_name("Plan shards")
        # the workers' cache keys hold the fingerprint through their loop item (see the plan)
        reads_items = dict(items=items.output, id_column=p["id_column"],
                           previous_uri=p["previous_uri"])
        text_jobs, image_jobs = {}, {}
        if on_vertex:
            machine = make_text_machine(image)(
                text_accelerator=p["text_accelerator"], cpu_image=image, gpu_image=gpu_image
            ).set_display_name("Text machine")
            text_jobs = dict(strategy=p["text_strategy"], worker_pool_specs=_worker_pool_specs(
                text_job, machine_type=p["text_machine_type"],
                accelerator_type=p["text_accelerator"],
                accelerator_count=machine.outputs["accelerator_count"],
                image=machine.outputs["image"]))
            image_jobs = dict(strategy=p["image_strategy"], worker_pool_specs=_worker_pool_specs(
                image_job, machine_type=p["image_machine_type"],
                accelerator_type=IMAGE_ACCELERATOR, accelerator_count=1))
        with dsl.ParallelFor(plan.output, name="workers") as worker:
            text = embed_text_op(
                **reads_items, worker=worker, title_column=p["title_column"],
                description_column=p["description_column"], text_model=p["text_model"],
                text_batch_size=p["text_batch_size"], text_backend=p["text_backend"],
                text_accelerator=p["text_accelerator"], **text_jobs, **tracking,
            ).set_display_name("Embed text")
            images = embed_images_op(
                **reads_items, worker=worker, image_url_column=p["image_url_column"],
                image_model=p["image_model"], image_pretrained=p["image_pretrained"],
                image_batch_size=p["image_batch_size"], max_items=p["max_items"],
                download_concurrency=p["download_concurrency"],
                download_timeout_s=p["download_timeout_s"],
                download_retries=p["download_retries"], max_image_bytes=p["max_image_bytes"],
                allow_private_hosts=p["allow_private_hosts"], shard_size=p["shard_size"],
                checkpoint_uri=p["checkpoint_uri"], image_user_agent=p["image_user_agent"],
                image_revalidate=p["image_revalidate"],
                retry_failed_images=p["retry_failed_images"], require_gpu=on_vertex,
                **image_jobs, **tracking,
            ).set_display_name("Embed images")
        merged_text = merge_text_op(
            text_shards=dsl.Collected(text.outputs["text_shards"]),
            workers=plan.output, text_model=p["text_model"],
            text_backend=p["text_backend"], text_batch_size=p["text_batch_size"],
            previous_uri=p["previous_uri"], **tracking,
        ).set_display_name("Merge text")
        merged_images = merge_images_op(
            image_shards=dsl.Collected(images.outputs["image_shards"]),
            workers=plan.output, image_model=p["image_model"], max_items=p["max_items"],
            previous_uri=p["previous_uri"], **tracking,
        ).set_display_name("Merge images")
        fuse_jobs, knn_jobs = {}, {}
        if on_vertex:
            fuse_jobs = dict(worker_pool_specs=_worker_pool_specs(
                fuse_job, machine_type=p["fusion_machine_type"]))
            knn_jobs = dict(worker_pool_specs=_worker_pool_specs(
                knn_job, machine_type=p["knn_machine_type"]))
        fused = fuse_op(
            text_embeddings=merged_text.outputs["text_embeddings"],
            image_embeddings=merged_images.outputs["image_embeddings"],
            fusion_hidden_dim=p["fusion_hidden_dim"], fusion_output_dim=p["fusion_output_dim"],
            fusion_epochs=p["fusion_epochs"], fusion_lr=p["fusion_lr"],
            fusion_batch_size=p["fusion_batch_size"], seed=p["seed"],
            fusion_mode=p["fusion_mode"], previous_uri=p["previous_uri"],
            inputs_fingerprint=fingerprint.output, **fuse_jobs, **tracking,
        ).set_display_name("Fuse embeddings")
        knn = knn_op(
            text_embeddings=merged_text.outputs["text_embeddings"],
            fused_embeddings=fused.outputs["fused_embeddings"], knn_k=p["knn_k"],
            knn_exact_max_items=p["knn_exact_max_items"],
            knn_recall_queries=p["knn_recall_queries"], seed=p["seed"],
            previous_uri=p["previous_uri"], inputs_fingerprint=fingerprint.output, **knn_jobs,
            **tracking,
        ).set_display_name("kNN graphs")
        report = report_op(
            items=items.output, text_embeddings=merged_text.outputs["text_embeddings"],
            image_embeddings=merged_images.outputs["image_embeddings"],
            fused_embeddings=fused.outputs["fused_embeddings"],
            knn_graphs=knn.outputs["graphs"], id_column=p["id_column"],
            title_column=p["title_column"], category_column=p["category_column"],
            seed=p["seed"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("QA report")
        if on_vertex:  # locally a failure is a bug to see at once, not a preemption to retry
            for task in (text, images):
                task.set_retry(WORKER_RETRIES, backoff_duration="60s")
            for task in (plan, merged_text, merged_images, fused, knn, report):
                task.set_retry(STEP_RETRIES)
            for task in (plan, merged_text, merged_images, report):  # the jobs have a machine
                task.set_cpu_limit(CPU_STEP_CPU).set_memory_limit(CPU_STEP_MEMORY)
        with dsl.If(p["publish_uri"] != "", name="publish-enabled"):
            publish_op(
                text_embeddings=merged_text.outputs["text_embeddings"],
                image_embeddings=merged_images.outputs["image_embeddings"],
                fused_embeddings=fused.outputs["fused_embeddings"],
                knn_graphs=knn.outputs["graphs"], report=report.outputs["report"],
                publish_uri=p["publish_uri"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            ).set_display_name("Publish outputs").set_caching_options(False)
        return Outputs(merged_text.outputs["text_embeddings"],
                       merged_images.outputs["image_embeddings"],
                       fused.outputs["fused_embeddings"], knn.outputs["graphs"],
                       report.outputs["report"])

    return dsl.pipeline(name=PIPELINE_NAME, pipeline_root=pipeline_root)(
        _with_param_signature(item_embeddings))


def compile_pipeline(output: "str | Path", target: str = "vertex", image: str = DEFAULT_IMAGE,
                     gpu_image: str | None = None, pipeline_root: str | None = None) -> Path:
    """Compile the pipeline to a YAML template at ``output`` (arguments as :func:`build_pipeline`)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(target, image, gpu_image, pipeline_root),
                                package_path=str(output))
    return output
