"""The QA report's sections about the neighbour graphs: the modality mix (photo share and
category purity by group) and the kNN graphs with their night-over-night drift."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..modality import GROUPS, MIN_GROUP_ITEMS, MIX_TOLERANCE, judged
from ..outputs import FUSION_CONFIG
from .analysis import ModalityMix
from .html import esc, fmt_cell, html_figure, html_p, html_table
from .inputs import ItemRows, RunInputs
from .plots import plot_neighbour_scores

GROUP_NAMES = {"with_photo": "items with a photo", "without_photo": "items without a photo"}


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def modality_section(found: ModalityMix, items: ItemRows) -> str:
    """Per group, the share of neighbours with a photo in each space against the base rate,
    and the category purity of each group's neighbours."""
    mix = found.mix
    if mix is None:
        return html_p(f"Neither knn_meta.json nor {FUSION_CONFIG} records a modality mix (outputs "
                      "of a version before it was measured).")
    shares = mix.get("photo_share", {})
    where = (f"every item's top-{mix.get('k')} neighbours in the kNN graphs"
             if found.source == "graph" else
             f"the top-{mix.get('k')} neighbours of the fusion step's {mix.get('items'):,} "
             "sampled items among themselves (no kNN graph)")
    body = html_p(f"Share of neighbours that have a photo, for items with and without one, from "
                  f"{where}. A space that ranks items by what they are gives both groups about the "
                  "base rate (or, where photos go with some kinds of item, the text space's "
                  "shares); a space split by photos gives the first group far more and the second "
                  f"far less. The fused space should stay within {MIX_TOLERANCE:.2f} of the text "
                  "space in both groups.")
    counts = {"with_photo": mix.get("items_with_photo"),
              "without_photo": mix.get("items_without_photo")}
    rows = []
    for group in GROUPS:
        text, fused = (shares.get(s, {}).get(group) for s in ("text", "fused"))
        gap = None if text is None or fused is None else fused - text
        rows.append((GROUP_NAMES[group], counts[group], mix.get("base_rate"), text, fused,
                     _signed(gap)))
    body += html_table(("group", "items", "base rate (share of items with a photo)",
                        "photo share: text space", "photo share: fused space", "fused − text"),
                       rows)
    if found.warning:
        body += f'<p class="warn">WARNING: {esc(found.warning)}</p>'
    elif not judged(mix):
        body += html_p(f"Largest gap {_signed(mix.get('departure'))}; not judged: a group has "
                       f"fewer than {MIN_GROUP_ITEMS} items, too few for a stable share.", "info")
    elif mix.get("departure") is not None:
        body += html_p(f"Largest gap {_signed(mix.get('departure'))}: within "
                       f"{MIX_TOLERANCE:.2f}.", "ok")
    if items.categories is None:
        return body + html_p(f"Category purity by group needs the items table's "
                             f"{items.category_column!r} column (parameter category_column).",
                             "note")
    if found.purity is None:
        return body + html_p("Category purity by group needs the kNN graphs.", "note")
    body += "<h3>Category purity by group</h3>" + html_p(
            f"Share of neighbours with the item's own {items.category_column!r}, over "
            f"{found.purity_items:,} items drawn at random (seeded) and their kNN graph "
            "neighbours.")
    purity_rows = [(GROUP_NAMES.get(group, "all items"),
                    *(found.purity[s].get(group) for s in ("text", "fused")),
                    _signed(None if found.purity["text"].get(group) is None
                            else found.purity["fused"][group] - found.purity["text"][group]))
                   for group in ("all", *GROUPS)]
    return body + html_table(("group", "purity: text space", "purity: fused space",
                              "fused − text"), purity_rows)


def knn_section(inputs: RunInputs, sample_rows: np.ndarray) -> str:
    knn = inputs.knn
    if knn is None:
        return html_p("No kNN graph (no knn_meta.json in the kNN directory, or none given): no "
                      "recall figures. The neighbour table above is exact (brute force).")
    k = knn.meta.get("k")
    rows = []
    for space, info in knn.meta.get("spaces", {}).items():
        rows.append((space, info.get("method"), info.get("dim"), info.get("index_params"),
                     info.get("recall_at_k"), info.get("recall_queries"),
                     info.get("build_time_sec"), info.get("query_time_sec"),
                     info.get("update"), info.get("recomputed_count"), info.get("reused_count"),
                     info.get("rebuild_reason")))
    body = html_p(f"k = {k} neighbours per item over {knn.meta.get('count', 0):,} items; "
                  f"wall time {fmt_cell(knn.meta.get('wall_time_sec'))} s. recall@k is measured "
                  "against exact search on recall_queries random items. An incremental update "
                  "(previous_uri) recomputes only the rows that need it and reuses the others.")
    body += html_table(("space", "method", "dim", "index parameters", f"recall@{k}",
                        "recall queries", "build time (s)", "query time (s)", "update",
                        "rows recomputed", "rows reused", "why built in full"), rows)
    body += drift_table(knn.drift)
    if knn.scores:
        scores = {s: np.asarray(a[sample_rows], np.float32) for s, a in knn.scores.items()}
        width = knn.scores[next(iter(knn.scores))].shape[1]
        body += html_figure(plot_neighbour_scores(scores, width),
                            "cosine similarity to the first and k-th neighbour")
    return body


def drift_table(drift: dict[str, dict[str, Any]]) -> str:
    """Night-over-night drift (:attr:`KnnGraph.drift`): how many of the first neighbours of
    the items whose content did not change are still the same."""
    if not drift:
        return ""
    top = next(iter(drift.values())).get("top")
    body = "<h3>Night-over-night drift</h3>" + html_p(
        f"For the items whose content (text and image keys) is unchanged since the previous "
        f"set (run {next(iter(drift.values())).get('previous_run_id')}): the share of "
        f"their first {top} neighbours that were among their first {top} in the previous set. "
        "A low fused overlap with few changed items means the fusion model moved the "
        "neighbourhoods (a retrained model), not the catalogue.")
    return body + html_table(
            ("space", "unchanged items", f"mean top-{top} overlap", "identical lists",
             "10th percentile"),
            [(space, d.get("items"), d.get("mean_overlap"), d.get("identical_share"),
              d.get("p10_overlap")) for space, d in drift.items()])
