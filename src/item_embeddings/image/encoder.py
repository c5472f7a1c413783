"""The image encoder: which open_clip model and weights, loaded once, encoding uint8 batches.

``image_model`` is an open_clip model name or a model config JSON file (local or gs://);
``image_pretrained`` a pretrained tag, a checkpoint file (local or gs://), or 'none' for random
weights (benchmarks and smoke runs).

Example::

    from item_embeddings.image import load_image_encoder
    encoder = load_image_encoder("ViT-B-32", "openai")
    pixels = encoder.decoder("fast")(jpeg_bytes)  # uint8 [224, 224, 3]
    vectors = encoder.encode(pixels[None])        # float32 [1, 512]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError, PipelineParams
from ..errors import MissingFileError
from ..runtime import cache_dir
from ..storage import cached_gcs_copy, is_gcs_uri, sha256_file
from .decoding import FAST, ImageDecoder

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_MODEL = PipelineParams().image_model
DEFAULT_IMAGE_PRETRAINED = PipelineParams().image_pretrained


def split_preprocess(preprocess) -> tuple[Callable, tuple[float, ...], tuple[float, ...]]:
    """Split open_clip's eval transform into its PIL part and the ToTensor + Normalize tail.

    The PIL part (resize, crop, RGB) runs in the decode pool and gives small uint8 arrays; the
    tail runs batched on the encoder's device, with the same float32 operations as ToTensor
    (``x / 255``) and Normalize (``(x - mean) / std``), so results equal the composed transform.
    """
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(preprocess, "transforms", []))
    cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    tail = steps[cut + 1:] if cut is not None else []
    if cut is None or len(tail) != 1 or not isinstance(tail[0], Normalize):
        raise ValueError(f"unsupported open_clip preprocessing (expected PIL steps, ToTensor, "
                         f"Normalize): {preprocess}")
    return (Compose(steps[:cut]), tuple(float(m) for m in tail[0].mean),
            tuple(float(s) for s in tail[0].std))


@dataclass(frozen=True)
class ResolvedImageModel:
    """What open_clip is asked to build, and where the weights came from."""

    model_name: str                  # a registered open_clip config name
    pretrained: str | None           # a tag, a local checkpoint file, or None (random weights)
    weights_sha256: str | None       # for checkpoint files
    quick_gelu: bool


def resolve_image_model(model_name: str, pretrained: str) -> ResolvedImageModel:
    """Resolve ``image_model`` / ``image_pretrained``.

    ``model_name`` is an open_clip model name, or a model config JSON file (local or gs://) that
    is registered under its file stem. ``pretrained`` is a pretrained tag of that model, a local
    checkpoint file, a gs:// checkpoint, or 'none'/'' for random weights (benchmarks).
    """
    import open_clip

    if model_name.endswith(".json"):
        path = cached_gcs_copy(model_name, "image_model_configs") if is_gcs_uri(model_name) \
            else Path(model_name).expanduser()
        if not path.is_file():
            raise MissingFileError(f"image_model config file not found: {model_name}")
        open_clip.add_model_config(str(path))
        model_name = path.stem
    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model_name!r}; e.g. "
                          f"{', '.join(open_clip.list_models()[:8])}, ... or a config .json file")
    tag = (pretrained or "").strip()
    if tag.lower() in ("", "none"):
        logger.warning("image_pretrained=%r: %s has random weights", pretrained, model_name)
        return ResolvedImageModel(model_name, None, None, False)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if tag_cfg:
        return ResolvedImageModel(model_name, tag, None, bool(tag_cfg.get("quick_gelu", False)))
    path = cached_gcs_copy(tag, "image_checkpoints") if is_gcs_uri(tag) \
        else Path(tag).expanduser()
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name))
        raise ConfigError(f"image_pretrained {pretrained!r} is neither a pretrained tag of "
                          f"{model_name} ({tags}) nor an existing checkpoint file")
    return ResolvedImageModel(model_name, str(path), sha256_file(path), False)


class ImageEncoder:
    """An open_clip image tower: uint8 [B, H, W, 3] -> float32 [B, dim], L2-normalised.

    fp16 autocast on CUDA, fp32 on CPU.
    """

    def __init__(self, model_name: str = DEFAULT_IMAGE_MODEL,
                 pretrained: str = DEFAULT_IMAGE_PRETRAINED, device: str | None = None):
        import open_clip
        import torch

        self.name = model_name
        self.pretrained = pretrained
        self.resolved = resolve_image_model(model_name, pretrained)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.resolved.model_name, pretrained=self.resolved.pretrained,
                force_quick_gelu=self.resolved.quick_gelu, device=self.device,
                cache_dir=str(cache_dir() / "open_clip"))  # the image bakes the weights there
        except (RuntimeError, OSError) as exc:
            if self.resolved.weights_sha256 is not None:  # a checkpoint file: nothing to add
                raise
            raise RuntimeError(
                f"cannot load open_clip weights {pretrained!r} for {model_name!r}: {exc}. "
                "They are downloaded on first use; offline, set image_pretrained to a local or "
                "gs:// checkpoint file (or 'none' for random weights in smoke runs).") from exc
        self.model = model.eval()
        self.pil_transform, mean, std = split_preprocess(preprocess)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.dim = int(model.visual.output_dim)
        self.dtype = "float16-autocast" if self.device.startswith("cuda") else "float32"
        size = open_clip.get_model_preprocess_cfg(model)["size"]  # int or (height, width)
        height, width = (size, size) if isinstance(size, int) else size
        self.input_size = (int(width), int(height))

    def decoder(self, mode: str = FAST) -> ImageDecoder:
        """Bytes -> this encoder's uint8 input, decoded as ``mode`` (``image_decode``) asks."""
        return ImageDecoder(self.pil_transform, self.input_size, mode)

    def encode(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div(255)        # = ToTensor
            x = x.sub(self._mean).div(self._std)                # = Normalize
            with torch.autocast("cuda", dtype=torch.float16,
                                enabled=self.device.startswith("cuda")):
                features = self.model.encode_image(x)
            features = F.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


def load_image_encoder(model_name: str = DEFAULT_IMAGE_MODEL,
                       pretrained: str = DEFAULT_IMAGE_PRETRAINED,
                       device: str | None = None) -> ImageEncoder:
    return ImageEncoder(model_name, pretrained, device=device)


def prefetch_pretrained(model_name: str = DEFAULT_IMAGE_MODEL,
                        pretrained: str = DEFAULT_IMAGE_PRETRAINED) -> bool:
    """Put a pretrained tag's weights in the cache the encoder reads, downloading them if needed.

    Returns False when ``pretrained`` is not an open_clip tag (a file, 'none'): nothing to fetch.
    Raises when they cannot be had (offline and not cached).
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        return False
    open_clip.pretrained.download_pretrained(cfg, cache_dir=str(cache_dir() / "open_clip"))
    return True
