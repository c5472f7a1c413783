"""The QA report of a run: one self-contained HTML page (``qa_report.html``, docs/report.md).

Every plot is a PNG drawn with matplotlib and inlined as a base64 ``data:`` URI, the CSS is
inline, and there is no script, font or link to anything outside the page, so it can be opened
from disk, mailed, or shown by the Vertex AI UI as an ``HTML`` artifact.

Memory and time stay bounded whatever the catalogue size: each array is read once, in chunks of
rows (norms of every row, a seeded sample of rows, exact neighbours of a dozen sample items), and
everything drawn comes from samples of fixed size, so the page weighs the same at 5k and 500k
items. Item data (ids, titles, categories, URLs) is untrusted and HTML-escaped everywhere.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import html
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import PipelineParams
from .items import ItemsError, iter_batches, open_items
from .outputs import (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, IMG_ARRAY, IMG_FAILURES,
                      IMG_ITEMS, IMG_META, KNN_FUSED, KNN_FUSED_SCORES, KNN_META, KNN_TEXT,
                      KNN_TEXT_SCORES, TXT_ARRAY, TXT_ITEMS, TXT_META)
from .progress import Progress
from .runtime import package_versions
from .storage import atomic_path
from .verify import NORM_TOLERANCE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

MAP_ROWS = 5000          # sampled rows per space: 2-D maps, categories of the legend
PAIR_ROWS = 2000         # of those, rows whose pairwise cosines are plotted (~2M pairs)
NEIGHBOUR_ITEMS = 12     # sample items of the neighbour table
TOP_NEIGHBOURS = 5       # neighbours shown per item and space
TOP_CATEGORIES = 9       # coloured categories of the maps (tab10 without its grey); others grey
CHUNK_ROWS = 32768       # rows per read of an array (64 MiB at 512 float32 columns)
MAX_EPOCH_ROWS = 20      # the training table lists every epoch up to this many
LABEL_CHARS = 40         # categories are cut to this length in legends
DPI = 80
NORM_PLOT_SPAN = 1e-6    # the norm histograms span at least 1 ± this

SECTIONS = (
    ("summary", "Summary and coverage"),
    ("failures", "Image failures by reason"),
    ("distributions", "Distributions per space"),
    ("maps", "2-D maps per space"),
    ("neighbours", "Neighbours: text vs fused"),
    ("training", "Fusion training curve"),
    ("knn", "kNN graph and recall"),
    ("run", "Run parameters and versions"),
)
SPACES = ("text", "image", "fused")
MISSING_CATEGORY = "(missing)"
OTHER_COLOUR = "#c8c8c8"
# tab10 without its grey, which is reserved for the categories not in the legend
CATEGORY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                    "#e377c2", "#bcbd22", "#17becf")
SPACE_COLOURS = {"text": "#1f77b4", "image": "#ff7f0e", "fused": "#2ca02c"}


class ReportInputError(ValueError):
    """The step outputs cannot be reported on; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- reading the inputs


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReportInputError(f"{path} not found (the step's meta file is written last: did "
                               "the step finish?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path} is not valid JSON: {exc}") from None


def _read_table(path: Path, columns: Sequence[str]) -> pa.Table:
    if not path.is_file():
        raise ReportInputError(f"{path} not found")
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ReportInputError(f"{path} has no column(s) {', '.join(missing)}")
    return pq.read_table(path, columns=list(columns))


def _open_array(path: Path, rows: int, id_file: str) -> np.ndarray:
    if not path.is_file():
        raise ReportInputError(f"{path} not found")
    array = np.load(path, mmap_mode="r")
    if array.ndim != 2 or array.shape[0] != rows:
        raise ReportInputError(f"{path} has shape {array.shape}, but {id_file} lists {rows} "
                               "rows")
    return array


@dataclass
class KnnGraph:
    meta: dict[str, Any]
    neighbours: dict[str, np.ndarray]   # space -> [N, k] int32 rows (memory-mapped)
    scores: dict[str, np.ndarray]       # space -> [N, k] float32 (memory-mapped)


@dataclass
class RunInputs:
    """The step outputs the report reads, opened (arrays memory-mapped) and cross-checked."""

    ids: pa.ChunkedArray                # text order = items order = fused order = kNN rows
    text_meta: dict[str, Any]
    image_meta: dict[str, Any]
    fusion_meta: dict[str, Any]
    arrays: dict[str, np.ndarray]       # space -> memory-mapped array
    has_image: np.ndarray               # [N] bool, fused_items.parquet
    image_text_rows: np.ndarray         # [M] the text row of each img.npy row
    failures: pa.Table                  # img_failures.parquet (empty when absent)
    knn: KnnGraph | None

    @property
    def count(self) -> int:
        return len(self.ids)


