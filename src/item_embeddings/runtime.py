"""Facts about the running environment that every step records or uses."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ItemEmbeddingsError

HUB_PROBE_TIMEOUT_S = 3.0  # one connection attempt; huggingface_hub's own retries take ~1 min


def cache_dir() -> Path:
    """Where downloaded or built models are cached (``ITEM_EMBEDDINGS_CACHE``; the image sets
    it)."""
    return Path(os.environ.get("ITEM_EMBEDDINGS_CACHE",
                               Path.home() / ".cache" / "item_embeddings"))


def package_versions(*dists: str) -> dict[str, str]:
    """Installed versions of ``item-embeddings`` and ``dists`` (the ones present), for meta
    files."""
    out = {}
    for dist in ("item-embeddings", *dists):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class GpuUnavailableError(ItemEmbeddingsError, RuntimeError):
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


def hub_endpoint() -> str:
    """The model hub that open_clip and sentence-transformers download from (``HF_ENDPOINT``)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(endpoint: str | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S,
                  connect: Callable[..., socket.socket] = socket.create_connection) -> bool:
    """Whether one TCP connection to the hub's host and port succeeds within ``timeout_s``.

    The name lookup counts against ``timeout_s`` too (``connect``'s own timeout does not bound
    it), so the attempt runs in a daemon thread that is abandoned when it takes too long.
    ``connect(address, timeout=...)`` is injectable, for tests that must not touch the network.
    """
    parts = urlsplit(endpoint or hub_endpoint())
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    answers: list[bool] = []
    done = threading.Event()

    def attempt() -> None:
        try:
            connect(address, timeout=timeout_s).close()
            answers.append(True)
        except OSError:
            answers.append(False)
        finally:
            done.set()

    threading.Thread(target=attempt, name="hub-probe", daemon=True).start()
    done.wait(timeout_s)
    return answers[:1] == [True]


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub offline mode, in this process and the processes started meanwhile.

    huggingface_hub then answers from its cache at once, or fails at once, instead of retrying
    a hub it cannot reach. The processes get ``HF_HUB_OFFLINE=1``; here, where huggingface_hub
    read the variable when it was imported, its flag is set too. Both are restored on exit.
    """
    from huggingface_hub import constants

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
