"""Modality mix: does a space rank items by what they are, or by whether they have a photo?

For the items with a photo and for those without, the share of their top-k neighbours that have
a photo. A space that ignores photos gives both groups about the base rate (the share of items
with a photo) or, where photos go with some kinds of item, the text space's shares. A space split
by photos gives the first group far more and the second far less (docs/fusion.md). The fusion
step measures it on its evaluation sample, the kNN step on its whole graphs, and the QA report
shows it per space with the category purity of each group; the fused space's shares should stay
within ``MIX_TOLERANCE`` of the text space's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

MIX_TOLERANCE = 0.10    # largest accepted gap between the fused and the text space's shares
# Fewer items in a group and its share is too noisy to judge (10 neighbours of 20 items: a
# standard error of about 0.05, half the tolerance).
MIN_GROUP_ITEMS = 20
GROUPS = ("with_photo", "without_photo")
_QUERY_BLOCK = 1024


def _group_means(values: np.ndarray, has_photo: np.ndarray) -> dict[str, float | None]:
    """Mean of ``values`` over the items with a photo and over those without (None: none)."""
    return {group: float(values[members].mean()) if members.any() else None
            for group, members in zip(GROUPS, (has_photo, ~has_photo))}


def photo_share(neighbours: np.ndarray, has_image: np.ndarray,
                query_rows: np.ndarray | None = None) -> dict[str, float | None]:
    """Per group, the mean share of an item's neighbours that have a photo.

    Args:
        neighbours: [Q, k] row indices into ``has_image`` (-1: no neighbour, not counted).
        has_image: [N] bool per row.
        query_rows: [Q] the rows whose neighbours these are (default: rows 0..Q-1).
    """
    rows = np.arange(len(neighbours)) if query_rows is None else np.asarray(query_rows)
    valid = neighbours >= 0
    photos = (has_image[np.where(valid, neighbours, 0)] & valid).sum(axis=1)
    share = photos / np.maximum(valid.sum(axis=1), 1)
    return _group_means(share, has_image[rows])


def modality_mix(neighbours: Mapping[str, np.ndarray], has_image: np.ndarray,
                 query_rows: np.ndarray | None = None) -> dict[str, Any]:
    """The photo share of each space's neighbours by group (:func:`photo_share`), with
    :func:`mix_summary`'s context."""
    rows = (np.arange(len(next(iter(neighbours.values())))) if query_rows is None
            else np.asarray(query_rows))
    return mix_summary({space: photo_share(nb, has_image, rows)
                        for space, nb in neighbours.items()},
                       has_image, rows, next(iter(neighbours.values())).shape[1])


def mix_summary(shares: Mapping[str, Mapping[str, float | None]], has_image: np.ndarray,
                query_rows: np.ndarray, k: int) -> dict[str, Any]:
    """Each space's photo shares by group with the base rate, the group sizes and the largest
    gap between the fused space's shares and the text space's (when both are given)."""
    has_image = np.asarray(has_image, dtype=bool)
    mix: dict[str, Any] = {
        "items": int(len(query_rows)), "k": int(k),
        "base_rate": float(has_image.mean()) if len(has_image) else None,
        "items_with_photo": int(has_image[query_rows].sum()),
        "items_without_photo": int((~has_image[query_rows]).sum()),
        "photo_share": {space: dict(values) for space, values in shares.items()},
        "tolerance": MIX_TOLERANCE,
    }
    mix["departure"] = departure(mix)
    return mix


def departure(mix: Mapping[str, Any]) -> float | None:
    """Largest |fused - text| photo share over the groups (None without both spaces)."""
    shares = mix.get("photo_share", {})
    if "text" not in shares or "fused" not in shares:
        return None
    gaps = [abs(shares["fused"][g] - shares["text"][g]) for g in GROUPS
            if shares["fused"].get(g) is not None and shares["text"].get(g) is not None]
    return max(gaps) if gaps else None


def mix_warning(mix: Mapping[str, Any] | None) -> str | None:
    """A sentence for operators when the fused space's photo shares depart from the text
    space's by more than the tolerance; None when they do not (or cannot be compared)."""
    gap = departure(mix) if mix else None
    if gap is None or gap <= MIX_TOLERANCE or not judged(mix):
        return None
    shares = mix["photo_share"]
    detail = "; ".join(
        f"items {group.replace('_', ' ')}: {shares['text'][group]:.2f} in the text space, "
        f"{shares['fused'][group]:.2f} in the fused space" for group in GROUPS
        if shares["text"].get(group) is not None and shares["fused"].get(group) is not None)
    return (f"the fused space sorts items by whether they have a photo: the share of top-"
            f"{mix['k']} neighbours with a photo departs from the text space's by {gap:.2f} "
            f"(more than {MIX_TOLERANCE:.2f}); {detail}")


def judged(mix: Mapping[str, Any]) -> bool:
    """Whether both groups have enough items for their shares to be compared."""
    return min(mix.get("items_with_photo", 0), mix.get("items_without_photo", 0)) >= \
        MIN_GROUP_ITEMS


def mix_metrics(mix: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics (experiment runs, KFP Metrics): ``photo_share_<space>_<group>``,
    ``photo_share_base`` and ``photo_share_departure``; missing values are left out."""
    out = {"photo_share_base": mix.get("base_rate"), "photo_share_departure": mix.get("departure")}
    for space, shares in mix.get("photo_share", {}).items():
        out.update({f"photo_share_{space}_{group}": shares.get(group) for group in GROUPS})
    return {k: float(v) for k, v in out.items() if v is not None}


def purity_by_group(neighbours: np.ndarray, labels: Sequence[Any], has_image: np.ndarray,
                    query_rows: np.ndarray) -> dict[str, float | None]:
    """Category purity of the neighbours (share with the query item's label) over all queries
    and per group. ``labels`` maps a row to its label (any indexable, e.g. a dict)."""
    valid = neighbours >= 0
    same = np.array([[valid[q, j] and labels[n] == labels[row] for j, n in enumerate(nb)]
                     for q, (row, nb) in enumerate(zip(query_rows, neighbours))], dtype=bool)
    purity = same.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return {"all": float(purity.mean()) if len(purity) else None,
            **_group_means(purity, np.asarray(has_image)[query_rows])}


def sample_neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """[n, k] exact top-k cosine neighbours of every row among the rows of ``vectors`` (a
    sample that fits in memory; rows need not be unit), in blocks of query rows."""
    x = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(vectors,
                                                                            np.float32)), dim=1)
    k = min(k, len(x) - 1)
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), _QUERY_BLOCK):
        scores = x[start:start + _QUERY_BLOCK] @ x.T
        own = torch.arange(start, start + len(scores))
        scores[own - start, own] = -torch.inf
        out[start:start + len(scores)] = scores.topk(k, dim=1).indices.numpy()
    return out
