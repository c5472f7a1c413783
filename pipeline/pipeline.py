"""The item-embeddings pipeline.

Its parameters are generated from :class:`item_embeddings.config.PipelineParams`, so every knob
(with its default and description) is a pipeline parameter that a Vertex AI UI rerun can change.
Two compile targets share one DAG:

* ``vertex``: experiment runs go to Vertex AI Experiments (project/location from the runtime
  placeholders).
* ``local``: for ``kfp.local``; experiment runs go to the local store.
"""


import dataclasses
import inspect
from pathlib import Path
from typing import Callable

from kfp import compiler, dsl

from item_embeddings.components import DEFAULT_IMAGE
from item_embeddings.components.embed_text import make_component as make_embed_text
from item_embeddings.config import PipelineParams

PIPELINE_NAME = "item-embeddings"
TARGETS = ("vertex", "local")
PROJECT_PLACEHOLDER = "{{$.pipeline_google_cloud_project_id}}"
LOCATION_PLACEHOLDER = "{{$.pipeline_google_cloud_location}}"


def _docstring() -> str:
    lines = ["Multimodal item embeddings: text, image and fused vectors for every item.", "",
             "Args:"]
    for f in dataclasses.fields(PipelineParams):
        lines.append(f"    {f.name}: {f.metadata['help']}")
    return "\n".join(lines)


def _with_param_signature(fn: Callable) -> Callable:
    """Give ``fn(**params)`` one typed keyword parameter per PipelineParams field."""
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


def build_pipeline(target: str = "vertex", image: str = DEFAULT_IMAGE):
    """The pipeline function for ``target`` ('vertex' or 'local'), components running in ``image``."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    embed_text_op = make_embed_text(image)
    on_vertex = target == "vertex"
    project = PROJECT_PLACEHOLDER if on_vertex else ""
    location = LOCATION_PLACEHOLDER if on_vertex else ""

    def item_embeddings(**p) -> dsl.Dataset:
        text = embed_text_op(
            items_uri=p["items_uri"],
            id_column=p["id_column"],
            title_column=p["title_column"],
            description_column=p["description_column"],
            text_model=p["text_model"],
            text_batch_size=p["text_batch_size"],
            experiment=p["experiment"],
            tracking_backend=p["tracking_backend"],
            tracking_dir=p["tracking_dir"],
            project=project,
            location=location,
        ).set_display_name("Embed text")
        if on_vertex:
            text.set_cpu_limit("4").set_memory_limit("15G")
        return text.outputs["text_embeddings"]

    return dsl.pipeline(name=PIPELINE_NAME)(_with_param_signature(item_embeddings))


def compile_pipeline(output: "str | Path", target: str = "vertex", image: str = DEFAULT_IMAGE) -> Path:
    """Compile the pipeline to a YAML template at ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(target, image), package_path=str(output))
    return output
