"""The QA report's figures, drawn with matplotlib (Agg, no pyplot) and returned as PNG bytes."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .analysis import MapPanel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 80
NORM_PLOT_SPAN = 1e-6    # the norm histograms span at least 1 ± this
LABEL_CHARS = 40         # categories are cut to this length in legends
OTHER_COLOUR = "#c8c8c8"
# tab10 without its grey, which is reserved for the categories not in the legend
CATEGORY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                    "#e377c2", "#bcbd22", "#17becf")
SPACE_COLOURS = {"text": "#1f77b4", "image": "#ff7f0e", "fused": "#2ca02c"}


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
def plot_coverage(parts: Sequence[tuple[str, int]], total: int) -> Figure:
    """One horizontal bar of the items split by image outcome."""
    fig = _figure(10, 1.8)
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
    fig.legend(loc="outside lower center", ncols=len(parts), frameon=False, fontsize=9)
    return fig


@_drawn
def plot_failures(reasons: Sequence[tuple[str, int]]) -> Figure:
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
def plot_norms(norms: dict[str, np.ndarray]) -> Figure:
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
def plot_pairwise(cosines: dict[str, np.ndarray]) -> Figure:
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


@_drawn
def plot_maps(panels: Sequence[MapPanel], legend: Sequence[tuple[str, int]]) -> Figure:
    """The PCA maps side by side; points of the ``legend`` categories coloured, others grey."""
    fig = _figure(5 * len(panels) + 2.5, 5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colour_of = {label: colour for (label, _), colour in zip(legend, CATEGORY_COLOURS)}
    handles = {}
    for ax, panel in zip(axes, panels):
        size = float(np.clip(20000 / max(len(panel.coords), 1), 4, 30))  # fewer points: larger
        colours = [colour_of.get(label, OTHER_COLOUR) for label in panel.labels]
        if not legend:
            colours = [SPACE_COLOURS[panel.space]] * len(panel.labels)
        others = np.array([c == OTHER_COLOUR for c in colours], bool)
        ax.scatter(panel.coords[others, 0], panel.coords[others, 1], s=size, c=OTHER_COLOUR,
                   linewidths=0)
        shown = ~others
        if shown.any():
            ax.scatter(panel.coords[shown, 0], panel.coords[shown, 1], s=size, alpha=0.7,
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
def plot_training(history: Sequence[dict[str, float]]) -> Figure:
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
def plot_neighbour_scores(scores: dict[str, np.ndarray], k: int) -> Figure:
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
