"""A synthetic catalogue in the text and image steps' output formats, with known clusters.

Used by the fusion tests and ``bench/bench_fusion.py``. Text vectors carry a text cluster label,
image vectors an independent image cluster label, so an image cluster is information that only
the image side has; or, with ``photos_show_text_cluster``, the photo shows the item's text
cluster (as a product photo shows what the title names), with its own noise. The image step's
files list ids in a different order than the text step and ``img.npy`` rows in yet another
order, as a real join by id must handle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..outputs import IMG_ARRAY, IMG_FAILURES, IMG_ITEMS, IMG_META, TXT_ARRAY, TXT_ITEMS, TXT_META
from ..storage import atomic_npy, write_json_atomic, write_parquet_atomic


@dataclass(frozen=True)
class SyntheticCatalogue:
    ids: list[str]               # text order
    text_label: np.ndarray       # [N]
    image_label: np.ndarray      # [N], -1 for items without an image
    has_image: np.ndarray        # [N] bool


def _unit_centres(seed: int, k: int, dim: int) -> np.ndarray:
    centres = np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _noisy(rng: np.random.Generator, centres: np.ndarray, noise: float) -> np.ndarray:
    dim = centres.shape[1]
    out = centres + (noise / np.sqrt(dim)) * rng.standard_normal(centres.shape).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def write_synthetic_catalogue(text_dir: str | os.PathLike, image_dir: str | os.PathLike, *,
                              n: int = 2000, image_fraction: float = 0.5, text_clusters: int = 8,
                              image_clusters: int = 8, text_dim: int = 384, img_dim: int = 512,
                              noise: float = 1.0, seed: int = 0, chunk: int = 50_000,
                              photos_show_text_cluster: bool = False,
                              image_noise: float | None = None) -> SyntheticCatalogue:
    """Write txt.* into ``text_dir`` and img.* (incl. an empty img_failures) into ``image_dir``.

    ``noise`` is the norm of the Gaussian noise added to a unit cluster centre (1.0: within-
    cluster cosine about 0.5, between clusters about 0); ``image_noise`` the photos' (default
    ``noise``). Vectors are generated in chunks so a
    large catalogue never needs more than one chunk in memory besides the memmaps.
    """
    rng = np.random.default_rng(seed)
    text_dir, image_dir = Path(text_dir), Path(image_dir)
    text_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"item-{i:07d}" for i in range(n)]
    text_label = rng.integers(0, text_clusters, n)
    has_image = rng.random(n) < image_fraction
    image_label = np.where(has_image, text_label if photos_show_text_cluster
                           else rng.integers(0, image_clusters, n), -1)

    t_centres = _unit_centres(seed + 1, text_clusters, text_dim)
    i_centres = _unit_centres(seed + 2, max(image_clusters, text_clusters), img_dim)
    with atomic_npy(text_dir / TXT_ARRAY, (n, text_dim)) as text:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            text[start:stop] = _noisy(rng, t_centres[text_label[start:stop]], noise)
    write_parquet_atomic(text_dir / TXT_ITEMS, pa.table({"id": ids}))
    write_json_atomic(text_dir / TXT_META, {"embed_dim": text_dim, "count": n,
                                                   "run_id": "synthetic", "normalized": True})

    with_image = np.flatnonzero(has_image)
    listed = rng.permutation(with_image)             # img_items order != text order
    m = len(listed)
    rows = rng.permutation(m)                        # img.npy row order != img_items order
    with atomic_npy(image_dir / IMG_ARRAY, (m, img_dim)) as image:
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            image[rows[start:stop]] = _noisy(rng, i_centres[image_label[listed[start:stop]]],
                                             noise if image_noise is None else image_noise)
    write_parquet_atomic(image_dir / IMG_ITEMS, pa.table({
        "id": [ids[i] for i in listed], "url": [f"http://127.0.0.1/{ids[i]}.jpg" for i in listed],
        "row": pa.array(rows, type=pa.int64())}))
    write_parquet_atomic(image_dir / IMG_FAILURES, pa.table({
        "id": pa.array([], pa.string()), "url": pa.array([], pa.string()),
        "reason": pa.array([], pa.string()), "http_status": pa.array([], pa.int32()),
        "attempts": pa.array([], pa.int32())}))
    write_json_atomic(image_dir / IMG_META, {"embed_dim": img_dim, "count": m,
                                                    "run_id": "synthetic"})
    return SyntheticCatalogue(ids=ids, text_label=text_label, image_label=image_label,
                              has_image=has_image)
