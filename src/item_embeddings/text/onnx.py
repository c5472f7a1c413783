"""The ``onnx`` and ``onnx-int8`` text backends: the sentence-transformers model exported to ONNX.

* ``onnx``: the model exported to one ONNX graph (transformer + pooling + L2 norm), fused attention
  and layer norms, float32; equal to ``torch`` up to float rounding.
* ``onnx-int8``: ``onnx`` with dynamic int8 quantisation (7-bit int8 weights, per output
  channel) of every projection except the feed-forward output projections of the first three
  layers, which stay float32 because their inputs (GELU outputs) carry the outliers that int8
  clips.

The fast model is built offline from the same weights, deterministically, into
``<cache>/text_fast/<key>`` where the key hashes the weights' sha256, the backend, the build recipe
and the versions of the tools that build it; a built model is reused.

Example::

    from item_embeddings.text.onnx import OnnxTextEncoder
    encoder = OnnxTextEncoder("sentence-transformers/all-MiniLM-L6-v2", backend="onnx-int8")
    vectors = encoder.encode(["USB-C cable 2 m", "Noise-cancelling headphones"])  # [2, 384]
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, PipelineParams
from ..runtime import cache_dir as default_cache_dir
from ..storage import sha256_file
from .models import resolve_text_model

logger = logging.getLogger(__name__)

ONNX_BACKENDS = ("onnx", "onnx-int8")

# Bump when the export/optimise/quantise recipe changes: it is part of the cache key.
RECIPE_VERSION = "3"
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "fast_model.json"
OPSET = 17
DEFAULT_TOKENS_PER_BATCH = 4096
FLOAT_FFN_OUTPUT_LAYERS = 3  # onnx-int8 keeps these layers' FFN output projections float32


def build_versions() -> dict[str, str]:
    """Versions of the tools whose output is the fast model (part of its cache key)."""
    out = {}
    for dist in ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def cache_key(weights_sha256: str, backend: str) -> str:
    blob = json.dumps({"weights_sha256": weights_sha256, "backend": backend,
                       "recipe": RECIPE_VERSION, "opset": OPSET, "versions": build_versions()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _state_dict_sha256(module) -> str:
    """Hash of a loaded model's tensors, for models whose weights file is not local (hub ids)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _pooling_mode(st_model) -> str:
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Transformer,
    )

    modules = list(st_model)
    if not modules or not isinstance(modules[0], Transformer):
        raise ConfigError("the ONNX text backends need a sentence-transformers model whose first "
                          f"module is a Transformer, got {[type(m).__name__ for m in modules]}")
    rest = [m for m in modules[1:] if not isinstance(m, Normalize)]
    if len(rest) != 1 or not isinstance(rest[0], Pooling):
        raise ConfigError("the ONNX text backends support Transformer + Pooling (+ Normalize) "
                          f"models only, got {[type(m).__name__ for m in modules]}")
    mode = rest[0].pooling_mode
    if mode not in ("mean", "cls"):
        raise ConfigError(f"the ONNX text backends support mean or cls pooling, got {mode!r}")
    return mode


def _export_fp32(st_model, pooling: str, path: Path) -> None:
    """Export transformer + pooling + L2 normalisation as one graph with dynamic batch and
    length."""
    import torch

    transformer = st_model[0].auto_model.eval()
    # eager attention exports as the MatMul/Softmax pattern that the fuser turns into Attention
    if hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    example = torch.ones(2, 8, dtype=torch.long)
    # the tracer warns about shape checks that are constant for this model; keep logs readable
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Pooled(), (example, example), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "attention_mask": {0: "batch", 1: "seq"},
                                        "embedding": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


def _fuse(src: Path, dest: Path, config) -> None:
    """Fuse attention, layer norms and GELU (onnxruntime's transformer optimiser, offline)."""
    from onnxruntime.transformers.optimizer import optimize_model

    bert_like = ("bert", "roberta", "xlm-roberta", "mpnet")
    model_type = "bert" if config.model_type in bert_like else None
    if model_type is None:
        shutil.copyfile(src, dest)  # an architecture the fuser does not know: run it unfused
        return
    fused = optimize_model(str(src), model_type=model_type, num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, opt_level=0)
    fused.save_model_to_file(str(dest))


def _ffn_output_matmuls(model_path: Path, intermediate_size: int) -> list[str]:
    """MatMul nodes whose weight maps intermediate_size -> hidden: the FFN output projections."""
    import onnx

    model = onnx.load(str(model_path))
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul"
            and any(len(shapes.get(i, ())) == 2 and shapes[i][0] == intermediate_size
                    for i in node.input)]


