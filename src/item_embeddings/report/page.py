"""The QA report's HTML: one section per topic, every value escaped, every plot an inline PNG."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..config import PipelineParams
from ..image.hosts import failures_by_host
from ..modality import MIN_GROUP_ITEMS, MIX_TOLERANCE, judged
from ..outputs import FUSION_CONFIG, KNN_FUSED, KNN_TEXT
from ..runtime import package_versions
from ..verify import NORM_TOLERANCE
from .analysis import (
    MAP_ROWS,
    PAIR_ROWS,
    SPACES,
    TOP_NEIGHBOURS,
    Findings,
    MapPanel,
    ModalityMix,
    Neighbours,
    SpaceScan,
)
from .graph_sections import knn_section, modality_section
from .html import CSS, Check, checks_table, esc, fmt_cell, html_figure, html_p, html_table
from .inputs import MISSING_CATEGORY, ItemRows, RunInputs
from .plots import (
    plot_coverage,
    plot_failures,
    plot_maps,
    plot_norms,
    plot_pairwise,
    plot_training,
)

SECTIONS = (
    ("summary", "Summary and coverage"),
    ("failures", "Image failures by reason"),
    ("distributions", "Distributions per space"),
    ("maps", "2-D maps per space"),
    ("neighbours", "Neighbours: text vs fused"),
    ("modality", "Modality mix"),
    ("training", "Fusion training curve"),
    ("knn", "kNN graph and recall"),
    ("run", "Run parameters and versions"),
)
MAX_EPOCH_ROWS = 20      # the training table lists every epoch up to this many
TOP_HOSTS = 10           # image hosts listed with their failures


def _section(key: str, body: str) -> str:
    title = dict(SECTIONS)[key]
    return f'<section id="{key}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def _title_html(items: ItemRows, row: int) -> str:
    title = items.titles.get(row)
    text = f"{esc(title)}" if title else '<span class="note">(no title)</span>'
    if items.categories is not None:
        text += f' <span class="cat">[{esc(items.categories.get(row, MISSING_CATEGORY))}]</span>'
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
        source = (f"Neighbours are read from the kNN graph ({KNN_TEXT}, {KNN_FUSED}). On these "
                  "items the graph shares " + " and ".join(
                      f"{s} of the {c} exact top-{TOP_NEIGHBOURS} {space} neighbours"
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
            f"<span class=\"id\">{esc(inputs.ids[row].as_py())}</span> "
            f"<span class=\"cat\">{image}; {len(shared)} of {TOP_NEIGHBOURS} shared</span></td>"
            f"<td>{_neighbour_list(items, text, found.scores['text'][q], shared)}</td>"
            f"<td>{_neighbour_list(items, fused, found.scores['fused'][q], shared)}</td></tr>")
    table = ('<table class="neighbours"><thead><tr><th>item</th>'
             f"<th>top-{TOP_NEIGHBOURS} in the text space</th>"
             f"<th>top-{TOP_NEIGHBOURS} in the fused space</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    how = (f"{len(queries)} items drawn at random (seeded). Bold neighbours are in both lists; "
           "the grey number is the cosine similarity; [brackets] hold the category.")
    return html_p(source) + html_p(how, "note") + table


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
        ("items (text step)", n, share(n, n), "every item, embedded from title + description"),
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
    body = html_table(("count", "items", "share", "note"), rows)
    parts = [("embedded", img["embedded"]), ("failed", img["failed"])]
    parts += [(label, img[key]) for label, key in (("no URL", "no_url"), ("capped", "capped"))
              if img[key] is not None]
    known = sum(v for _, v in parts)
    if total > known:
        parts.append(("not accounted for", total - known))
    body += html_figure(plot_coverage(parts, total), "image outcome of every item")
    return body + "<h3>Checks</h3>" + checks_table(checks)


def failures_section(inputs: RunInputs) -> str:
    failures = inputs.failures
    if failures.num_rows == 0:
        return html_p("No image failed: every attempted image was downloaded, decoded and "
                      "embedded.")
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
    body = html_table(("reason", "items", "% of attempted", "first example (id, URL, detail)"),
                      rows)
    return (body + html_figure(plot_failures(reasons), "image failures by reason")
            + failing_hosts(failures))


def failing_hosts(failures) -> str:
    """The image hosts with the most failed items, and why they failed."""
    if "url" not in failures.column_names:
        return ""
    top = failures_by_host(failures.column("url").to_pylist(),
                           failures.column("reason").to_pylist(), TOP_HOSTS)
    rows = [(host or "(no host)", count,
             ", ".join(f"{reason} {n:,}" for reason, n in reasons.items()))
            for host, count, reasons in top]
    note = ("host_unavailable: the host stopped answering and its circuit breaker opened, so "
            "its remaining images were not requested; like every failure they are tried again "
            "by the next incremental run (retry_failed_images).")
    return (f"<h3>Hosts with the most failures (top {TOP_HOSTS})</h3>"
            + html_table(("host", "failed items", "reasons"), rows) + html_p(note, "note"))


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
    body = html_p(f"Norms are of every row; pairwise cosines of up to {PAIR_ROWS:,} rows sampled "
                  f"per space (every pair). Vectors are L2-normalised: every norm should be 1 "
                  f"within {NORM_TOLERANCE:g}.")
    body += html_table(("space", "rows", "dim", "min norm", "max norm",
                        f"|norm − 1| > {NORM_TOLERANCE:g}", "non-finite rows", "pairs",
                        "cosine mean", "p5", "median", "p95"), rows)
    body += html_figure(plot_norms({s: scans[s].norms for s in SPACES}), "L2 norm per space")
    return body + html_figure(plot_pairwise(cosines), "pairwise cosine similarity per space")


def maps_section(panels: Sequence[MapPanel], legend: Sequence[tuple[str, int]],
                 items: ItemRows) -> str:
    if items.categories is None:
        note = (f"The items table has no {items.category_column!r} column "
                "(parameter category_column): the maps are drawn in one colour.")
    else:
        note = (f"Coloured by {items.category_column!r}: the {len(legend)} most frequent "
                "categories among the sampled items, all others grey.")
    body = html_p(f"Up to {MAP_ROWS:,} items sampled per space (seeded), projected on the two "
                  "principal axes of the sample (PCA). Items of one category should gather.")
    body += html_p(note, "note")
    body += html_figure(plot_maps(panels, legend), "2-D PCA map of sampled items per space")
    if legend:
        body += html_table(("category", "sampled items"), legend)
    return body


def training_section(meta: dict[str, Any]) -> str:
    history = meta.get("loss_history") or []
    if not history:
        return html_p(f"{FUSION_CONFIG} has no loss_history.")
    asked = meta.get("epochs")
    # fusion_min_steps: a small catalogue trains more epochs than it was asked for
    raised = (f" ({asked} asked for; more to reach fusion_min_steps {meta.get('min_steps')})"
              if isinstance(asked, int) and len(history) > asked else "")
    body = html_p(f"{len(history)} epoch(s){raised}, objective {meta.get('objective', '–')}, "
                  f"lr {meta.get('lr', '–')}, batch size {meta.get('batch_size', '–')}, "
                  f"seed {meta.get('seed', '–')}; train time "
                  f"{fmt_cell(meta.get('train_time_sec'))} s. Loss is sim_loss + norm_weight × "
                  "norm_loss; it should fall and settle.")
    body += html_figure(plot_training(history), "fusion training loss per epoch")
    shown = list(enumerate(history, 1))
    left_out = ""
    if len(shown) > MAX_EPOCH_ROWS:
        half = MAX_EPOCH_ROWS // 2
        left_out = html_p(f"Epochs {half + 1}-{len(shown) - half} are left out of the table "
                          f"(they are in the figure and in {FUSION_CONFIG}).", "note")
        shown = shown[:half] + shown[-half:]
    return body + html_table(("epoch", "loss", "sim_loss", "norm_loss"),
                             [(e, h.get("loss"), h.get("sim_loss"), h.get("norm_loss"))
                              for e, h in shown]) + left_out


STEP_KEYS = {
    "text": ("run_id", "wall_time_sec", "encoder_name", "text_backend", "device", "dtype",
             "throughput_items_per_sec"),
    "image": ("run_id", "wall_time_sec", "encoder_name", "pretrained", "device",
              "throughput_items_per_sec", "resumed_shards"),
    "fusion": ("run_id", "wall_time_sec", "objective", "epochs", "hidden_dim", "output_dim",
               "final_loss"),
    "knn": ("run_id", "wall_time_sec", "k"),
}


IMAGE_STAGES = (("download_wall_s", "downloads", "wall-clock s with a download in flight"),
                ("decode_cpu_s", "decoding, resize and crop", "CPU s, summed over the decode "
                                                              "threads"),
                ("encode_wall_s", "encoding", "wall-clock s in the encoder"))


def _image_stages(meta: dict[str, Any]) -> str:
    """Where the image step's time went (docs/images.md): its stages overlap, so the one
    nearest the wall time is what bounds it."""
    encoded = meta.get("encoded_this_attempt") or 0
    rate = meta.get("throughput_items_per_sec") or 0
    stages = [(key, stage, unit) for key, stage, unit in IMAGE_STAGES if key in meta]
    if not stages:
        return ""
    busy = encoded / rate if rate else None  # processing time, summed over the shards
    rows = [(stage, meta[key], 1000 * meta[key] / encoded if encoded else None, unit)
            for key, stage, unit in stages]
    rows.append(("the whole processing", busy, 1000 * busy / encoded if busy else None,
                 "wall-clock s from the first download to the last batch"))
    note = (f"image_decode = {meta.get('image_decode', 'exact')}; {encoded:,} images encoded "
            "(the last attempt of each shard; seconds summed over the shards). The stages "
            "overlap: the one nearest the whole processing time bounds the step.")
    return ("<h3>Image step: where the time went</h3>" + html_p(note, "note")
            + html_table(("stage", "seconds", "ms per image", "measured as"), rows))


def run_section(inputs: RunInputs, params: PipelineParams, render_versions: dict[str, str]
                ) -> str:
    metas = {"text": inputs.text_meta, "image": inputs.image_meta, "fusion": inputs.fusion_meta}
    if inputs.knn is not None:
        metas["knn"] = inputs.knn.meta
    steps = [(step, *(metas[step].get(key) for key in STEP_KEYS[step][:2]),
              "; ".join(f"{key} = {metas[step][key]}" for key in STEP_KEYS[step][2:]
                        if key in metas[step]))
             for step in metas]
    body = "<h3>Steps</h3>" + html_table(("step", "run id", "wall time (s)", "details"), steps)
    body += _image_stages(inputs.image_meta)
    versions = {**{s: m.get("versions") or {} for s, m in metas.items()},
                "report": render_versions}
    packages = sorted({p for v in versions.values() for p in v})
    body += "<h3>Versions</h3>" + html_table(
            ("package", *versions), [(p, *(v.get(p) for v in versions.values())) for p in packages])
    body += "<h3>Parameters</h3>" + html_table(
            ("parameter", "value"), [(f.name, getattr(params, f.name))
                                     for f in dataclasses.fields(params)])
    return body


def _checks(inputs: RunInputs, scans: dict[str, SpaceScan], found: Neighbours,
            modality: ModalityMix) -> list[Check]:
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
    if modality.mix is not None and modality.mix.get("departure") is not None:
        status = ("warn" if modality.warning else "ok" if judged(modality.mix) else "info")
        checks.append(Check("modality mix: fused vs text photo share of neighbours",
                            f"largest gap {modality.mix['departure']:.3f} (tolerance "
                            f"{MIX_TOLERANCE:.2f}" + ("" if judged(modality.mix) else
                                                      f"; a group under {MIN_GROUP_ITEMS} "
                                                      "items: not judged") + ")", status))
    for space, (shared, compared) in found.exact_overlap.items():
        checks.append(Check(f"kNN {space} graph vs exact top-{TOP_NEIGHBOURS} on the sample "
                            "items", f"{shared} of {compared} shared", "info"))
    return checks


def render_page(findings: Findings, params: PipelineParams, *, run_id: str, items_uri: str,
                started: float) -> str:
    """The whole page; ``started`` (a ``time.perf_counter()`` value) dates the render time."""
    inputs, items, scans = findings.inputs, findings.items, findings.scans
    found = findings.neighbours
    run_id = run_id or inputs.fusion_meta.get("run_id", "")
    body = "".join([
        _section("summary", summary_section(inputs, scans,
                                            _checks(inputs, scans, found, findings.modality))),
        _section("failures", failures_section(inputs)),
        _section("distributions", distributions_section(scans, findings.cosines)),
        _section("maps", maps_section(findings.panels, findings.legend, items)),
        _section("neighbours", neighbours_section(inputs, items, findings.queries, found)),
        _section("modality", modality_section(findings.modality, items)),
        _section("training", training_section(inputs.fusion_meta)),
        _section("knn", knn_section(inputs, findings.text_sample)),
        _section("run", run_section(inputs, params,
                                    package_versions("numpy", "pyarrow", "matplotlib"))),
    ])
    elapsed = time.perf_counter() - started
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<li><a href="#{key}">{esc(title)}</a></li>' for key, title in SECTIONS)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>QA report {esc(run_id)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>QA report</h1><p class=\"meta\">run {esc(run_id or '–')} · "
            f"{inputs.count:,} items · written {now} in {elapsed:.1f} s · items "
            f"{esc(items_uri)}</p><nav><ul>{nav}</ul></nav>\n{body}</body></html>\n")
