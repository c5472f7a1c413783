"""Facts about the running environment that every step records or uses."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where downloaded or built models are cached (``ITEM_EMBEDDINGS_CACHE``; the image sets it)."""
    return Path(os.environ.get("ITEM_EMBEDDINGS_CACHE",
                               Path.home() / ".cache" / "item_embeddings"))


def package_versions(*dists: str) -> dict[str, str]:
    """Installed versions of ``item-embeddings`` and ``dists`` (the ones present), for meta files."""
    out = {}
    for dist in ("item-embeddings", *dists):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class GpuUnavailableError(RuntimeError):
    """A step that runs on a GPU machine finds no GPU that torch can use."""


def require_cuda(step: str) -> str:
    """``"cuda"`` when torch can run a kernel on a CUDA GPU; else raise, saying what torch sees.

    A GPU task that silently fell back to its few vCPUs would take hours; failing instead lets
    the task's retry get another VM, and the message says what to fix (image or driver).
    """
    import torch

    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (CPU-only)'}"
    hint = ("the GPU image must carry a CUDA 12.x torch build and the host driver must support "
            "it (docs/operations.md, 'Container images')")
    if not torch.cuda.is_available():
        raise GpuUnavailableError(f"{step} runs on a GPU machine but {build} sees no usable GPU; "
                                  f"failing so that a retry gets another VM ({hint})")
    try:  # is_available() can be true while kernels cannot run (driver too old, arch missing)
        torch.ones(8, device="cuda").mul(2).sum().item()
    except RuntimeError as exc:
        raise GpuUnavailableError(f"{step} cannot run a CUDA kernel with {build} on "
                                  f"{torch.cuda.get_device_name(0)}: {exc} ({hint})") from exc
    return "cuda"
