"""The item-embeddings pipeline: items → fingerprint → (text ∥ image) → fusion → optional publish.

Its parameters are generated from :class:`item_embeddings.config.PipelineParams`, so every knob
(with its default and description) is a pipeline parameter that a Vertex AI UI rerun can change.
Two compile targets share one DAG:

* ``vertex``: experiment runs go to Vertex AI Experiments (project/location from the runtime
  placeholders); the CPU steps run in the slim ``image``; the image step runs in ``gpu_image``
  as a custom job on ``n1-standard-4`` + 1 × T4 whose scheduling strategy (``SPOT`` by default)
  is the ``image_strategy`` parameter, as the pipeline's own service account, in its network,
  with its CMEK key (runtime placeholders), and fails if the GPU is not usable.
* ``local``: for ``kfp.local``, which cannot run the custom-job wrapper: the image step is a plain
  task on CPU; experiment runs go to the local store.

Caching: the steps that read the items take the items' content fingerprint as an input (the
fingerprint task itself is never cached), so a cached result is only reused for the same
contents, on submit, schedules and UI reruns alike.
"""

import dataclasses
import inspect
from pathlib import Path
from typing import Callable, NamedTuple

from kfp import compiler, dsl

from item_embeddings.components import DEFAULT_IMAGE
from item_embeddings.components.embed_images import make_component as make_embed_images
from item_embeddings.components.embed_text import make_component as make_embed_text
from item_embeddings.components.fingerprint_inputs import make_component as make_fingerprint
from item_embeddings.components.fuse_embeddings import make_component as make_fuse_embeddings
from item_embeddings.components.publish_outputs import make_component as make_publish_outputs
from item_embeddings.config import PipelineParams, param_description

PIPELINE_NAME = "item-embeddings"
TARGETS = ("vertex", "local")
PROJECT_PLACEHOLDER = "{{$.pipeline_google_cloud_project_id}}"
LOCATION_PLACEHOLDER = "{{$.pipeline_google_cloud_location}}"

# Vertex resources (issue: text and fusion on 4 vCPU / 15 GB, image on n1-standard-4 + T4 Spot).
CPU_STEP_CPU, CPU_STEP_MEMORY = "4", "15G"
IMAGE_MACHINE_TYPE, IMAGE_ACCELERATOR = "n1-standard-4", "NVIDIA_TESLA_T4"
IMAGE_STEP_TIMEOUT = "86400s"
STEP_RETRIES = 2
IMAGE_STEP_RETRIES = 5  # Spot preemptions; each retry resumes from the finished shards


class Outputs(NamedTuple):
    text_embeddings: dsl.Dataset
    image_embeddings: dsl.Dataset
    fused_embeddings: dsl.Dataset


def _docstring() -> str:
    lines = ["Multimodal item embeddings: text, image and fused vectors for every item.", "",
             "Args:"]
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


def _gpu_job(component):
    """``component`` as a Vertex custom job on a T4, whose strategy is a task input.

    The wrapper would run the job as the Vertex custom-code service agent, outside the user's
    VPC and without CMEK; the runtime placeholders give it the pipeline job's own service
    account, network and encryption key instead (empty when the job has none). The run's
    labels reach the job too: Vertex propagates pipeline run labels to its CustomJobs.
    """
    from google_cloud_pipeline_components import _placeholders
    from google_cloud_pipeline_components.v1.custom_job import \
        create_custom_training_job_from_component

    return create_custom_training_job_from_component(
        component, display_name="embed-images", machine_type=IMAGE_MACHINE_TYPE,
        accelerator_type=IMAGE_ACCELERATOR, accelerator_count=1, strategy="SPOT",
        timeout=IMAGE_STEP_TIMEOUT, service_account=_placeholders.SERVICE_ACCOUNT_PLACEHOLDER,
        network=_placeholders.NETWORK_PLACEHOLDER,
        encryption_spec_key_name=_placeholders.ENCRYPTION_SPEC_KMS_KEY_NAME_PLACEHOLDER)


def build_pipeline(target: str = "vertex", image: str = DEFAULT_IMAGE,
                   gpu_image: str | None = None, pipeline_root: str | None = None):
    """The pipeline function for ``target`` ('vertex' or 'local').

    Args:
        target: Where the template runs.
        image: The slim CPU image of every step except the GPU one.
        gpu_image: The CUDA image of the image step on Vertex (default: ``image``).
        pipeline_root: Default ``gs://`` root of the run's artifacts (the UI needs one).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    on_vertex = target == "vertex"
    fingerprint_op = make_fingerprint(image)
    embed_text_op = make_embed_text(image)
    embed_images_op = (_gpu_job(make_embed_images(gpu_image or image)) if on_vertex
                       else make_embed_images(image))
    fuse_op = make_fuse_embeddings(image)
    publish_op = make_publish_outputs(image)

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
        reads_items = dict(items=items.output, inputs_fingerprint=fingerprint.output,
                           id_column=p["id_column"], previous_uri=p["previous_uri"])
        text = embed_text_op(
            **reads_items, title_column=p["title_column"],
            description_column=p["description_column"], text_model=p["text_model"],
            text_batch_size=p["text_batch_size"], text_backend=p["text_backend"], **tracking,
        ).set_display_name("Embed text")
        image_args = {"strategy": p["image_strategy"]} if on_vertex else {}
        images = embed_images_op(
            **reads_items, image_url_column=p["image_url_column"],
            image_model=p["image_model"], image_pretrained=p["image_pretrained"],
            image_batch_size=p["image_batch_size"], max_items=p["max_items"],
            download_concurrency=p["download_concurrency"],
            download_timeout_s=p["download_timeout_s"], download_retries=p["download_retries"],
            max_image_bytes=p["max_image_bytes"], allow_private_hosts=p["allow_private_hosts"],
            shard_size=p["shard_size"], checkpoint_uri=p["checkpoint_uri"],
            image_user_agent=p["image_user_agent"], image_revalidate=p["image_revalidate"],
            retry_failed_images=p["retry_failed_images"], require_gpu=on_vertex, **image_args,
            **tracking,
        ).set_display_name("Embed images")
        fused = fuse_op(
            text_embeddings=text.outputs["text_embeddings"],
            image_embeddings=images.outputs["image_embeddings"],
            fusion_hidden_dim=p["fusion_hidden_dim"], fusion_output_dim=p["fusion_output_dim"],
            fusion_epochs=p["fusion_epochs"], fusion_lr=p["fusion_lr"],
            fusion_batch_size=p["fusion_batch_size"], seed=p["seed"],
            fusion_mode=p["fusion_mode"], previous_uri=p["previous_uri"],
            inputs_fingerprint=fingerprint.output, **tracking,
        ).set_display_name("Fuse embeddings")
        if on_vertex:  # locally a failure is a bug to see at once, not a preemption to retry
            images.set_retry(IMAGE_STEP_RETRIES, backoff_duration="60s")
            for task in (text, fused):
                task.set_retry(STEP_RETRIES)
                task.set_cpu_limit(CPU_STEP_CPU).set_memory_limit(CPU_STEP_MEMORY)
        with dsl.If(p["publish_uri"] != "", name="publish-enabled"):
            publish_op(
                text_embeddings=text.outputs["text_embeddings"],
                image_embeddings=images.outputs["image_embeddings"],
                fused_embeddings=fused.outputs["fused_embeddings"],
                publish_uri=p["publish_uri"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            ).set_display_name("Publish outputs").set_caching_options(False)
        return Outputs(text.outputs["text_embeddings"], images.outputs["image_embeddings"],
                       fused.outputs["fused_embeddings"])

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