def _image_text_rows(img_items: pa.Table, ids: pa.ChunkedArray, path: Path) -> np.ndarray:
    """For every img.npy row, the row of its id in txt_items.parquet."""
    rows = img_items.column("row").to_numpy()
    m = len(rows)
    if m and (rows.min() < 0 or rows.max() >= m or len(np.unique(rows)) != m):
        raise ReportInputError(f"{path}: 'row' must list each img.npy row in [0, {m}) once")
    position = pc.index_in(img_items.column("id"), value_set=ids)
    if position.null_count:
        unknown = img_items.column("id").filter(pc.is_null(position))[:5].to_pylist()
        raise ReportInputError(f"{position.null_count} id(s) of {path} are not in {TXT_ITEMS}, "
                               f"e.g. {unknown}")
    out = np.empty(m, np.int64)
    out[rows] = position.to_numpy(zero_copy_only=False)
    return out


def _open_knn(knn_dir: str | os.PathLike | None, count: int) -> KnnGraph | None:
    """The kNN graph, or None when ``knn_dir`` is not given or holds no finished graph."""
    if not knn_dir or not (Path(knn_dir) / KNN_META).is_file():
        return None
    root = Path(knn_dir)
    meta = _read_json(root / KNN_META)
    if meta.get("count") != count:
        raise ReportInputError(f"{root / KNN_META} count is {meta.get('count')}, but "
                               f"{TXT_ITEMS} lists {count} items (a graph of another run?)")
    neighbours, scores = {}, {}
    for space, index_file, score_file in (("text", KNN_TEXT, KNN_TEXT_SCORES),
                                          ("fused", KNN_FUSED, KNN_FUSED_SCORES)):
        if space not in meta.get("spaces", {}):
            continue
        neighbours[space] = _open_array(root / index_file, count, TXT_ITEMS)
        scores[space] = _open_array(root / score_file, count, TXT_ITEMS)
        if scores[space].shape != neighbours[space].shape:
            raise ReportInputError(f"{root / score_file} has shape {scores[space].shape}, "
                                   f"{index_file} {neighbours[space].shape}")
    return KnnGraph(meta=meta, neighbours=neighbours, scores=scores)


def load_run_inputs(text_dir: str | os.PathLike, image_dir: str | os.PathLike,
                    fused_dir: str | os.PathLike, knn_dir: str | os.PathLike | None
                    ) -> RunInputs:
    """Open the steps' outputs (docs/outputs.md) and check that they line up.

    Raises:
        ReportInputError: a file is missing, or counts/ids of two files disagree.
    """
    text_dir, image_dir, fused_dir = Path(text_dir), Path(image_dir), Path(fused_dir)
    text_meta = _read_json(text_dir / TXT_META)
    image_meta = _read_json(image_dir / IMG_META)
    fusion_meta = _read_json(fused_dir / FUSION_CONFIG)
    ids = _read_table(text_dir / TXT_ITEMS, ["id"]).column("id")
    n = len(ids)
    fused_items = _read_table(fused_dir / FUSED_ITEMS, ["id", "has_image"])
    if fused_items.num_rows != n or not fused_items.column("id").equals(ids):
        raise ReportInputError(f"{fused_dir / FUSED_ITEMS} does not list the ids of "
                               f"{text_dir / TXT_ITEMS} in the same order")
    img_items = _read_table(image_dir / IMG_ITEMS, ["id", "row"])
    failures_path = image_dir / IMG_FAILURES
    failures = (pq.read_table(failures_path) if failures_path.is_file()
                else pa.table({"id": pa.array([], ids.type), "reason": pa.array([], pa.string())}))
    arrays = {"text": _open_array(text_dir / TXT_ARRAY, n, TXT_ITEMS),
              "image": _open_array(image_dir / IMG_ARRAY, img_items.num_rows, IMG_ITEMS),
              "fused": _open_array(fused_dir / FUSED_ARRAY, n, FUSED_ITEMS)}
    return RunInputs(
        ids=ids, text_meta=text_meta, image_meta=image_meta, fusion_meta=fusion_meta,
        arrays=arrays, has_image=fused_items.column("has_image").to_numpy(zero_copy_only=False),
        image_text_rows=_image_text_rows(img_items, ids, image_dir / IMG_ITEMS),
        failures=failures, knn=_open_knn(knn_dir, n))


