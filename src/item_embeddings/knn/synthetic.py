"""Clustered unit vectors with a low local dimension, for the kNN tests and ``bench/bench_knn.py``.

Real sentence and fused embeddings are not spread evenly over the sphere: items form topics of
very different sizes, and within a topic they vary along a few directions only (the local
intrinsic dimension of text embeddings is far below their 384 coordinates). Isotropic noise
around a few centres (``fusion.synthetic``) has the full dimension inside each cluster, which
makes every neighbour almost as far as any other and no index can find them; that is not what
a catalogue looks like. Here each topic has a centre and its own random ``latent_dim``-dimensional
subspace; an item is its topic's centre plus a Gaussian step in that subspace plus a little
isotropic noise, normalised.
"""

from __future__ import annotations

import numpy as np


def clustered_unit_vectors(n: int, dim: int, *, topics: int | None = None, latent_dim: int = 32,
                           spread: float = 0.9, noise: float = 0.5, size_sigma: float = 1.0,
                           common: float = 0.55, seed: int = 0) -> np.ndarray:
    """``[n, dim]`` float32 unit rows with topic structure (rows in random topic order).

    Args:
        n: Number of vectors.
        dim: Their dimension.
        topics: Number of topics (default ``n // 250``, at least 1).
        latent_dim: Dimension of each topic's subspace (the local dimension of the data).
        spread: Norm scale of the in-topic step relative to the unit centre.
        noise: Norm of the isotropic noise added to every item.
        size_sigma: Log-normal sigma of the topic sizes (0: equal sizes; 1: a few large topics
            and many small ones, as in a catalogue).
        common: Weight of one direction shared by every topic centre (sentence embeddings
            share one: their mean cosine is well above 0).
        seed: Random seed; the same arguments give the same array.
    """
    rng = np.random.default_rng(seed)
    topics = max(1, topics if topics is not None else n // 250)
    weights = rng.lognormal(0.0, size_sigma, topics)
    labels = rng.choice(topics, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), dtype=np.float32)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(topics + 1))
    latent_scale = spread / np.sqrt(latent_dim)
    shared = rng.standard_normal(dim).astype(np.float32)
    shared *= common / np.linalg.norm(shared)
    for topic in range(topics):
        rows = order[bounds[topic]:bounds[topic + 1]]
        if not len(rows):
            continue
        centre = rng.standard_normal(dim).astype(np.float32)
        centre = centre / np.linalg.norm(centre) + shared
        centre /= np.linalg.norm(centre)
        basis = rng.standard_normal((latent_dim, dim)).astype(np.float32) / np.sqrt(dim)
        steps = rng.standard_normal((len(rows), latent_dim)).astype(np.float32) * latent_scale
        jitter = rng.standard_normal((len(rows), dim)).astype(np.float32) * (noise / np.sqrt(dim))
        out[rows] = centre + steps @ basis + jitter
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out
