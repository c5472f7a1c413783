"""The text encoder interface and its backends' constructor.

Every backend is a :class:`TextEncoder`: ``encode(texts)`` returns float32, L2-normalised vectors
[n, dim], and a few attributes say what produced them (recorded in ``txt_meta.json``).

Backends (``text_backend``):

* ``torch``: plain sentence-transformers in float32, exact (the reference).
* ``torch-fp16``: sentence-transformers with ``model.half()`` on CUDA (GPU only).
* ``onnx`` / ``onnx-int8``: the same model exported to ONNX (:mod:`item_embeddings.text.onnx`).
* ``auto``: exact: ``torch`` (float32) on CUDA, else ``onnx`` (float32, the fastest exact CPU
  backend, see ``docs/text.md``).

``onnx-int8`` and ``torch-fp16`` approximate the model: they are used only when asked for by
name, and the step checks them against the exact reference on a sample of the catalogue first
(:data:`APPROXIMATE_BACKENDS`, :mod:`.quality`).

Example::

    from item_embeddings.text import load_text_encoder
    encoder = load_text_encoder("sentence-transformers/all-MiniLM-L6-v2", backend="torch")
    vectors = encoder.encode(["USB-C cable 2 m", "Noise-cancelling headphones"])  # [2, 384]
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ..config import TEXT_BACKENDS, ConfigError, PipelineParams
from .models import ResolvedModel, resolve_text_model
from .onnx import ONNX_BACKENDS, OnnxTextEncoder

TORCH_BACKENDS = ("torch", "torch-fp16")
APPROXIMATE_BACKENDS = ("onnx-int8", "torch-fp16")  # opt-in, gated (see the step)
_DEFAULTS = PipelineParams()
BACKENDS = TEXT_BACKENDS  # "auto" and the concrete ones (declared with the parameter)


@runtime_checkable
class TextEncoder(Protocol):
    """What the text step needs of an encoder."""

    name: str                  # the text_model it was asked for
    resolved: ResolvedModel    # where the weights came from, and their hash
    backend: str               # one of BACKENDS except 'auto'
    device: str                # 'cpu' or 'cuda...'
    dtype: str                 # the compute precision ('float32', 'float16', 'int8')
    dim: int
    max_seq_length: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32, L2-normalised, in the order of ``texts``."""
        ...


class SentenceTransformerEncoder:
    """The ``torch`` / ``torch-fp16`` backends: a sentence-transformers model."""

    def __init__(self, name: str, device: str | None = None,
                 batch_size: int = _DEFAULTS.text_batch_size,
                 half: bool = False):
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.resolved = resolve_text_model(name)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.model = SentenceTransformer(self.resolved.location, device=self.device)
        self.dim = int(self.model.get_embedding_dimension()
                       if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        self.backend, self.dtype = "torch", "float32"
        if half:
            self.model.half()
            self.backend, self.dtype = "torch-fp16", "float16"

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def resolve_backend(backend: str, device: str | None = None) -> str:
    """Turn ``auto`` into a concrete backend and reject unknown names and impossible devices."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown text_backend {backend!r}; expected one of "
                          f"{', '.join(BACKENDS)}")
    if backend not in ("auto", "torch-fp16"):
        return backend
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "auto":  # exact by default: approximations are opt-in
        return "torch" if device.startswith("cuda") else "onnx"
    if not device.startswith("cuda"):
        raise ConfigError(f"text_backend 'torch-fp16' needs a CUDA device, got {device!r}")
    return backend


def load_text_encoder(name: str = _DEFAULTS.text_model,
                      batch_size: int = _DEFAULTS.text_batch_size,
                      device: str | None = None, backend: str = "torch") -> TextEncoder:
    """Load the encoder of ``backend``.

    ``torch`` (the default here) is plain sentence-transformers in float32, exact on any device;
    ``auto`` picks the fastest exact backend (``torch`` on CUDA, ``onnx`` float32 on CPU);
    ``onnx`` / ``onnx-int8`` build their ONNX model once into the cache.
    """
    backend = resolve_backend(backend, device)
    if backend in ONNX_BACKENDS:
        if device is not None and device != "cpu":
            raise ConfigError(f"text_backend {backend!r} runs on cpu, got device {device!r}")
        return OnnxTextEncoder(name, backend=backend, batch_size=batch_size)
    half = backend == "torch-fp16"
    return SentenceTransformerEncoder(name, device=device or ("cuda" if half else None),
                                      batch_size=batch_size, half=half)
