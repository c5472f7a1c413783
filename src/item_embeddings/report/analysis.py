"""What the QA report computes: one pass per array (norms, samples, exact neighbours), pairwise
cosines, the PCA maps, the neighbours shown and the category legend. Everything that is drawn
comes from samples of fixed size, so time after the pass and the page's size do not grow with N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import PipelineParams
from ..modality import mix_warning, purity_by_group
from ..outputs import KNN_FUSED, KNN_TEXT
from ..progress import Progress
from ..verify import NORM_TOLERANCE
from .inputs import MISSING_CATEGORY, ItemRows, ReportInputError, RunInputs, read_item_rows

MAP_ROWS = 5000          # sampled rows per space: 2-D maps, categories of the legend
PAIR_ROWS = 2000         # of those, rows whose pairwise cosines are plotted (~2M pairs)
NEIGHBOUR_ITEMS = 12     # sample items of the neighbour table
TOP_NEIGHBOURS = 5       # neighbours shown per item and space
TOP_CATEGORIES = 9       # coloured categories of the maps (tab10 without its grey); others grey
SPACES = ("text", "image", "fused")
CHUNK_ROWS = 32768       # rows per read of an array (64 MiB at 512 float32 columns)
MIX_QUERIES = 2000       # sampled items whose graph neighbours give the purity by group


@dataclass
class SpaceScan:
    """What one pass over a space's array found."""

    count: int
    dim: int
    norms: np.ndarray           # [rows] L2 norm of every row (inf/NaN where not finite)
    sample: np.ndarray          # [s, dim] the sampled rows, in row order
    exact_rows: np.ndarray | None    # [q, TOP_NEIGHBOURS] exact neighbours of the queries, -1 pad
    exact_scores: np.ndarray | None  # [q, TOP_NEIGHBOURS] their cosines

    @property
    def nonfinite(self) -> int:
        return int((~np.isfinite(self.norms)).sum())

    @property
    def off_unit(self) -> int:
        finite = self.norms[np.isfinite(self.norms)]
        return int((np.abs(finite - 1.0) > NORM_TOLERANCE).sum())


