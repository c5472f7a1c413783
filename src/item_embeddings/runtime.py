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