def _quantize_int8(src: Path, dest: Path, intermediate_size: int) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # int8 weights limited to 7 bits (reduce_range): without VNNI, onnxruntime's u8s8 kernels
    # can saturate their 16-bit intermediate sums at full 8-bit range, 7-bit weights cannot,
    # and they measured faster than uint8 weights at the same quality. The embedding table
    # stays float32 (op types), and so do the FFN output projections of the first layers
    # (their inputs, GELU outputs, carry the outliers int8 clips; the earliest layers' errors
    # travel furthest: layer 0's costs the most top-10 overlap, layers 3-5 barely any).
    ffn_outputs = _ffn_output_matmuls(src, intermediate_size)  # graph order = layer order
    quantize_dynamic(str(src), str(dest), per_channel=True, weight_type=QuantType.QInt8,
                     reduce_range=True, op_types_to_quantize=["MatMul", "Attention"],
                     nodes_to_exclude=ffn_outputs[:FLOAT_FFN_OUTPUT_LAYERS],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def build_fast_model(location: str, backend: str, weights_sha256: str | None = None,
                     cache_dir: Path | None = None) -> Path:
    """Build (or reuse) the ONNX model of ``backend`` for the sentence-transformers model at
    ``location``.

    Returns the directory with ``model.onnx``, the tokenizer files and ``fast_model.json``
    (backend, model sha256, weights sha256, max_seq_length, versions). The directory appears
    atomically (built in a temporary sibling, then renamed), so a crash never leaves a
    half-built model that a later run would trust.
    """
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"no fast model for backend {backend!r}; expected one of {ONNX_BACKENDS}")
    if cache_dir is None:
        cache_dir = default_cache_dir()
    root = Path(cache_dir) / "text_fast"
    st_model = None
    if weights_sha256 is None:
        st_model = _load_sentence_transformer(location)
        weights_sha256 = _state_dict_sha256(st_model)
    final = root / cache_key(weights_sha256, backend)
    if (final / MANIFEST_FILE).is_file():
        return final
    st_model = st_model or _load_sentence_transformer(location)
    pooling = _pooling_mode(st_model)
    config = st_model[0].auto_model.config
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        logger.info("building the %s text model from %s into %s", backend, location, final)
        _export_fp32(st_model, pooling, work / "exported.onnx")
        _fuse(work / "exported.onnx", work / "fused.onnx", config)
        if backend == "onnx-int8":
            _quantize_int8(work / "fused.onnx", work / MODEL_FILE, config.intermediate_size)
        else:
            (work / "fused.onnx").rename(work / MODEL_FILE)
        for scratch in ("exported.onnx", "fused.onnx"):
            (work / scratch).unlink(missing_ok=True)
        st_model.tokenizer.save_pretrained(str(work))
        manifest = {"backend": backend, "model_sha256": sha256_file(work / MODEL_FILE),
                    "weights_sha256": weights_sha256, "source": location, "pooling": pooling,
                    "max_seq_length": int(st_model.max_seq_length),
                    "do_lower_case": bool(getattr(st_model[0], "do_lower_case", False)),
                    "dim": int(config.hidden_size), "recipe": RECIPE_VERSION, "opset": OPSET,
                    "versions": build_versions()}
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            work.rename(final)
        except OSError:
            if not (final / MANIFEST_FILE).is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _load_sentence_transformer(location: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(location, device="cpu")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OnnxTextEncoder:
    """The ``onnx`` / ``onnx-int8`` backends (a :class:`~.encoders.TextEncoder`).

    ``encode`` removes duplicate texts, tokenises once, sorts by length and fills each batch up
    to ``tokens_per_batch`` tokens (at most ``batch_size`` rows), so short texts are not padded
    to long ones and long ones come in small batches that stay in cache.
    """

    device = "cpu"

    def __init__(self, name: str, backend: str = "onnx-int8",
                 batch_size: int = PipelineParams().text_batch_size,
                 tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, threads: int | None = None,
                 cache_dir: Path | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        if batch_size < 1 or tokens_per_batch < 1:
            raise ValueError("batch_size and tokens_per_batch must be >= 1")
        self.name = name
        self.backend = backend
        self.batch_size = batch_size
        self.tokens_per_batch = tokens_per_batch
        self.resolved = resolve_text_model(name)
        self.model_dir = build_fast_model(self.resolved.location, backend,
                                          self.resolved.weights_sha256, cache_dir)
        manifest: dict[str, Any] = json.loads((self.model_dir / MANIFEST_FILE).read_text())
        self.model_sha256: str = manifest["model_sha256"]
        self.dim = int(manifest["dim"])
        self.max_seq_length = int(manifest["max_seq_length"])
        self.do_lower_case = bool(manifest["do_lower_case"])
        self.dtype = "int8" if backend == "onnx-int8" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _cpu_count()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.model_dir / MODEL_FILE), options,
                                            providers=["CPUExecutionProvider"])

    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Index groups of the length-sorted texts whose padded size fits the token budget."""
        order = np.argsort(lengths, kind="stable")
        groups, start = [], 0
        while start < len(order):
            stop = start + 1
            # ascending lengths: the padded size of [start, stop] is rows * length of the last row
            while (stop < len(order) and stop - start < self.batch_size
                   and (stop - start + 1) * lengths[order[stop]] <= self.tokens_per_batch):
                stop += 1
            groups.append(order[start:stop])
            start = stop
        return groups

    def encode(self, texts: list[str]) -> np.ndarray:
        # sentence-transformers strips (and lower-cases for such models) before tokenising
        cleaned = [str(t).strip() for t in texts]
        if self.do_lower_case:
            cleaned = [t.lower() for t in cleaned]
        unique, inverse = np.unique(np.array(cleaned, dtype=object), return_inverse=True)
        out = np.zeros((len(unique), self.dim), dtype=np.float32)
        if len(unique) == 0:
            return out
        ids = self.tokenizer(list(unique), truncation=True, max_length=self.max_seq_length,
                             padding=False)["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        for group in self._batches(lengths):
            width = int(lengths[group].max())
            input_ids = np.full((len(group), width), self.pad_id, dtype=np.int64)
            mask = np.zeros_like(input_ids)
            for row, k in enumerate(group):
                input_ids[row, :lengths[k]] = ids[k]
                mask[row, :lengths[k]] = 1
            out[group] = self.session.run(None, {"input_ids": input_ids,
                                                 "attention_mask": mask})[0]
        return out[inverse.reshape(-1)]