def _keep_top(scores: np.ndarray, rows: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query (row of ``scores``), the ``top`` best candidates, best first (ties: lower row)."""
    if scores.shape[1] > top:
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        scores, rows = np.take_along_axis(scores, part, 1), np.take_along_axis(rows, part, 1)
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def scan_space(array: np.ndarray, sample_rows: np.ndarray, query_rows: np.ndarray | None,
               desc: str) -> SpaceScan:
    """Read ``array`` once in chunks: every row's norm, the rows ``sample_rows`` (sorted), and,
    with ``query_rows``, the exact top-TOP_NEIGHBOURS cosine neighbours of those rows (self
    excluded) among all rows."""
    n, dim = array.shape
    norms = np.empty(n, np.float32)
    sample = np.empty((len(sample_rows), dim), np.float32)
    queries = None
    if query_rows is not None:
        queries = np.asarray(array[query_rows], np.float32)
        with np.errstate(invalid="ignore"):  # a non-finite row: NaN cosines, dropped below
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        best_scores = np.empty((len(query_rows), 0), np.float32)
        best_rows = np.empty((len(query_rows), 0), np.int64)
    with Progress(n, desc) as progress, np.errstate(all="ignore"):
        for start in range(0, n, CHUNK_ROWS):
            stop = min(n, start + CHUNK_ROWS)
            block = np.asarray(array[start:stop], np.float32)
            norms[start:stop] = np.sqrt(np.einsum("ij,ij->i", block, block))
            lo, hi = np.searchsorted(sample_rows, (start, stop))
            sample[lo:hi] = block[sample_rows[lo:hi] - start]
            if queries is not None:
                cosines = (queries @ block.T) / norms[start:stop]
                cosines[~np.isfinite(cosines)] = -np.inf
                inside = (query_rows >= start) & (query_rows < stop)
                cosines[np.flatnonzero(inside), query_rows[inside] - start] = -np.inf  # self
                rows = np.broadcast_to(np.arange(start, stop), cosines.shape)
                best_scores, best_rows = _keep_top(np.hstack([best_scores, cosines]),
                                                   np.hstack([best_rows, rows]), TOP_NEIGHBOURS)
            progress.update(stop - start)
    exact_rows = exact_scores = None
    if queries is not None:
        exact_rows = np.where(np.isfinite(best_scores), best_rows, -1)
        exact_scores = best_scores
    return SpaceScan(count=n, dim=dim, norms=norms, sample=sample, exact_rows=exact_rows,
                     exact_scores=exact_scores)


def _unit_finite(vectors: np.ndarray) -> np.ndarray:
    """The rows that are finite and non-zero, scaled to norm 1."""
    norms = np.linalg.norm(vectors, axis=1)
    keep = np.isfinite(norms) & (norms > 0)
    return vectors[keep] / norms[keep, None]


def pairwise_cosines(sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cosines of every pair among up to PAIR_ROWS rows drawn from ``sample``."""
    unit = _unit_finite(sample)
    if len(unit) > PAIR_ROWS:
        unit = unit[rng.choice(len(unit), PAIR_ROWS, replace=False)]
    sims = unit @ unit.T
    return sims[np.triu_indices(len(unit), 1)]


def pca_2d(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of ``sample`` that are finite, projected on their first two principal axes.

    Returns the [s, 2] coordinates, the boolean mask of rows kept and the share of variance of
    each axis. PCA (exact: eigenvectors of the [dim, dim] covariance) rather than t-SNE/UMAP:
    deterministic, well under a second for 5k rows, no extra dependency, and linear, so
    distances along its axes mean the same in every run.
    """
    keep = np.isfinite(sample).all(axis=1)
    x = sample[keep].astype(np.float64)
    if len(x) < 2:
        return np.zeros((len(x), 2)), keep, np.zeros(2)
    x -= x.mean(axis=0)
    variance, vectors = np.linalg.eigh(x.T @ x)
    top = np.argsort(variance)[::-1][:2]
    axes = vectors[:, top].T
    # a fixed sign per axis (its largest loading positive), so a rerun draws the same picture
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    coords = np.zeros((len(x), 2))
    coords[:, :len(axes)] = x @ axes.T
    share = np.zeros(2)
    total = variance.clip(min=0).sum()
    if total > 0:
        share[:len(top)] = variance[top].clip(min=0) / total
    return coords, keep, share


@dataclass
class Neighbours:
    """The neighbour table's content: per query item and space, rows and cosines, best first."""

    source: str                                   # "graph" or "exact"
    rows: dict[str, np.ndarray]                   # space -> [q, TOP_NEIGHBOURS], -1 = none
    scores: dict[str, np.ndarray]
    exact_overlap: dict[str, tuple[int, int]]     # graph only: space -> (shared, compared)


def pick_neighbours(inputs: RunInputs, scans: dict[str, SpaceScan], queries: np.ndarray
                    ) -> Neighbours:
    """The kNN graph's top neighbours of ``queries`` when there is a graph, else the exact ones
    found by the pass over all rows; with a graph, also how many it shares with the exact ones."""
    exact_rows = {s: scans[s].exact_rows for s in ("text", "fused")}
    exact_scores = {s: scans[s].exact_scores for s in ("text", "fused")}
    knn = inputs.knn
    if knn is None or set(knn.neighbours) != {"text", "fused"}:
        return Neighbours("exact", exact_rows, exact_scores, {})
    rows, scores, overlap = {}, {}, {}
    for space in ("text", "fused"):
        graph = np.asarray(knn.neighbours[space][queries], np.int64)[:, :TOP_NEIGHBOURS]
        bad = (graph < -1) | (graph >= inputs.count)
        if bad.any():
            raise ReportInputError(f"{KNN_TEXT if space == 'text' else KNN_FUSED} holds row "
                                   f"{graph[bad][0]} outside [0, {inputs.count})")
        rows[space] = graph
        scores[space] = np.asarray(knn.scores[space][queries], np.float32)[:, :TOP_NEIGHBOURS]
        shared = sum(len(set(g[g >= 0]) & set(e[e >= 0]))
                     for g, e in zip(graph, exact_rows[space]))
        overlap[space] = (shared, int((exact_rows[space] >= 0).sum()))
    return Neighbours("graph", rows, scores, overlap)


def _sample(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(size, n), replace=False)) if n else np.empty(0, int)


def category_legend(labels: Sequence[str]) -> list[tuple[str, int]]:
    """The TOP_CATEGORIES most frequent labels with their counts (ties: alphabetical)."""
    values, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i]))
    return [(str(values[i]), int(counts[i])) for i in order[:TOP_CATEGORIES]]


@dataclass
class MapPanel:
    space: str
    coords: np.ndarray      # [s, 2]
    labels: list[str]       # category label per point ('' when there are no categories)
    share: np.ndarray       # variance share of the two axes


@dataclass
class ModalityMix:
    """The modality mix shown: photo shares by group (modality.py) and, with categories and a
    kNN graph, the category purity of each space's neighbours by group."""

    mix: dict | None                    # modality.modality_mix's dict, None if not recorded
    source: str                         # "graph", "fusion sample" or "none"
    purity: dict[str, dict] | None      # space -> {"all", "with_photo", "without_photo"}
    purity_items: int                   # sampled items the purity is measured on
    warning: str | None                 # modality.mix_warning of ``mix``


