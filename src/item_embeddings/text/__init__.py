"""The text step and its encoders.

Example::

    from item_embeddings.text import embed_items_text, load_text_encoder
    encoder = load_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    vectors = encoder.encode(["USB-C cable 2 m", "Noise-cancelling headphones"])  # [2, 384]
    meta = embed_items_text("items.parquet", "out/text")  # txt.npy, txt_items.parquet, meta

Modules: :mod:`.models` (where a model's files are), :mod:`.encoders` (the encoder interface,
sentence-transformers backends, backend choice), :mod:`.onnx` (the ONNX backends),
:mod:`.quality` (the quality gate a fast backend must pass), :mod:`.step` (the step).
"""

from .encoders import BACKENDS, TextEncoder, load_text_encoder, resolve_backend
from .models import MINILM_SHA256, ResolvedModel, resolve_text_model
from .step import embed_items_text

__all__ = ["BACKENDS", "MINILM_SHA256", "ResolvedModel", "TextEncoder", "embed_items_text",
           "load_text_encoder", "resolve_backend", "resolve_text_model"]