# ----------------------------------------------------------------------- one pass per array


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
    each axis. PCA (exact, numpy SVD) rather than t-SNE/UMAP: deterministic, a second for 5k
    rows, no extra dependency, and its axes mean the same on every run of the same vectors.
    """
    keep = np.isfinite(sample).all(axis=1)
    x = sample[keep].astype(np.float64)
    if len(x) < 2:
        return np.zeros((len(x), 2)), keep, np.zeros(2)
    x -= x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    coords = x @ axes.T
    if coords.shape[1] < 2:
        coords = np.hstack([coords, np.zeros((len(coords), 2 - coords.shape[1]))])
    variance = s ** 2
    share = np.zeros(2)
    share[:len(axes)] = variance[:2] / variance.sum() if variance.sum() > 0 else 0
    return coords, keep, share


# ---------------------------------------------------------------------------- the items table


@dataclass
class ItemRows:
    """Title and category of the items table rows the report shows."""

    titles: dict[int, str | None]
    categories: dict[int, str] | None   # None when the table has no category column
    category_column: str


def category_label(value: Any) -> str:
    """A category value as one label (a list, e.g. an Amazon category path, joined by ' > ')."""
    if value is None:
        return MISSING_CATEGORY
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value if v is not None]
        return " > ".join(parts) if parts else MISSING_CATEGORY
    text = str(value).strip()
    return text or MISSING_CATEGORY


def read_item_rows(items_uri: str, params: PipelineParams, rows: np.ndarray,
                   ids: pa.ChunkedArray) -> ItemRows:
    """Stream the items table and keep the titles (and categories) of ``rows`` (sorted, unique),
    checking that the table's ids are those of ``txt_items.parquet`` at these rows.

    Raises:
        ItemsError: the table has no id or title column.
        ReportInputError: the table does not have the text step's rows and ids.
    """
    schema = open_items(items_uri).schema
    for column in (params.id_column, params.title_column):
        if column not in schema.names:
            raise ItemsError(f"items table {items_uri} has no column {column!r}; columns "
                             f"present: {', '.join(schema.names)}")
    has_category = params.category_column in schema.names
    columns = [params.id_column, params.title_column]
    if has_category:
        columns.append(params.category_column)
    titles: dict[int, str | None] = {}
    categories: dict[int, str] = {}
    offset = 0
    with Progress(len(ids), "qa report: items table") as progress:
        for batch in iter_batches(items_uri, columns):
            lo, hi = np.searchsorted(rows, (offset, offset + batch.num_rows))
            local = pa.array(rows[lo:hi] - offset)
            picked = batch.take(local)
            expected = ids.take(pa.array(rows[lo:hi])).to_pylist()
            for row, got, want in zip(rows[lo:hi], picked.column(0).to_pylist(), expected):
                if got != want:
                    raise ReportInputError(
                        f"items table {items_uri} row {row} has id {got!r}, but {TXT_ITEMS} "
                        f"row {row} is {want!r}: the report needs the table the run embedded")
            titles.update(zip(rows[lo:hi].tolist(), picked.column(1).to_pylist()))
            if has_category:
                categories.update(zip(rows[lo:hi].tolist(),
                                      map(category_label, picked.column(2).to_pylist())))
            offset += batch.num_rows
            progress.update(batch.num_rows)
    if offset != len(ids):
        raise ReportInputError(f"items table {items_uri} has {offset} rows, {TXT_ITEMS} "
                               f"{len(ids)}: the report needs the table the run embedded")
    return ItemRows(titles=titles, categories=categories if has_category else None,
                    category_column=params.category_column)


# ------------------------------------------------------------------------------------ plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot): no global backend or figure registry; PNGs are drawn by Agg.
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _drawn(plot: Callable[..., Any]) -> Callable[..., bytes]:
    """Make a function that builds a matplotlib figure return it as PNG bytes."""

    @functools.wraps(plot)
    def draw(*args: Any, **kwargs: Any) -> bytes:
        import matplotlib

        # Labels are item data (categories, reasons): never read '$...$' in them as math.
        with matplotlib.rc_context({"text.parse_math": False}):
            fig = plot(*args, **kwargs)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()

    return draw


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "…"


@_drawn
def plot_coverage(parts: Sequence[tuple[str, int]], total: int) -> "Figure":
    """One horizontal bar of the items split by image outcome."""
    fig = _figure(9, 1.9)
    ax = fig.add_subplot()
    left = 0
    colours = ("#2ca02c", "#d62728", "#9e9e9e", "#c8c8c8", "#ffbf00")
    for (label, value), colour in zip(parts, colours):
        share = 100.0 * value / total if total else 0.0
        ax.barh([0], [share], left=left, color=colour, label=f"{label}: {value:,} ({share:.1f}%)")
        left += share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of items")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncols=len(parts), frameon=False,
              fontsize=9)
    return fig


@_drawn
def plot_failures(reasons: Sequence[tuple[str, int]]) -> "Figure":
    fig = _figure(8, 0.45 * len(reasons) + 1.2)
    ax = fig.add_subplot()
    labels = [r for r, _ in reasons][::-1]
    counts = [c for _, c in reasons][::-1]
    bars = ax.barh(labels, counts, color="#d62728")
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3, fontsize=9)
    ax.set_xlabel("items")
    ax.set_title("Image failures by reason")
    ax.margins(x=0.12)
    return fig


@_drawn
def plot_norms(norms: dict[str, np.ndarray]) -> "Figure":
    fig = _figure(12, 2.8)
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    for ax, (space, values) in zip(axes, norms.items()):
        # float32 norms of unit vectors differ from 1 by a few ulps: plot the deviation, over
        # at least ±1e-6, so the bins stay finite-sized
        deviation = values[np.isfinite(values)].astype(np.float64) - 1.0
        if len(deviation):
            low = min(deviation.min(), -NORM_PLOT_SPAN)
            high = max(deviation.max(), NORM_PLOT_SPAN)
            ax.hist(deviation, bins=60, range=(low, high), color=SPACE_COLOURS[space])
        else:
            ax.text(0.5, 0.5, "no vectors", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{space}: L2 norm of {len(values):,} rows")
        ax.set_xlabel("norm − 1")
        ax.tick_params(axis="x", labelrotation=20)
    axes[0].set_ylabel("rows")
    return fig


@_drawn
def plot_pairwise(cosines: dict[str, np.ndarray]) -> "Figure":
    fig = _figure(9, 3.6)
    ax = fig.add_subplot()
    for space, values in cosines.items():
        if len(values):
            ax.hist(values, bins=100, range=(-1, 1), density=True, histtype="step", linewidth=1.6,
                    color=SPACE_COLOURS[space], label=f"{space} ({len(values):,} pairs)")
    ax.set_xlabel("cosine similarity of two random items")
    ax.set_ylabel("density")
    ax.set_xlim(-1, 1)
    ax.legend()
    ax.set_title("Pairwise cosine similarity per space")
    return fig


@dataclass
class MapPanel:
    space: str
    coords: np.ndarray      # [s, 2]
    labels: list[str]       # category label per point ('' when there are no categories)
    share: np.ndarray       # variance share of the two axes


@_drawn
def plot_maps(panels: Sequence[MapPanel], legend: Sequence[tuple[str, int]]) -> "Figure":
    """The PCA maps side by side; points of the ``legend`` categories coloured, others grey."""
    fig = _figure(5 * len(panels) + 2.5, 5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colour_of = {label: colour for (label, _), colour in zip(legend, CATEGORY_COLOURS)}
    handles = {}
    for ax, panel in zip(axes, panels):
        colours = [colour_of.get(label, OTHER_COLOUR) for label in panel.labels]
        if not legend:
            colours = [SPACE_COLOURS[panel.space]] * len(panel.labels)
        others = np.array([c == OTHER_COLOUR for c in colours], bool)
        ax.scatter(panel.coords[others, 0], panel.coords[others, 1], s=4, c=OTHER_COLOUR,
                   linewidths=0, rasterized=True)
        shown = ~others
        if shown.any():
            ax.scatter(panel.coords[shown, 0], panel.coords[shown, 1], s=5, alpha=0.7,
                       c=[c for c, keep in zip(colours, shown) if keep], linewidths=0)
        ax.set_title(f"{panel.space}: {len(panel.coords):,} sampled items")
        ax.set_xlabel(f"PC1 ({100 * panel.share[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * panel.share[1]:.1f}%)")
        ax.set_xticks([])
        ax.set_yticks([])
        if not len(panel.coords):
            ax.text(0.5, 0.5, "no vectors", ha="center", va="center", transform=ax.transAxes)
    if legend:
        from matplotlib.lines import Line2D

        for (label, count), colour in zip(legend, CATEGORY_COLOURS):
            handles[f"{_short(label)} ({count:,})"] = Line2D(
                [], [], marker="o", linestyle="", color=colour)
        handles["other categories"] = Line2D([], [], marker="o", linestyle="",
                                             color=OTHER_COLOUR)
        fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize=9,
                   title="category (sampled items)")
    return fig


@_drawn
def plot_training(history: Sequence[dict[str, float]]) -> "Figure":
    keys = ("loss", "sim_loss", "norm_loss")
    fig = _figure(12, 3)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    epochs = np.arange(1, len(history) + 1)
    for ax, key in zip(axes, keys):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", color="#1f77b4")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("mean loss over the epoch")
    return fig


@_drawn
def plot_neighbour_scores(scores: dict[str, np.ndarray], k: int) -> "Figure":
    fig = _figure(6 * len(scores), 3.2)
    axes = fig.subplots(1, len(scores), squeeze=False)[0]
    for ax, (space, values) in zip(axes, scores.items()):
        for column, label, colour in ((0, "1st neighbour", "#1f77b4"),
                                      (values.shape[1] - 1, f"neighbour {k}", "#ff7f0e")):
            col = values[:, column]
            col = col[np.isfinite(col)]
            if len(col):
                ax.hist(col, bins=60, histtype="step", linewidth=1.6, color=colour, label=label)
        ax.set_title(f"{space}: cosine to the graph's neighbours ({len(values):,} sampled items)")
        ax.set_xlabel("cosine similarity")
        ax.legend()
    axes[0].set_ylabel("items")
    return fig


# ------------------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """A value for a table cell (escaped)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not np.isfinite(value):
            return _e(value)
        return f"{value:,.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, (dict, list)):
        return _e(json.dumps(value, sort_keys=True, default=str))
    return _e(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; every header and cell is escaped (cells formatted by :func:`_fmt`)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"></figure>'


def _p(text: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{_e(text)}</p>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1400px;padding:0 24px 48px;color:#222;line-height:1.45}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:40px}
table{border-collapse:collapse;margin:12px 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}
figure{margin:12px 0}img{max-width:100%;height:auto}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:6px 18px}
.meta,.note{color:#555}.note{font-style:italic}
.ok{color:#1a7f37;font-weight:600}.warn{color:#b3261e;font-weight:600}.info{color:#555}
table.neighbours td{width:33%}table.neighbours ol{margin:0;padding-left:22px}
.cat{color:#777;font-size:12px}.score{color:#777;font-size:12px}.both{font-weight:600}
.id{color:#777;font-size:12px;font-family:ui-monospace,monospace}
"""


@dataclass
class Check:
    name: str
    value: str
    status: str   # "ok", "warn" or "info"


def _checks_table(checks: Sequence[Check]) -> str:
    rows = "".join(f'<tr><td>{_e(c.name)}</td><td>{_e(c.value)}</td>'
                   f'<td class="{c.status}">{c.status.upper()}</td></tr>' for c in checks)
    return ("<table><thead><tr><th>check</th><th>found</th><th>result</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _section(key: str, body: str) -> str:
    title = dict(SECTIONS)[key]
    return f'<section id="{key}"><h2>{_e(title)}</h2>\n{body}\n</section>\n'


# --------------------------------------------------------------------------- the sections


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


def _title_html(items: ItemRows, row: int) -> str:
    title = items.titles.get(row)
    text = f"{_e(title)}" if title else '<span class="note">(no title)</span>'
    if items.categories is not None:
        text += f' <span class="cat">[{_e(items.categories.get(row, MISSING_CATEGORY))}]</span>'
    return text


def _neighbour_list(items: ItemRows, rows: np.ndarray, scores: np.ndarray,
                    other: set[int]) -> str:
    entries = []
    for row, score in zip(rows.tolist(), scores.tolist()):
        if row < 0:
            continue
        cls = ' class="both"' if row in other else ""
        entries.append(f"<li{cls}>{_title_html(items, row)} "
                       f'<span class="score">{score:.3f}</span></li>')
    return f"<ol>{''.join(entries)}</ol>" if entries else '<span class="note">none</span>'


def neighbours_section(inputs: RunInputs, items: ItemRows, queries: np.ndarray,
                       found: Neighbours) -> str:
    if found.source == "graph":
        source = ("Neighbours are read from the kNN graph (knn_text.npy, knn_fused.npy). "
                  + "; ".join(f"on these items the graph shares {s} of the {c} exact top-"
                              f"{TOP_NEIGHBOURS} {space} neighbours"
                              for space, (s, c) in found.exact_overlap.items()) + ".")
    else:
        source = (f"No kNN graph was given: neighbours are exact, found by brute force over all "
                  f"{inputs.count:,} items.")
    rows = []
    for q, row in enumerate(queries.tolist()):
        text, fused = found.rows["text"][q], found.rows["fused"][q]
        shared = set(text[text >= 0].tolist()) & set(fused[fused >= 0].tolist())
        image = "with image" if inputs.has_image[row] else "no image"
        rows.append(
            f"<tr><td>{_title_html(items, row)}<br>"
            f"<span class=\"id\">{_e(inputs.ids[row].as_py())}</span> "
            f"<span class=\"cat\">{image}; {len(shared)} of {TOP_NEIGHBOURS} shared</span></td>"
            f"<td>{_neighbour_list(items, text, found.scores['text'][q], shared)}</td>"
            f"<td>{_neighbour_list(items, fused, found.scores['fused'][q], shared)}</td></tr>")
    table = ('<table class="neighbours"><thead><tr><th>item</th>'
             f"<th>top-{TOP_NEIGHBOURS} in the text space</th>"
             f"<th>top-{TOP_NEIGHBOURS} in the fused space</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    how = (f"{len(queries)} items drawn at random (seeded). Bold neighbours are in both lists; "
           "the grey number is the cosine similarity; [brackets] hold the category.")
    return _p(source) + _p(how, "note") + table


def _image_counts(inputs: RunInputs) -> dict[str, int | None]:
    meta = inputs.image_meta
    embedded = inputs.arrays["image"].shape[0]
    failed = inputs.failures.num_rows
    return {"total": meta.get("total_rows", inputs.count), "embedded": embedded,
            "failed": failed, "no_url": meta.get("no_url_count"),
            "capped": meta.get("capped_count")}


def summary_section(inputs: RunInputs, scans: dict[str, SpaceScan], checks: Sequence[Check]
                    ) -> str:
    n = inputs.count
    img = _image_counts(inputs)
    total = img["total"] or 0

    def share(value: int | None, of: int) -> str:
        return f"{100.0 * value / of:.1f}%" if value is not None and of else "–"

    with_image = int(inputs.has_image.sum())
    excluded = inputs.fusion_meta.get("image_vectors_excluded")
    rows = [
        ("items (text step)", n, "100%", "every item is embedded from its title + description"),
        ("items with empty text", inputs.text_meta.get("empty_text_count"),
         share(inputs.text_meta.get("empty_text_count"), n), "embedded as the empty string"),
        ("image: embedded", img["embedded"], share(img["embedded"], total),
         "with-image coverage"),
        ("image: failed", img["failed"], share(img["failed"], total), "see the next section"),
        ("image: no URL", img["no_url"], share(img["no_url"], total), "not attempted"),
        ("image: beyond the max_items cap", img["capped"], share(img["capped"], total),
         f"max_items = {inputs.image_meta.get('max_items', '–')}"),
        ("fused", scans["fused"].count, share(scans["fused"].count, n), "every text item"),
        ("fused with an image vector", with_image, share(with_image, n),
         f"{excluded if excluded is not None else '–'} unusable image vector(s) excluded"),
    ]
    if inputs.knn is not None:
        rows.append(("kNN graph rows", inputs.knn.meta.get("count"),
                     share(inputs.knn.meta.get("count"), n),
                     f"k = {inputs.knn.meta.get('k')}, spaces: "
                     f"{', '.join(inputs.knn.meta.get('spaces', {}))}"))
    body = _table(("count", "items", "share", "note"), rows)
    parts = [("embedded", img["embedded"]), ("failed", img["failed"])]
    parts += [(label, img[key]) for label, key in (("no URL", "no_url"), ("capped", "capped"))
              if img[key] is not None]
    known = sum(v for _, v in parts)
    if total > known:
        parts.append(("not accounted for", total - known))
    body += _img(plot_coverage(parts, total), "image outcome of every item")
    return body + "<h3>Checks</h3>" + _checks_table(checks)


def failures_section(inputs: RunInputs) -> str:
    failures = inputs.failures
    if failures.num_rows == 0:
        return _p("No image failed: every attempted image was downloaded, decoded and embedded.")
    counts = pc.value_counts(failures.column("reason").combine_chunks())
    reasons = sorted(((str(r), int(c)) for r, c in zip(counts.field("values").to_pylist(),
                                                       counts.field("counts").to_pylist())),
                     key=lambda rc: (-rc[1], rc[0]))
    attempted = inputs.arrays["image"].shape[0] + failures.num_rows
    reason_col = failures.column("reason").to_pylist()
    first = {}
    for index, reason in enumerate(reason_col):
        first.setdefault(str(reason), index)
    rows = []
    for reason, count in reasons:
        example = failures.slice(first[reason], 1).to_pylist()[0]
        detail = example.get("detail") or ""
        status = example.get("http_status")
        sample = " ".join(str(part) for part in (
            example.get("id"), example.get("url") or "", f"HTTP {status}" if status else "",
            detail) if part)
        rows.append((reason, count, f"{100.0 * count / attempted:.1f}%", sample))
    body = _table(("reason", "items", "% of attempted", "first example (id, URL, detail)"),
                  rows)
    return body + _img(plot_failures(reasons), "image failures by reason")


def _spread(values: np.ndarray) -> list[Any]:
    if not len(values):
        return [None] * 4
    p5, p50, p95 = np.percentile(values, (5, 50, 95))
    return [float(values.mean()), float(p5), float(p50), float(p95)]


def distributions_section(scans: dict[str, SpaceScan], cosines: dict[str, np.ndarray]) -> str:
    rows = []
    for space in SPACES:
        scan = scans[space]
        finite = scan.norms[np.isfinite(scan.norms)]
        rows.append([space, scan.count, scan.dim,
                     float(finite.min()) if len(finite) else None,
                     float(finite.max()) if len(finite) else None,
                     scan.off_unit, scan.nonfinite, len(cosines[space]),
                     *_spread(cosines[space])])
    body = _p(f"Norms are of every row; pairwise cosines of up to {PAIR_ROWS:,} rows sampled "
              f"per space (every pair). Vectors are L2-normalised: every norm should be 1 "
              f"within {NORM_TOLERANCE:g}.")
    body += _table(("space", "rows", "dim", "min norm", "max norm",
                    f"|norm − 1| > {NORM_TOLERANCE:g}", "non-finite rows", "pairs",
                    "cosine mean", "p5", "median", "p95"), rows)
    body += _img(plot_norms({s: scans[s].norms for s in SPACES}), "L2 norm per space")
    return body + _img(plot_pairwise(cosines), "pairwise cosine similarity per space")


def maps_section(panels: Sequence[MapPanel], legend: Sequence[tuple[str, int]],
                 items: ItemRows) -> str:
    if items.categories is None:
        note = (f"The items table has no {items.category_column!r} column "
                "(parameter category_column): the maps are drawn in one colour.")
    else:
        note = (f"Coloured by {items.category_column!r}: the {len(legend)} most frequent "
                "categories among the sampled items, all others grey.")
    body = _p(f"Up to {MAP_ROWS:,} items sampled per space (seeded), projected on the two "
              "principal axes of the sample (PCA). Items of one category should gather.")
    body += _p(note, "note")
    body += _img(plot_maps(panels, legend), "2-D PCA map of sampled items per space")
    if legend:
        body += _table(("category", "sampled items"), legend)
    return body


def training_section(meta: dict[str, Any]) -> str:
    history = meta.get("loss_history") or []
    if not history:
        return _p(f"{FUSION_CONFIG} has no loss_history.")
    body = _p(f"{len(history)} epoch(s), objective {meta.get('objective', '–')}, "
              f"lr {meta.get('lr', '–')}, batch size {meta.get('batch_size', '–')}, "
              f"seed {meta.get('seed', '–')}; train time {_fmt(meta.get('train_time_sec'))} s. "
              "Loss is sim_loss + norm_weight × norm_loss; it should fall and settle.")
    body += _img(plot_training(history), "fusion training loss per epoch")
    shown = list(enumerate(history, 1))
    if len(shown) > MAX_EPOCH_ROWS:
        shown = shown[:MAX_EPOCH_ROWS // 2] + shown[-MAX_EPOCH_ROWS // 2:]
    return body + _table(("epoch", "loss", "sim_loss", "norm_loss"),
                         [(e, h.get("loss"), h.get("sim_loss"), h.get("norm_loss"))
                          for e, h in shown])


def knn_section(inputs: RunInputs, sample_rows: np.ndarray) -> str:
    knn = inputs.knn
    if knn is None:
        return _p("No kNN graph (no knn_meta.json in the kNN directory, or none given): no "
                  "recall figures. The neighbour table above is exact (brute force).")
    k = knn.meta.get("k")
    rows = []
    for space, info in knn.meta.get("spaces", {}).items():
        rows.append((space, info.get("method"), info.get("dim"), info.get("index_params"),
                     info.get("recall_at_k"), info.get("recall_queries"),
                     info.get("build_time_sec"), info.get("query_time_sec")))
    body = _p(f"k = {k} neighbours per item over {knn.meta.get('count', 0):,} items; wall time "
              f"{_fmt(knn.meta.get('wall_time_sec'))} s. recall@k is measured against exact "
              "search on recall_queries random items.")
    body += _table(("space", "method", "dim", "index parameters", f"recall@{k}",
                    "recall queries", "build time (s)", "query time (s)"), rows)
    if knn.scores:
        scores = {s: np.asarray(a[sample_rows], np.float32) for s, a in knn.scores.items()}
        body += _img(plot_neighbour_scores(scores, knn.scores[next(iter(knn.scores))].shape[1]),
                     "cosine similarity to the first and k-th neighbour")
    return body


STEP_KEYS = {
    "text": ("run_id", "wall_time_sec", "encoder_name", "text_backend", "device", "dtype",
             "throughput_items_per_sec"),
    "image": ("run_id", "wall_time_sec", "encoder_name", "pretrained", "device",
              "throughput_items_per_sec", "resumed_shards"),
    "fusion": ("run_id", "wall_time_sec", "objective", "epochs", "hidden_dim", "output_dim",
               "final_loss"),
    "knn": ("run_id", "wall_time_sec", "k"),
}


def run_section(inputs: RunInputs, params: PipelineParams, render_versions: dict[str, str]
                ) -> str:
    metas = {"text": inputs.text_meta, "image": inputs.image_meta, "fusion": inputs.fusion_meta}
    if inputs.knn is not None:
        metas["knn"] = inputs.knn.meta
    steps = [(step, *(metas[step].get(key) for key in STEP_KEYS[step][:2]),
              "; ".join(f"{key} = {metas[step][key]}" for key in STEP_KEYS[step][2:]
                        if key in metas[step]))
             for step in metas]
    body = "<h3>Steps</h3>" + _table(("step", "run id", "wall time (s)", "details"), steps)
    versions = {**{s: m.get("versions") or {} for s, m in metas.items()},
                "report": render_versions}
    packages = sorted({p for v in versions.values() for p in v})
    body += "<h3>Versions</h3>" + _table(
        ("package", *versions), [(p, *(v.get(p) for v in versions.values())) for p in packages])
    body += "<h3>Parameters</h3>" + _table(
        ("parameter", "value"), [(f.name, getattr(params, f.name))
                                 for f in dataclasses.fields(params)])
    return body


# ----------------------------------------------------------------------------- the report


def _sample(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(size, n), replace=False)) if n else np.empty(0, int)


def category_legend(labels: Sequence[str]) -> list[tuple[str, int]]:
    """The TOP_CATEGORIES most frequent labels with their counts (ties: alphabetical)."""
    values, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i]))
    return [(str(values[i]), int(counts[i])) for i in order[:TOP_CATEGORIES]]


def _checks(inputs: RunInputs, scans: dict[str, SpaceScan], found: Neighbours) -> list[Check]:
    checks = []
    for space in SPACES:
        bad = scans[space].off_unit + scans[space].nonfinite
        checks.append(Check(f"{space} vectors L2-normalised and finite",
                            f"{bad:,} of {scans[space].count:,} rows off", "ok" if not bad
                            else "warn"))
    meta_counts = (("text", inputs.text_meta.get("count"), inputs.count),
                   ("image", inputs.image_meta.get("count"), scans["image"].count),
                   ("fused", inputs.fusion_meta.get("count"), inputs.count),
                   ("fused with image", inputs.fusion_meta.get("items_with_images"),
                    int(inputs.has_image.sum())),
                   ("image failures", inputs.image_meta.get("failed_count"),
                    inputs.failures.num_rows))
    for name, said, found_count in meta_counts:
        if said is not None:
            checks.append(Check(f"{name}: meta file count = rows", f"{said:,} vs {found_count:,}",
                                "ok" if said == found_count else "warn"))
    for space, (shared, compared) in found.exact_overlap.items():
        checks.append(Check(f"kNN {space} graph vs exact top-{TOP_NEIGHBOURS} on the sample "
                            "items", f"{shared} of {compared} shared", "info"))
    return checks


def write_qa_report(items_uri: str, text_dir: str | os.PathLike, image_dir: str | os.PathLike,
                    fused_dir: str | os.PathLike, knn_dir: str | os.PathLike | None,
                    output_path: str | os.PathLike, params: PipelineParams = PipelineParams(),
                    *, run_id: str = "") -> dict[str, Any]:
    """Write the QA report of a finished run as one self-contained HTML file.

    Args:
        items_uri: The items table the run embedded (parquet file or folder, local or gs://).
        text_dir: The text step's output directory.
        image_dir: The image step's output directory.
        fused_dir: The fusion step's output directory.
        knn_dir: The kNN step's output directory; None, empty or without ``knn_meta.json``:
            no recall figures, and the neighbour table uses exact neighbours (brute force).
        output_path: Where ``qa_report.html`` is written (atomically).
        params: Pipeline parameters; the report reads ``id_column``, ``title_column``,
            ``category_column`` and ``seed`` (sampling), and lists them all.
        run_id: The pipeline run shown in the title (default: the fusion step's).

    Returns:
        ``path``, ``size_bytes``, ``sections`` (ids of the page's sections), ``neighbours``
        ('graph' or 'exact'), ``has_categories`` and ``render_time_sec``.

    Raises:
        ReportInputError: a step output is missing or does not line up with the others.
        ItemsError: the items table cannot be read or lacks the id or title column.
    """
    started = time.perf_counter()
    inputs = load_run_inputs(text_dir, image_dir, fused_dir, knn_dir)
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
    shown = [queries, *sample_text_rows.values(),
             *(r[r >= 0] for r in found.rows.values())]
    items = read_item_rows(items_uri, params, np.unique(np.concatenate(shown)), inputs.ids)

    cosines = {s: pairwise_cosines(scans[s].sample, rng) for s in SPACES}
    panels = []
    for space in SPACES:
        coords, keep, share = pca_2d(scans[space].sample)
        rows = sample_text_rows[space][keep]
        labels = ([items.categories[r] for r in rows.tolist()] if items.categories is not None
                  else [""] * len(rows))
        panels.append(MapPanel(space, coords, labels, share))
    legend = category_legend(panels[0].labels) if items.categories is not None else []

    run_id = run_id or inputs.fusion_meta.get("run_id", "")
    render_versions = package_versions("numpy", "pyarrow", "matplotlib")
    body = "".join([
        _section("summary", summary_section(inputs, scans, _checks(inputs, scans, found))),
        _section("failures", failures_section(inputs)),
        _section("distributions", distributions_section(scans, cosines)),
        _section("maps", maps_section(panels, legend, items)),
        _section("neighbours", neighbours_section(inputs, items, queries, found)),
        _section("training", training_section(inputs.fusion_meta)),
        _section("knn", knn_section(inputs, text_sample)),
        _section("run", run_section(inputs, params, render_versions)),
    ])
    render_time = time.perf_counter() - started
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<li><a href="#{key}">{_e(title)}</a></li>' for key, title in SECTIONS)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>QA report {_e(run_id)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>QA report</h1><p class=\"meta\">run {_e(run_id or '–')} · {n:,} items · "
            f"written {now} in {render_time:.1f} s · items {_e(items_uri)}</p>"
            f"<nav><ul>{nav}</ul></nav>\n{body}</body></html>\n")
    with atomic_path(output_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    size = Path(output_path).stat().st_size
    logger.info("QA report of %d items: %s (%.1f MB) in %.1fs", n, output_path, size / 1e6,
                render_time)
    return {"path": str(output_path), "size_bytes": size, "sections": [k for k, _ in SECTIONS],
            "neighbours": found.source, "has_categories": items.categories is not None,
            "render_time_sec": render_time}