def modality_rows(inputs: RunInputs, params: PipelineParams) -> np.ndarray:
    """The items whose graph neighbours the purity by group is measured on (sorted; none
    without a graph of both spaces)."""
    knn = inputs.knn
    if knn is None or set(knn.neighbours) != {"text", "fused"}:
        return np.empty(0, np.int64)
    return _sample(np.random.default_rng([params.seed, 3]), inputs.count, MIX_QUERIES)


def modality_mix_of(inputs: RunInputs, items: ItemRows, rows: np.ndarray) -> ModalityMix:
    """The kNN step's mix (every item) or else the fusion step's (its sample), and the purity by
    group of the graph neighbours of ``rows`` when the items table has categories."""
    knn_mix = inputs.knn.meta.get("modality_mix") if inputs.knn is not None else None
    mix = knn_mix or inputs.fusion_meta.get("modality_mix")
    source = "graph" if knn_mix else "fusion sample" if mix else "none"
    purity = None
    if items.categories is not None and len(rows):
        purity = {space: purity_by_group(np.asarray(inputs.knn.neighbours[space][rows]),
                                         items.categories, inputs.has_image, rows)
                  for space in ("text", "fused")}
    return ModalityMix(mix, source, purity, len(rows), mix_warning(mix))


@dataclass
class Findings:
    """Everything the page shows about one run."""

    inputs: RunInputs
    items: ItemRows
    scans: dict[str, SpaceScan]
    cosines: dict[str, np.ndarray]     # space -> pairwise cosines of sampled rows
    panels: list[MapPanel]
    legend: list[tuple[str, int]]      # coloured categories and their sampled counts
    queries: np.ndarray                # rows of the neighbour table's items
    neighbours: Neighbours
    text_sample: np.ndarray            # sampled rows of the text (and fused) space
    modality: ModalityMix


def analyse_run(inputs: RunInputs, items_uri: str, params: PipelineParams) -> Findings:
    """Sample (seeded by ``params.seed``), read each array once, find the neighbours shown,
    read the titles and categories of the rows shown, and project the samples to 2-D."""
    n = inputs.count
    rng = np.random.default_rng(params.seed)
    text_sample = _sample(rng, n, MAP_ROWS)
    queries = _sample(rng, n, NEIGHBOUR_ITEMS)
    image_sample = _sample(rng, inputs.arrays["image"].shape[0], MAP_ROWS)
    scans = {
        "text": scan_space(inputs.arrays["text"], text_sample, queries, "qa report: text"),
        "image": scan_space(inputs.arrays["image"], image_sample, None, "qa report: image"),
        "fused": scan_space(inputs.arrays["fused"], text_sample, queries, "qa report: fused"),
    }
    found = pick_neighbours(inputs, scans, queries)
    sample_text_rows = {"text": text_sample, "fused": text_sample,
                        "image": inputs.image_text_rows[image_sample]}
    mix_rows = modality_rows(inputs, params)
    mix_neighbours = [np.asarray(inputs.knn.neighbours[s][mix_rows]).ravel()
                      for s in ("text", "fused")] if len(mix_rows) else []
    for space, graph in zip(("text", "fused"), mix_neighbours):
        bad = (graph < -1) | (graph >= n)
        if bad.any():
            raise ReportInputError(f"{KNN_TEXT if space == 'text' else KNN_FUSED} holds row "
                                   f"{graph[bad][0]} outside [0, {n})")
    shown = np.unique(np.concatenate([queries, *sample_text_rows.values(), mix_rows,
                                      *mix_neighbours,
                                      *(r.ravel() for r in found.rows.values())]))
    items = read_item_rows(items_uri, params, shown[shown >= 0], inputs.ids)
    panels = []
    for space in SPACES:
        coords, keep, share = pca_2d(scans[space].sample)
        rows = sample_text_rows[space][keep].tolist()
        labels = ([items.categories.get(r, MISSING_CATEGORY) for r in rows]
                  if items.categories is not None else [""] * len(rows))
        panels.append(MapPanel(space, coords, labels, share))
    return Findings(
        inputs=inputs, items=items, scans=scans,
        cosines={s: pairwise_cosines(scans[s].sample, rng) for s in SPACES}, panels=panels,
        legend=category_legend(panels[0].labels) if items.categories is not None else [],
        queries=queries, neighbours=found, text_sample=text_sample,
        modality=modality_mix_of(inputs, items, mix_rows))
