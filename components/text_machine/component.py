"""The text workers' container image and GPU count, chosen at run time (Vertex only)."""

from typing import NamedTuple

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def text_machine(
    text_accelerator: str,
    cpu_image: str,
    gpu_image: str,
) -> NamedTuple("TextMachine", [("image", str), ("accelerator_count", int)]):
    """Picks the text workers' image and GPU count from `text_accelerator`: the CUDA image and
    one GPU when it names one, the slim CPU image and none when it is empty.

    Returns:
        image: The text workers' container image.
        accelerator_count: 1 with a text accelerator, else 0.
    """
    import collections

    machine = collections.namedtuple("TextMachine", "image accelerator_count")
    return machine(gpu_image, 1) if text_accelerator else machine(cpu_image, 0)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(text_machine, base_image)
