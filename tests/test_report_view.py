"""The QA report as its reader sees it, section by section, on a run written without models.

tests/test_report.py renders the report from the real text and fusion steps (a model loaded,
about 15 s of setup). Here the steps' files are written directly in the format of
docs/outputs.md, with chosen values (counts, times, a 25-epoch loss history), so every number
and sentence the page shows can be checked word for word, and a render takes a few seconds:
these are the tests `tools/mutation.sh report-*` runs against each mutant (docs/testing.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_run import Page, decode_png, table_rows, unit, write_image_outputs, write_knn

from item_embeddings.config import PipelineParams
from item_embeddings.items import ItemsError
from item_embeddings.modality import modality_mix
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    QA_REPORT,
    REPORT_META,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.report import (
    SECTIONS,
    ReportInputError,
    analysis,
    graph_sections,
    write_qa_report,
)
from item_embeddings.report import page as page_module
from item_embeddings.report.analysis import MapPanel, ModalityMix, Neighbours
from item_embeddings.report.graph_sections import modality_section
from item_embeddings.report.html import CSS
from item_embeddings.report.inputs import (
    MISSING_CATEGORY,
    ItemRows,
    category_label,
    load_run_inputs,
)
from item_embeddings.report.page import failing_hosts, neighbours_section, training_section
from item_embeddings.report.plots import (
    plot_coverage,
    plot_failures,
    plot_maps,
    plot_neighbour_scores,
    plot_norms,
    plot_pairwise,
    plot_training,
)
from item_embeddings.sample import make_sample_catalogue

N = 48
EPOCHS = 25
TEXT_DIM, FUSED_DIM = 24, 16
ITEMS_NAME = "items.parquet"
# A modality mix of groups large enough to judge, the fused space split by photos.
SPLIT_MIX = {"items_with_photo": 24, "items_without_photo": 24, "base_rate": 0.5,
             "photo_share": {"text": {"with_photo": 0.5, "without_photo": 0.5},
                             "fused": {"with_photo": 0.9, "without_photo": 0.2}},
             "departure": 0.4}


@dataclass
class QuickRun:
    root: Path
    items: Path
    text: Path
    image: Path
    fused: Path
    knn: Path
    table: pa.Table
    graphs: dict[str, np.ndarray]

    def dirs(self, **changed: Path | None) -> dict[str, Path | None]:
        dirs = {"text_dir": self.text, "image_dir": self.image, "fused_dir": self.fused,
                "knn_dir": self.knn}
        return {**dirs, **{f"{k}_dir": v for k, v in changed.items()}}

    def write(self, out: Path, items: Path | None = None, params: PipelineParams | None = None,
              run_id: str | None = "view-run", **changed: Path | None) -> tuple[dict, str]:
        """Write the report into ``out`` (``run_id`` None: the step's default)."""
        out.mkdir(parents=True, exist_ok=True)
        named = {} if run_id is None else {"run_id": run_id}
        summary = write_qa_report(str(items or self.items), output_path=out / QA_REPORT,
                                  params=params or PipelineParams(seed=0),
                                  **self.dirs(**changed), **named)
        return summary, (out / QA_REPORT).read_text(encoding="utf-8")


def _write_text_outputs(text_dir: Path, table: pa.Table) -> None:
    """The text step's files: a vector near its category's centre per item."""
    rng = np.random.default_rng(1)
    categories = [str(c) for c in table.column("main_category").to_pylist()]
    centres = dict(zip(sorted(set(categories)), unit(rng.standard_normal((8, TEXT_DIM)))))
    vectors = unit(np.stack([centres[c] for c in categories])
                   + 0.3 * rng.standard_normal((len(categories), TEXT_DIM)))
    text_dir.mkdir(parents=True)
    np.save(text_dir / TXT_ARRAY, vectors)
    pq.write_table(pa.table({"id": table.column("asin")}), text_dir / TXT_ITEMS)
    (text_dir / TXT_META).write_text(json.dumps({
        "count": N, "empty_text_count": 2, "embed_dim": TEXT_DIM, "run_id": "text-run",
        "wall_time_sec": 3.25, "encoder_name": "minilm-test", "text_backend": "torch",
        "device": "cpu", "dtype": "float32", "throughput_items_per_sec": 96.0,
        "versions": {"item-embeddings": "0.1.0", "torch": "2.5.0"}}))


def _write_fusion_outputs(fused_dir: Path, text_dir: Path, image_dir: Path) -> None:
    """The fusion step's files: the text vector's first columns plus the photo's when there is
    one, a 25-epoch loss history and the modality mix of its sample."""
    ids = pq.read_table(text_dir / TXT_ITEMS).column("id").to_pylist()
    img_ids = set(pq.read_table(image_dir / IMG_ITEMS).column("id").to_pylist())
    has_image = np.array([i in img_ids for i in ids])
    text = np.load(text_dir / TXT_ARRAY)
    fused = unit(text[:, :FUSED_DIM] + 0.5 * has_image[:, None])
    fused_dir.mkdir(parents=True)
    np.save(fused_dir / FUSED_ARRAY, fused)
    pq.write_table(pa.table({"id": ids, "has_image": has_image}), fused_dir / FUSED_ITEMS)
    sims = fused @ fused.T
    np.fill_diagonal(sims, -np.inf)
    mix = modality_mix({"text": np.argsort(-(text @ text.T - 9 * np.eye(N)), 1)[:, :5],
                        "fused": np.argsort(-sims, 1)[:, :5]}, has_image)
    (fused_dir / FUSION_CONFIG).write_text(json.dumps({
        "count": N, "items_with_images": int(has_image.sum()), "image_vectors_excluded": 1,
        "run_id": "fusion-run", "wall_time_sec": 7.5, "objective": "contrastive",
        "epochs": EPOCHS, "hidden_dim": 32, "output_dim": FUSED_DIM, "final_loss": 0.125,
        "lr": 0.003, "batch_size": 16, "seed": 0, "train_time_sec": 6.25,
        "loss_history": [{"loss": 1.0 / e, "sim_loss": 0.5 / e, "norm_loss": 0.001 * e}
                         for e in range(1, EPOCHS + 1)],
        "modality_mix": mix, "versions": {"item-embeddings": "0.1.0", "torch": "2.5.1"}}))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> QuickRun:
    root = tmp_path_factory.mktemp("quick")
    table = make_sample_catalogue(N, image_base_url="http://127.0.0.1:9")
    titles = table.column("title").to_pylist()
    titles[5] = None
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles))
    items = root / ITEMS_NAME
    pq.write_table(table, items, row_group_size=10)  # read in several batches
    run = QuickRun(root, items, root / "text", root / "image", root / "fused", root / "knn",
                   table, {})
    _write_text_outputs(run.text, table)
    write_image_outputs(run.image, table)
    _write_fusion_outputs(run.fused, run.text, run.image)
    run.graphs = write_knn(run.knn, run.text, run.fused)
    return run


def _rows(page: Page, section: str, index: int = 0) -> list[list[str]]:
    return table_rows(page.section(section).find_all("table")[index])


def _leaves(element) -> list[str]:
    if element.tag == "#text":
        return [element.text]
    return [t for child in element.children for t in _leaves(child)]


def _text(page: Page, section: str) -> str:
    """A section's text as read: its pieces in order, each run of white space one space."""
    return " ".join(" ".join(_leaves(page.section(section))).split())


def _catalogue_numbers(quick: QuickRun) -> dict[str, int]:
    urls = quick.table.column("image_url").to_pylist()
    attempted = sum(1 for u in urls if u)
    return {"attempted": attempted, "no_url": N - attempted, "failed": 4,
            "embedded": attempted - 4}


# ------------------------------------------------------------------------------ the tests


Rendered = tuple[dict, str, Page]  # write_qa_report's summary, the page's text, the page


def _spy_on_plots(monkeypatch) -> dict[str, tuple]:
    """Record what each figure of the page is drawn from (the figures themselves are checked
    by the plot tests below), calling the real plot."""
    drawn: dict[str, tuple] = {}
    for module, name in ((page_module, "plot_coverage"), (page_module, "plot_failures"),
                         (page_module, "plot_norms"), (page_module, "plot_pairwise"),
                         (page_module, "plot_maps"), (page_module, "plot_training"),
                         (graph_sections, "plot_neighbour_scores")):
        def spy(*args, _plot=getattr(module, name), _name=name):
            drawn[_name] = args
            return _plot(*args)

        monkeypatch.setattr(module, name, spy)
    return drawn


def test_the_report_as_read_section_by_section(quick, monkeypatch):
    """The quick run's page, every section read as its reader sees it. One test renders it and
    runs every check: mutmut runs against a mutant only the tests that called its function,
    and a render shared between tests (a fixture, a cache) counts for the first of them only."""
    drawn = _spy_on_plots(monkeypatch)
    started = time.perf_counter()
    summary, text = quick.write(quick.root / "report", run_id="")
    assert 0 < summary["render_time_sec"] < time.perf_counter() - started
    rendered = summary, text, Page(text)
    _what_the_figures_show(quick, drawn)
    _title_line_and_navigation(quick, rendered)
    _summary_counts_every_item_by_outcome(quick, rendered)
    _checks_compare_each_meta_count_with_the_rows(quick, rendered)
    _failures_by_reason_and_failing_hosts(quick, rendered)
    _distributions_per_space(quick, rendered)
    _maps_legend_counts_the_sampled_categories(quick, rendered)
    _neighbour_table_titles_and_cosines(quick, rendered)
    _modality_mix_table_and_purity_by_group(quick, rendered)
    _training_curve_first_and_last_ten(quick, rendered)
    _knn_section_lists_each_graph(quick, rendered)
    _run_steps_stages_versions_params(quick, rendered)
    _the_report_step_writes_the_page_and_its_record(quick, rendered)


def _what_the_figures_show(quick: QuickRun, drawn: dict[str, tuple]) -> None:
    n = _catalogue_numbers(quick)
    assert drawn["plot_coverage"] == ([("embedded", n["embedded"]), ("failed", 4),
                                       ("no URL", n["no_url"]), ("capped", 0)], N)
    assert drawn["plot_failures"] == ([("http_error", 2), ("decode_error", 1), ("timeout", 1)],)
    arrays = {"text": np.load(quick.text / TXT_ARRAY), "image": np.load(quick.image / IMG_ARRAY),
              "fused": np.load(quick.fused / FUSED_ARRAY)}
    [norms] = drawn["plot_norms"]
    assert list(norms) == list(arrays)
    for space, array in arrays.items():
        np.testing.assert_allclose(norms[space], np.linalg.norm(array, axis=1), rtol=1e-6)
    [cosines] = drawn["plot_pairwise"]
    assert {s: len(c) for s, c in cosines.items()} == {"text": N * (N - 1) // 2,
                                                        "image": 32 * 31 // 2,
                                                        "fused": N * (N - 1) // 2}
    panels, legend = drawn["plot_maps"]
    categories = quick.table.column("main_category").to_pylist()
    ids = quick.table.column("asin").to_pylist()
    img = pq.read_table(quick.image / IMG_ITEMS).to_pylist()
    category_of_img_row = {r["row"]: categories[ids.index(r["id"])] for r in img}
    assert [p.space for p in panels] == ["text", "image", "fused"]
    assert panels[0].labels == panels[2].labels == categories
    assert panels[1].labels == [category_of_img_row[r] for r in range(len(img))]
    assert [p.coords.shape for p in panels] == [(N, 2), (len(img), 2), (N, 2)]
    for p, array in zip(panels, arrays.values()):  # every row sampled, in row order
        coords, _, share = analysis.pca_2d(array)
        np.testing.assert_allclose(p.coords, coords)
        np.testing.assert_allclose(p.share, share)
    assert legend == sorted(((c, categories.count(c)) for c in set(categories)),
                            key=lambda lc: (-lc[1], lc[0]))
    [history] = drawn["plot_training"]
    assert history == json.loads((quick.fused / FUSION_CONFIG).read_text())["loss_history"]
    scores, k = drawn["plot_neighbour_scores"]
    assert k == 8 and list(scores) == ["text", "fused"]
    np.testing.assert_array_equal(scores["text"], np.load(quick.knn / KNN_TEXT_SCORES))
    np.testing.assert_array_equal(scores["fused"], np.load(quick.knn / KNN_FUSED_SCORES))


def _title_line_and_navigation(quick: QuickRun, rendered: Rendered) -> None:
    summary, text, page = rendered
    for table in page.root.find_all("table"):  # nothing but its cells, header first
        cells = [c.all_text() for c in table.find_all("th") + table.find_all("td")]
        assert "".join("".join(_leaves(table)).split()) == "".join("".join(cells).split())
    assert page.root.find_all("title")[0].all_text() == "QA report fusion-run"
    meta = " ".join(page.root.by_class("meta")[0].all_text().split())
    assert meta.startswith(f"run fusion-run · {N} items · written ")
    assert meta.endswith(f" s · items {quick.items}")
    assert [a.attrs["href"] for a in page.root.find_all("nav")[0].find_all("a")] == [
        f"#{key}" for key, _ in SECTIONS]
    assert [a.all_text() for a in page.root.find_all("nav")[0].find_all("a")] == [
        title for _, title in SECTIONS]
    assert [h.all_text() for h in page.root.find_all("h2")] == [t for _, t in SECTIONS]
    assert text.startswith('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">')


def _summary_counts_every_item_by_outcome(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    n = _catalogue_numbers(quick)
    rows = _rows(page, "summary")

    def pct(v: int) -> str:
        return f"{100 * v / N:.1f}%"

    assert rows == [
        ["items (text step)", str(N), "100.0%", "every item, embedded from title + description"],
        ["items with empty text", "2", pct(2), "embedded as the empty string"],
        ["image: embedded", str(n["embedded"]), pct(n["embedded"]), "with-image coverage"],
        ["image: failed", "4", pct(4), "see the next section"],
        ["image: no URL", str(n["no_url"]), pct(n["no_url"]), "not attempted"],
        ["image: beyond the max_items cap", "0", "0.0%", "max_items = 150000"],
        ["fused", str(N), "100.0%", "every text item"],
        ["fused with an image vector", str(n["embedded"]), pct(n["embedded"]),
         "1 unusable image vector(s) excluded"],
        ["kNN graph rows", str(N), "100.0%", "k = 8, spaces: text, fused"],
    ]
    decode_png(page.section("summary").find_all("img")[0].attrs["src"])
    assert page.section("summary").find_all("img")[0].attrs["alt"] == (
        "image outcome of every item")


def _checks_compare_each_meta_count_with_the_rows(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    n = _catalogue_numbers(quick)
    checks = _rows(page, "summary", 1)
    mix = json.loads((quick.knn / KNN_META).read_text())["modality_mix"]
    assert checks == [
        ["text vectors L2-normalised and finite", f"0 of {N} rows off", "OK"],
        ["image vectors L2-normalised and finite", f"0 of {n['embedded']} rows off", "OK"],
        ["fused vectors L2-normalised and finite", f"0 of {N} rows off", "OK"],
        ["text: meta file count = rows", f"{N} vs {N}", "OK"],
        ["image: meta file count = rows", f"{n['embedded']} vs {n['embedded']}", "OK"],
        ["fused: meta file count = rows", f"{N} vs {N}", "OK"],
        ["fused with image: meta file count = rows", f"{n['embedded']} vs {n['embedded']}",
         "OK"],
        ["image failures: meta file count = rows", "4 vs 4", "OK"],
        ["modality mix: fused vs text photo share of neighbours",
         f"largest gap {mix['departure']:.3f} (tolerance 0.10; a group under 20 items: "
         "not judged)", "INFO"],
        ["kNN text graph vs exact top-5 on the sample items", "60 of 60 shared", "INFO"],
        ["kNN fused graph vs exact top-5 on the sample items", "60 of 60 shared", "INFO"],
    ]
    text = _text(page, "summary")
    assert text.startswith("Summary and coverage count items share note items (text step) ")
    assert " 1 unusable image vector(s) excluded kNN graph rows " in text
    assert " k = 8, spaces: text, fused Checks check found result text vectors " in text
    assert text.endswith(" 60 of 60 shared INFO")
    cells = page.section("summary").find_all("table")[1].find_all("td")
    assert {c.attrs.get("class") for c in cells[2::3]} == {"ok", "info"}


def _failures_by_reason_and_failing_hosts(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    n = _catalogue_numbers(quick)
    urls = quick.table.column("image_url").to_pylist()
    attempted = n["attempted"]
    assert _rows(page, "failures") == [
        ["http_error", "2", f"{200 / attempted:.1f}%", f"S000000 {urls[0]} HTTP 404 Not Found"],
        ["decode_error", "1", f"{100 / attempted:.1f}%",
         f"S000004 {urls[4]} <script>alert('detail')</script>"],
        ["timeout", "1", f"{100 / attempted:.1f}%", f"S000002 {urls[2]} no answer in 5 s"],
    ]
    assert _rows(page, "failures", 1) == [
        ["127.0.0.1:9", "4", "http_error 2, timeout 1, decode_error 1"]]
    hosts_table = page.section("failures").find_all("table")[1]
    assert [th.all_text() for th in hosts_table.find_all("th")] == ["host", "failed items",
                                                                    "reasons"]
    [note] = page.section("failures").by_class("note")
    assert note.tag == "p" and note.all_text().startswith("host_unavailable: ")
    text = _text(page, "failures")
    assert "Hosts with the most failures (top 10)" in text
    assert ("host_unavailable: the host stopped answering and its circuit breaker opened, so "
            "its remaining images were not requested; like every failure they are tried again "
            "by the next incremental run (retry_failed_images).") in text
    [image] = page.section("failures").find_all("img")
    assert image.attrs["alt"] == "image failures by reason"
    decode_png(image.attrs["src"])


def _cosine_stats(array: np.ndarray) -> list[str]:
    x = unit(array.astype(np.float64))
    sims = (x @ x.T)[np.triu_indices(len(x), 1)]
    p5, p50, p95 = np.percentile(sims, (5, 50, 95))
    return [f"{len(sims):,}", *(f"{v:.4g}" for v in (sims.mean(), p5, p50, p95))]


def _distributions_per_space(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    rows = _rows(page, "distributions")
    arrays = {"text": np.load(quick.text / TXT_ARRAY), "image": np.load(quick.image / IMG_ARRAY),
              "fused": np.load(quick.fused / FUSED_ARRAY)}
    assert [r[:7] for r in rows] == [
        [space, str(len(a)), str(a.shape[1]), "1", "1", "0", "0"] for space, a in arrays.items()]
    for row, array in zip(rows, arrays.values()):
        assert row[7:9] + row[10:] == [s for i, s in enumerate(_cosine_stats(array)) if i != 2]
        assert float(row[9]) == pytest.approx(float(_cosine_stats(array)[2]), abs=2e-4)
    assert _text(page, "distributions").startswith(
        "Distributions per space Norms are of every row; pairwise cosines of up to 2,000 rows "
        "sampled per space (every pair). Vectors are L2-normalised: every norm should be 1 "
        "within 0.001.")
    header = [th.all_text() for th in page.section("distributions").find_all("th")]
    assert header == ["space", "rows", "dim", "min norm", "max norm", "|norm − 1| > 0.001",
                      "non-finite rows", "pairs", "cosine mean", "p5", "median", "p95"]
    images = page.section("distributions").find_all("img")
    assert [i.attrs["alt"] for i in images] == ["L2 norm per space",
                                                "pairwise cosine similarity per space"]
    for image in images:
        decode_png(image.attrs["src"])


def _maps_legend_counts_the_sampled_categories(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    categories = quick.table.column("main_category").to_pylist()
    counts = {c: categories.count(c) for c in set(categories)}
    assert _rows(page, "maps") == [[c, str(counts[c])] for c in sorted(counts)]
    assert _text(page, "maps").startswith(
        "2-D maps per space Up to 5,000 items sampled per space (seeded), projected on the two "
        "principal axes of the sample (PCA). Items of one category should gather. Coloured by "
        f"'main_category': the {len(counts)} most frequent categories among the sampled items, "
        "all others grey.")
    [image] = page.section("maps").find_all("img")
    assert image.attrs["alt"] == "2-D PCA map of sampled items per space"


def _graph_scores(quick: QuickRun, space: str) -> np.ndarray:
    return np.load(quick.knn / (KNN_FUSED_SCORES if space == "fused" else KNN_TEXT_SCORES))


def _neighbour_table_titles_and_cosines(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    ids = quick.table.column("asin").to_pylist()
    titles = quick.table.column("title").to_pylist()
    categories = quick.table.column("main_category").to_pylist()
    has_image = pq.read_table(quick.fused / FUSED_ITEMS).column("has_image").to_pylist()
    table = page.section("neighbours").by_class("neighbours")[0]
    assert [th.all_text() for th in table.find_all("th")] == [
        "item", "top-5 in the text space", "top-5 in the fused space"]
    rows = table.find_all("tr")[1:]
    rng = np.random.default_rng(0)  # the report's seed: its map sample first, then the items
    rng.choice(N, N, replace=False)
    drawn = np.sort(rng.choice(N, 12, replace=False))
    assert [tr.by_class("id")[0].all_text() for tr in rows] == [ids[r] for r in drawn]
    for tr in rows:
        first, *lists = [c for c in tr.children if c.tag == "td"]
        row = ids.index(first.by_class("id")[0].all_text())
        top = {s: quick.graphs[s][row][:5] for s in ("text", "fused")}
        shared = set(top["text"]) & set(top["fused"])
        assert " ".join(first.all_text().split()) == (
            f"{titles[row] or '(no title)'} [{categories[row]}]{ids[row]} "
            f"{'with image' if has_image[row] else 'no image'}; {len(shared)} of 5 shared")
        for space, cell in zip(("text", "fused"), lists):
            scores = _graph_scores(quick, space)[row][:5]
            entries = cell.find_all("li")
            assert [" ".join(li.all_text().split()) for li in entries] == [
                f"{titles[r] or '(no title)'} [{categories[r]}] {s:.3f}"
                for r, s in zip(top[space], scores)]
            assert [li.attrs.get("class") == "both" for li in entries] == [
                r in shared for r in top[space]]
    assert _text(page, "neighbours").startswith(
        "Neighbours: text vs fused Neighbours are read from the kNN graph (knn_text.npy, "
        "knn_fused.npy). On these items the graph shares 60 of the 60 exact top-5 text "
        "neighbours and 60 of the 60 exact top-5 fused neighbours. 12 items drawn at random "
        "(seeded). Bold neighbours are in both lists; the grey number is the cosine "
        "similarity; [brackets] hold the category.")


def _modality_mix_table_and_purity_by_group(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    mix = json.loads((quick.knn / KNN_META).read_text())["modality_mix"]
    shares = mix["photo_share"]
    assert _rows(page, "modality") == [
        [name, str(mix[f"items_{group}"]), f"{mix['base_rate']:.4g}",
         f"{shares['text'][group]:.4g}", f"{shares['fused'][group]:.4g}",
         f"{shares['fused'][group] - shares['text'][group]:+.3f}"]
        for name, group in (("items with a photo", "with_photo"),
                            ("items without a photo", "without_photo"))]
    has_image = pq.read_table(quick.fused / FUSED_ITEMS).column("has_image").to_numpy()
    categories = np.array(quick.table.column("main_category").to_pylist())
    expected = []
    for name, members in (("all items", np.ones(N, bool)), ("items with a photo", has_image),
                          ("items without a photo", ~has_image)):
        purity = [(categories[quick.graphs[s]] == categories[:, None]).mean(1)[members].mean()
                  for s in ("text", "fused")]
        expected.append([name, *(f"{p:.4g}" for p in purity), f"{purity[1] - purity[0]:+.3f}"])
    assert _rows(page, "modality", 1) == expected
    headers = [[th.all_text() for th in t.find_all("th")]
               for t in page.section("modality").find_all("table")]
    assert headers == [["group", "items", "base rate (share of items with a photo)",
                        "photo share: text space", "photo share: fused space", "fused − text"],
                       ["group", "purity: text space", "purity: fused space", "fused − text"]]
    section = _text(page, "modality")
    assert section.startswith(
        "Modality mix Share of neighbours that have a photo, for items with and without one, "
        "from every item's top-8 neighbours in the kNN graphs. A space that ranks items by what "
        "they are gives both groups about the base rate")
    assert "The fused space should stay within 0.10 of the text space in both groups." in section
    assert (f"Largest gap {mix['departure']:+.3f}; not judged: a group has fewer than 20 items, "
            "too few for a stable share.") in section
    assert (f"Share of neighbours with the item's own 'main_category', over {N} items drawn at "
            "random (seeded) and their kNN graph neighbours.") in section
    assert not page.section("modality").by_class("warn")


def _training_curve_first_and_last_ten(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    epochs = list(range(1, 11)) + list(range(16, EPOCHS + 1))
    assert _rows(page, "training") == [
        [str(e), f"{1 / e:.4g}", f"{0.5 / e:.4g}", f"{0.001 * e:.4g}"] for e in epochs]
    assert _text(page, "training").startswith(
        "Fusion training curve 25 epoch(s), objective contrastive, lr 0.003, batch size 16, "
        "seed 0; train time 6.25 s. Loss is sim_loss + norm_weight × norm_loss; it should fall "
        "and settle.")
    assert _text(page, "training").endswith(
        "Epochs 11-15 are left out of the table (they are in the figure and in "
        "fusion_config.json).")
    [image] = page.section("training").find_all("img")
    assert image.attrs["alt"] == "fusion training loss per epoch"


def _knn_section_lists_each_graph(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    assert _rows(page, "knn") == [
        ["text", "exact", str(TEXT_DIM), '{"metric": "ip"}', "0.9871", "1,000", "0.01", "0.02",
         "–", "–", "–", "–"],
        ["fused", "exact", str(FUSED_DIM), '{"metric": "ip"}', "0.9123", "1,000", "0.01",
         "0.02", "–", "–", "–", "–"]]
    assert _text(page, "knn").startswith(
        f"kNN graph and recall k = 8 neighbours per item over {N} items; wall time 0.5 s. "
        "recall@k is measured against exact search on recall_queries random items.")
    assert [th.all_text() for th in page.section("knn").find_all("table")[0].find_all("th")] == [
        "space", "method", "dim", "index parameters", "recall@8", "recall queries",
        "build time (s)", "query time (s)", "update", "rows recomputed", "rows reused",
        "why built in full"]
    [image] = page.section("knn").find_all("img")
    assert image.attrs["alt"] == "cosine similarity to the first and k-th neighbour"


def _run_steps_stages_versions_params(quick: QuickRun, rendered: Rendered) -> None:
    page = rendered[2]
    assert _rows(page, "run") == [
        ["text", "text-run", "3.25", "encoder_name = minilm-test; text_backend = torch; "
         "device = cpu; dtype = float32; throughput_items_per_sec = 96.0"],
        ["image", "tiny", "–", "throughput_items_per_sec = 200.0"],
        ["fusion", "fusion-run", "7.5", "objective = contrastive; epochs = 25; hidden_dim = 32; "
         "output_dim = 16; final_loss = 0.125"],
        ["knn", "tiny", "0.5", "k = 8"]]
    assert _rows(page, "run", 1) == [
        ["downloads", "1.5", "3.75", "wall-clock s with a download in flight"],
        ["decoding, resize and crop", "1.2", "3", "CPU s, summed over the decode threads"],
        ["encoding", "1.9", "4.75", "wall-clock s in the encoder"],
        ["the whole processing", "2", "5", "wall-clock s from the first download to the last "
         "batch"]]
    assert ("image_decode = fast; 400 images encoded (the last attempt of each shard; seconds "
            "summed over the shards).") in _text(page, "run")
    versions = _rows(page, "run", 2)
    assert [th.all_text() for th in page.section("run").find_all("table")[2].find_all("th")] == [
        "package", "text", "image", "fusion", "knn", "report"]
    assert [r[0] for r in versions] == sorted(r[0] for r in versions)
    rows = {r[0]: r[1:] for r in versions}
    assert rows["torch"] == ["2.5.0", "–", "2.5.1", "–", "–"]
    assert rows["item-embeddings"] == ["0.1.0"] * 4 + [rows["item-embeddings"][4]]
    assert rows["matplotlib"][:4] == ["–"] * 4 and rows["matplotlib"][4] != "–"
    assert rows["pyarrow"][4] == pa.__version__ and rows["numpy"][4] == np.__version__
    params = dict(_rows(page, "run", 3))
    defaults = PipelineParams(seed=0)
    assert list(params) == list(vars(defaults))
    assert params["category_column"] == "main_category" and params["seed"] == "0"
    assert params["max_items"] == f"{defaults.max_items:,}"
    assert params["allow_private_hosts"] == "false" and params["items_uri"] == ""


def _the_report_step_writes_the_page_and_its_record(quick: QuickRun, rendered: Rendered) -> None:
    summary, text, _ = rendered
    out = quick.root / "report"
    page = (out / QA_REPORT).read_bytes()
    assert page.decode("utf-8") == text
    assert sorted(p.name for p in out.iterdir()) == [QA_REPORT, REPORT_META]
    record = json.loads((out / REPORT_META).read_text())
    assert record["files"] == {QA_REPORT: {"size": len(page),
                                           "sha256": hashlib.sha256(page).hexdigest()}}
    assert {k: record[k] for k in ("run_id", "count", "text_run_id", "image_run_id",
                                   "fusion_run_id", "knn_run_id", "neighbours",
                                   "has_categories", "drift", "sections")} == {
        "run_id": "fusion-run", "count": N, "text_run_id": "text-run", "image_run_id": "tiny",
        "fusion_run_id": "fusion-run", "knn_run_id": "tiny", "neighbours": "graph",
        "has_categories": True, "drift": {}, "sections": [k for k, _ in SECTIONS]}
    assert record["render_time_sec"] == summary["render_time_sec"] > 0
    assert summary == {"path": str(out / QA_REPORT), "size_bytes": len(page),
                       **{k: record[k] for k in ("sections", "neighbours", "has_categories",
                                                 "render_time_sec", "drift")}}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an infinite row is reported, not warned
def test_a_run_without_graph_failures_or_categories(quick, tmp_path, caplog, monkeypatch):
    """One render of a run that lacks what the quick run has: no kNN graph, no failure file
    (while image_meta.json counts 5 failures and 1,000 images), no category column, damaged
    fused rows; and the step's log line."""
    image = Path(shutil.copytree(quick.image, tmp_path / "image"))
    (image / IMG_FAILURES).unlink()
    meta = json.loads((image / IMG_META).read_text())
    for key in ("download_wall_s", "decode_cpu_s", "encode_wall_s", "max_items"):
        del meta[key]
    (image / IMG_META).write_text(json.dumps({**meta, "failed_count": 5, "count": 1000}))
    drawn = _spy_on_plots(monkeypatch)
    fused = Path(shutil.copytree(quick.fused, tmp_path / "fused"))
    array = np.load(fused / FUSED_ARRAY)
    array[1] *= 0.5  # a row the neighbour table shows (seed 0), off unit length
    array[3] = np.inf
    np.save(fused / FUSED_ARRAY, array)
    config = json.loads((fused / FUSION_CONFIG).read_text())
    config["modality_mix"] = {**config["modality_mix"], **SPLIT_MIX}
    (fused / FUSION_CONFIG).write_text(json.dumps(config))
    caplog.set_level(logging.INFO, logger="item_embeddings.report.step")
    caplog.set_level(logging.INFO, logger="item_embeddings")  # the progress lines
    started = time.perf_counter()
    summary, text = quick.write(tmp_path / "out", image=image, fused=fused, knn=None,
                                run_id="night-42",
                                params=PipelineParams(seed=0, category_column="kind"))
    page = Page(text)
    assert page.root.find_all("title")[0].all_text() == "QA report night-42"  # as given
    assert json.loads((tmp_path / "out" / REPORT_META).read_text())["run_id"] == "night-42"
    size = (tmp_path / "out" / QA_REPORT).stat().st_size
    [message] = [r.getMessage() for r in caplog.records if r.name == "item_embeddings.report.step"]
    assert message.startswith(f"QA report of {N} items: {tmp_path / 'out' / QA_REPORT} "
                              f"({size / 1e6:.2f} MB) in ")
    assert message.endswith("s")
    assert 0 < float(message.rsplit(" in ", 1)[1][:-1]) < time.perf_counter() - started + 0.05
    progress = [r.getMessage().split(" (")[0] for r in caplog.records
                if r.name == "item_embeddings" and r.getMessage().startswith("qa report")]
    assert progress == [f"qa report: text: {N}/{N} items", "qa report: image: 32/32 items",
                        f"qa report: fused: {N}/{N} items",
                        f"qa report: items table: {N}/{N} items"]
    assert json.loads((tmp_path / "out" / REPORT_META).read_text())["knn_run_id"] is None
    assert summary["neighbours"] == "exact" and summary["drift"] == {}
    assert not summary["has_categories"]
    # checks: counts that disagree and rows off unit length are warned
    checks = {r[0]: r[1:] for r in _rows(page, "summary", 1)}
    assert checks["image failures: meta file count = rows"] == ["5 vs 0", "WARN"]
    assert checks["image: meta file count = rows"] == ["1,000 vs 32", "WARN"]
    assert checks["fused vectors L2-normalised and finite"] == [f"2 of {N} rows off", "WARN"]
    assert not any(name.startswith("kNN") for name in checks)
    assert not any(r[0].startswith("kNN") for r in _rows(page, "summary"))
    dist = {r[0]: r for r in _rows(page, "distributions")}
    assert dist["fused"][3:7] == ["0.5", "1", "1", "1"]
    # without a graph, every item's neighbours are the exact ones: cosines, whatever the norms
    titles = [t or "(no title)" for t in quick.table.column("title").to_pylist()]
    ids = quick.table.column("asin").to_pylist()
    with np.errstate(all="ignore"):
        units = {"text": unit(np.load(quick.text / TXT_ARRAY)), "fused": array / np.linalg.norm(
            array, axis=1, keepdims=True)}
    table = page.section("neighbours").by_class("neighbours")[0]
    shown = set()
    for tr in table.find_all("tr")[1:]:
        first, *lists = [c for c in tr.children if c.tag == "td"]
        row = ids.index(first.by_class("id")[0].all_text())
        shown.add(row)
        for space, cell in zip(("text", "fused"), lists):
            sims = np.nan_to_num(units[space] @ units[space][row], nan=-np.inf)
            sims[row] = -np.inf
            top = [r for r in np.argsort(-sims, kind="stable")[:5] if np.isfinite(sims[r])]
            assert [" ".join(li.all_text().split()) for li in cell.find_all("li")] == [
                f"{titles[r]} {sims[r]:.3f}" for r in top]
            if not top:
                assert cell.all_text() == "none"
    assert {1, 3} <= shown
    # 4 items failed, but no file lists them: the coverage bar shows them unaccounted for
    assert drawn["plot_coverage"] == ([("embedded", 32), ("failed", 0), ("no URL", 12),
                                       ("capped", 0), ("not accounted for", 4)], N)
    assert "plot_failures" not in drawn
    assert _rows(page, "summary")[5] == ["image: beyond the max_items cap", "0", "0.0%",
                                         "max_items = –"]
    assert "Image step: where the time went" not in _text(page, "run")
    assert len(page.section("run").find_all("table")) == 3
    # no failures file
    assert _text(page, "failures") == (
        "Image failures by reason No image failed: every attempted image was downloaded, "
        "decoded and embedded.")
    # no category column
    assert ("The items table has no 'kind' column (parameter category_column): the maps are "
            "drawn in one colour.") in _text(page, "maps")
    assert not page.section("maps").find_all("table")
    assert "[" not in _text(page, "neighbours").split("category.", 1)[1]
    # no graph: exact neighbours, the fusion step's modality mix
    assert (f"No kNN graph was given: neighbours are exact, found by brute force over all {N} "
            "items.") in _text(page, "neighbours")
    assert _text(page, "knn") == (
        "kNN graph and recall No kNN graph (no knn_meta.json in the kNN directory, or none "
        "given): no recall figures. The neighbour table above is exact (brute force).")
    assert [r[0] for r in _rows(page, "run")] == ["text", "image", "fusion"]
    mix = config["modality_mix"]
    section = _text(page, "modality")
    assert (f"from the top-5 neighbours of the fusion step's {mix['items']} sampled items among "
            "themselves (no kNN graph).") in section
    # the fusion step's mix: a fused space split by photos is warned
    [warning] = page.section("modality").by_class("warn")
    assert " ".join(warning.all_text().split()) == (
        "WARNING: the fused space sorts items by whether they have a photo: the share of top-5 "
        "neighbours with a photo departs from the text space's by 0.40 (more than 0.10); items "
        "with photo: 0.50 in the text space, 0.90 in the fused space; items without photo: 0.50 "
        "in the text space, 0.20 in the fused space")
    assert checks["modality mix: fused vs text photo share of neighbours"] == [
        "largest gap 0.400 (tolerance 0.10)", "WARN"]
    assert section.endswith("Category purity by group needs the items table's 'kind' column "
                            "(parameter category_column).")


def _copy_run(quick: QuickRun, tmp_path: Path) -> QuickRun:
    root = Path(shutil.copytree(quick.root, tmp_path / "run", ignore=shutil.ignore_patterns(
        "report")))
    return QuickRun(root, root / ITEMS_NAME, root / "text", root / "image", root / "fused",
                    root / "knn", quick.table, quick.graphs)


def _refused(run: QuickRun, tmp_path: Path, error=ReportInputError, **kwargs) -> str:
    with pytest.raises(error) as caught:
        run.write(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / QA_REPORT).exists()
    return str(caught.value)


def test_step_files_that_are_missing_or_do_not_line_up_are_named(quick, tmp_path):
    run = _copy_run(quick, tmp_path)
    text, image, fused, knn = run.text, run.image, run.fused, run.knn
    (text / TXT_META).rename(text / "meta.bak")
    assert _refused(run, tmp_path) == (f"{text / TXT_META} not found (the step's meta file is "
                                       "written last: did the step finish?)")
    (text / "meta.bak").rename(text / TXT_META)
    (image / IMG_META).write_text("{not json")
    assert _refused(run, tmp_path).startswith(f"{image / IMG_META} is not valid JSON: ")
    shutil.copy(quick.image / IMG_META, image / IMG_META)
    pq.write_table(pq.read_table(fused / FUSED_ITEMS).drop_columns(["has_image"]),
                   fused / FUSED_ITEMS)
    assert _refused(run, tmp_path) == f"{fused / FUSED_ITEMS} has no column(s) has_image"
    ids = quick.table.column("asin").to_pylist()
    for listed in (ids[1:] + ids[:1], ids[:-1]):
        pq.write_table(pa.table({"id": listed, "has_image": [True] * len(listed)}),
                       fused / FUSED_ITEMS)
        assert _refused(run, tmp_path) == (f"{fused / FUSED_ITEMS} does not list the ids of "
                                           f"{text / TXT_ITEMS} in the same order")
    shutil.copy(quick.fused / FUSED_ITEMS, fused / FUSED_ITEMS)
    (text / TXT_ITEMS).rename(text / "items.bak")
    assert _refused(run, tmp_path) == f"{text / TXT_ITEMS} not found"
    (text / "items.bak").rename(text / TXT_ITEMS)
    np.save(fused / FUSED_ARRAY, np.load(quick.fused / FUSED_ARRAY)[1:])
    assert _refused(run, tmp_path) == (f"{fused / FUSED_ARRAY} has shape ({N - 1}, {FUSED_DIM}),"
                                       f" but {FUSED_ITEMS} lists {N} rows")
    np.save(fused / FUSED_ARRAY, np.load(quick.fused / FUSED_ARRAY)[:, 0])
    assert _refused(run, tmp_path) == (f"{fused / FUSED_ARRAY} has shape ({N},), but "
                                       f"{FUSED_ITEMS} lists {N} rows")
    (fused / FUSED_ARRAY).unlink()
    assert _refused(run, tmp_path) == f"{fused / FUSED_ARRAY} not found"
    shutil.copy(quick.fused / FUSED_ARRAY, fused / FUSED_ARRAY)
    rows = pq.read_table(quick.image / IMG_ITEMS)
    m = rows.num_rows
    for bad in (m, -1):
        pq.write_table(rows.set_column(2, "row", pa.array([bad] + list(range(1, m)), pa.int64())),
                       image / IMG_ITEMS)
        assert _refused(run, tmp_path) == (f"{image / IMG_ITEMS}: 'row' must be an img.npy row "
                                           f"in [0, {m})")
    for unknown in (["zz"], [f"z{i}" for i in range(7)]):
        listed = rows.column("id").to_pylist()
        listed[-len(unknown):] = unknown
        pq.write_table(rows.set_column(0, "id", pa.array(listed)), image / IMG_ITEMS)
        assert _refused(run, tmp_path) == (f"{len(unknown)} id(s) of {image / IMG_ITEMS} are "
                                           f"not in {TXT_ITEMS}, e.g. {unknown[:5]}")
    shutil.copy(quick.image / IMG_ITEMS, image / IMG_ITEMS)
    np.save(knn / KNN_TEXT, np.load(quick.knn / KNN_TEXT)[1:])
    assert _refused(run, tmp_path) == (f"{knn / KNN_TEXT} has shape ({N - 1}, 8), but "
                                       f"{TXT_ITEMS} lists {N} rows")
    shutil.copy(quick.knn / KNN_TEXT, knn / KNN_TEXT)
    meta = json.loads((quick.knn / KNN_META).read_text())
    (knn / KNN_META).write_text(json.dumps({**meta, "count": N + 1}))
    assert _refused(run, tmp_path) == (f"{knn / KNN_META} count is {N + 1}, but {TXT_ITEMS} "
                                       f"lists {N} items (a graph of another run?)")
    shutil.copy(quick.knn / KNN_META, knn / KNN_META)
    np.save(knn / KNN_FUSED_SCORES, np.load(quick.knn / KNN_FUSED_SCORES)[:, 1:])
    assert _refused(run, tmp_path) == (f"{knn / KNN_FUSED_SCORES} has shape ({N}, 7), "
                                       f"{KNN_FUSED} ({N}, 8)")
    shutil.copy(quick.knn / KNN_FUSED_SCORES, knn / KNN_FUSED_SCORES)
    # a row outside the table: among the neighbours shown (column 3) or only among those the
    # modality mix reads (column 6, beyond the top 5)
    for graph_file in (KNN_TEXT, KNN_FUSED):
        for column, bad in ((3, N), (3, -2), (6, N), (6, -2)):
            graph = np.load(quick.knn / graph_file)
            graph[:, column] = bad
            np.save(knn / graph_file, graph)
            assert _refused(run, tmp_path) == (f"{graph_file} holds row {bad} outside "
                                               f"[0, {N})")
        shutil.copy(quick.knn / graph_file, knn / graph_file)


def test_an_items_table_other_than_the_one_embedded_is_named(quick, tmp_path):
    run = _copy_run(quick, tmp_path)
    ids = quick.table.column("asin").to_pylist()
    swapped = ids[:]
    swapped[20], swapped[21] = ids[21], ids[20]
    table = quick.table.set_column(0, "asin", pa.array(swapped))
    other = tmp_path / "other.parquet"
    pq.write_table(table, other, row_group_size=7)  # read in several batches
    assert _refused(run, tmp_path, items=other) == (
        f"items table {other} row 20 has id {ids[21]!r}, but {TXT_ITEMS} row 20 is "
        f"{ids[20]!r}: the report needs the table the run embedded")
    longer = pa.concat_tables([quick.table, quick.table.slice(0, 1)])
    pq.write_table(longer, other, row_group_size=7)
    assert _refused(run, tmp_path, items=other) == (
        f"items table {other} has {N + 1} rows, {TXT_ITEMS} {N}: the report needs the table "
        "the run embedded")
    pq.write_table(quick.table.drop_columns(["title"]), other)
    assert _refused(run, tmp_path, ItemsError, items=other) == (
        f"items table {other} has no column 'title'; columns present: asin, description, "
        "image_url, main_category")
    assert _refused(run, tmp_path, ItemsError, items=other,
                    params=PipelineParams(seed=0, id_column="sku")).startswith(
        f"items table {other} has no column 'sku'; columns present: ")


def test_category_labels_as_the_legend_shows_them():
    assert category_label(["Electronics", None, "Cables"]) == "Electronics > Cables"
    assert category_label(("A",)) == "A"
    assert category_label([]) == category_label([None]) == MISSING_CATEGORY == "(missing)"
    assert category_label("  Cables ") == "Cables"
    assert category_label("   ") == category_label(None) == "(missing)"
    assert category_label(7) == "7"


# The figures: what each plot shows (titles, axis labels, legend entries, bars, points, colours),
# read from the matplotlib figure the page's PNG is drawn from.


def _legend(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _hex(colour) -> str:
    from matplotlib.colors import to_hex

    return to_hex(colour)


def test_coverage_and_failure_bars():
    fig = plot_coverage.__wrapped__([("embedded", 30), ("failed", 5), ("no URL", 15)], 50)
    [ax] = fig.axes
    assert _legend(fig) == ["embedded: 30 (60.0%)", "failed: 5 (10.0%)", "no URL: 15 (30.0%)"]
    assert [(p.get_x(), p.get_width()) for p in ax.patches] == [(0, 60), (60, 10), (70, 30)]
    assert [_hex(p.get_facecolor()) for p in ax.patches] == ["#2ca02c", "#d62728", "#9e9e9e"]
    assert ax.get_xlim() == (0, 100) and ax.get_xlabel() == "% of items"
    assert list(ax.get_yticks()) == []
    assert fig.legends[0]._ncols == 3
    empty = plot_coverage.__wrapped__([("embedded", 0)], 0)
    assert _legend(empty) == ["embedded: 0 (0.0%)"]

    fig = plot_failures.__wrapped__([("http_error", 1200), ("timeout", 3)])
    [ax] = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["timeout", "http_error"]
    assert [p.get_width() for p in ax.patches] == [3, 1200]
    assert [t.get_text() for t in ax.texts] == ["3", "1,200"]
    assert ax.get_title() == "Image failures by reason" and ax.get_xlabel() == "items"
    assert fig.get_size_inches()[1] == pytest.approx(0.45 * 2 + 1.2)


def test_norm_and_pairwise_histograms():
    norms = {"text": np.array([1.0, 1.0, np.nan], np.float32),
             "image": np.array([np.inf], np.float32),
             "fused": np.array([0.5, 1.0, 1.5], np.float32)}
    fig = plot_norms.__wrapped__(norms)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["text: L2 norm of 3 rows",
                                               "image: L2 norm of 1 rows",
                                               "fused: L2 norm of 3 rows"]
    assert [ax.get_xlabel() for ax in axes] == ["norm − 1"] * 3
    assert axes[0].get_ylabel() == "rows"
    assert [t.get_text() for t in axes[1].texts] == ["no vectors"] and not axes[1].patches
    heights = [p.get_height() for p in axes[0].patches]
    assert len(heights) == 60 and sum(heights) == 2
    assert axes[0].patches[0].get_x() == pytest.approx(-1e-6)
    assert axes[2].patches[0].get_x() == pytest.approx(-0.5)
    assert axes[2].patches[-1].get_x() + axes[2].patches[-1].get_width() == pytest.approx(0.5)
    assert _hex(axes[2].patches[0].get_facecolor()) == "#2ca02c"
    assert axes[0].xaxis.get_ticklabels()[0].get_rotation() == 20

    cosines = {"text": np.array([0.5, -0.5, 0.25]), "image": np.array([]),
               "fused": np.array([0.9])}
    fig = plot_pairwise.__wrapped__(cosines)
    [ax] = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["text (3 pairs)",
                                                                   "fused (1 pairs)"]
    assert ax.get_xlim() == (-1, 1) and ax.get_title() == "Pairwise cosine similarity per space"
    assert ax.get_xlabel() == "cosine similarity of two random items"
    assert ax.get_ylabel() == "density"
    assert [_hex(p.get_edgecolor()) for p in ax.patches] == ["#1f77b4", "#2ca02c"]


def test_maps_colour_the_legend_categories_and_grey_the_others():
    coords = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [3.0, 1.0]])
    long = "A category name that is longer than forty characters"
    panels = [MapPanel("text", coords, ["a", long, "other", "a"], np.array([0.6, 0.25])),
              MapPanel("fused", np.zeros((0, 2)), [], np.zeros(2))]
    fig = plot_maps.__wrapped__(panels, [("a", 2), (long, 1)])
    text, fused = fig.axes
    assert text.get_title() == "text: 4 sampled items"
    assert text.get_xlabel() == "PC1 (60.0% of variance)" and text.get_ylabel() == "PC2 (25.0%)"
    grey, shown = text.collections
    np.testing.assert_array_equal(grey.get_offsets(), [[2.0, 2.0]])
    np.testing.assert_array_equal(shown.get_offsets(), coords[[0, 1, 3]])
    assert [_hex(c) for c in grey.get_facecolors()] == ["#c8c8c8"]
    assert [_hex(c) for c in shown.get_facecolors()] == ["#1f77b4", "#ff7f0e", "#1f77b4"]
    assert list(shown.get_sizes()) == [30.0]
    assert [t.get_text() for t in fused.texts] == ["no vectors"]
    short = long[:39] + "…"
    assert _legend(fig) == ["a (2)", f"{short} (1)", "other categories"]
    assert fig.legends[0].get_title().get_text() == "category (sampled items)"
    assert [_hex(h.get_color()) for h in fig.legends[0].legend_handles] == [
        "#1f77b4", "#ff7f0e", "#c8c8c8"]

    many = MapPanel("image", np.arange(2000.0).reshape(1000, 2), [""] * 1000, np.zeros(2))
    fig = plot_maps.__wrapped__([many], [])
    [ax] = fig.axes
    [points] = [c for c in ax.collections if len(c.get_offsets())]
    assert {_hex(c) for c in points.get_facecolors()} == {"#ff7f0e"}
    assert list(points.get_sizes()) == [20.0] and not fig.legends


def test_training_and_neighbour_score_plots():
    history = [{"loss": 1.0, "sim_loss": 0.5, "norm_loss": 0.1},
               {"loss": 0.5, "sim_loss": 0.25}]
    fig = plot_training.__wrapped__(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "sim_loss", "norm_loss"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch"] * 3
    assert fig.axes[0].get_ylabel() == "mean loss over the epoch"
    lines = [ax.lines[0] for ax in fig.axes]
    assert [list(line.get_xdata()) for line in lines] == [[1, 2]] * 3
    np.testing.assert_array_equal(lines[2].get_ydata(), [0.1, np.nan])
    assert list(lines[0].get_ydata()) == [1.0, 0.5]

    scores = {"text": np.array([[0.9, 0.5, 0.1], [0.8, np.nan, 0.2]], np.float32),
              "fused": np.array([[0.7, 0.6, 0.4]], np.float32)}
    fig = plot_neighbour_scores.__wrapped__(scores, 8)
    assert [ax.get_title() for ax in fig.axes] == [
        "text: cosine to the graph's neighbours (2 sampled items)",
        "fused: cosine to the graph's neighbours (1 sampled items)"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "1st neighbour", "neighbour 8"]
    assert fig.axes[0].get_xlabel() == "cosine similarity" and fig.axes[0].get_ylabel() == "items"
    first, last = fig.axes[0].patches
    assert first.get_xy()[:, 0].min() == pytest.approx(0.8)
    assert last.get_xy()[:, 0].max() == pytest.approx(0.2)


def test_a_plot_is_a_png_that_reads_dollars_as_text():
    png = plot_failures([("$\\bogus{5}$ reason", 2)])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"Software" not in png
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (8 * 80, round((0.45 + 1.2) * 80))


def test_graphs_updated_from_a_previous_set_with_their_drift(quick, tmp_path, monkeypatch):
    """A kNN directory updated incrementally: the update columns, the drift table, values
    shown as the page formats them (small, not-a-number, a dict), and a mix within tolerance;
    fewer pairs and purity items than the run has rows, so both are samples."""
    monkeypatch.setattr(analysis, "PAIR_ROWS", 20)
    monkeypatch.setattr(analysis, "MIX_QUERIES", 10)
    run = _copy_run(quick, tmp_path)
    meta = json.loads((quick.knn / KNN_META).read_text())
    meta["spaces"]["text"].update({
        "update": "incremental", "rebuild_reason": None, "recomputed_count": 11,
        "reused_count": 37, "drift": {"items": 45, "top": 20, "mean_overlap": 0.97,
                                      "identical_share": 0.5, "p10_overlap": 0.35,
                                      "previous_run_id": "night-<41>"}})
    meta["spaces"]["fused"].update({
        "update": "full", "rebuild_reason": "encoder changed", "build_time_sec": 0.000123,
        "query_time_sec": float("nan"), "recall_at_k": 1.0,
        "index_params": {"nlist": 4, "metric": "ip"},
        "drift": {"items": 45, "top": 20, "mean_overlap": 0.42, "identical_share": 0.0,
                  "p10_overlap": 0.1, "previous_run_id": "night-<41>"}})
    meta["modality_mix"] = {**meta["modality_mix"], **SPLIT_MIX,
                            "photo_share": {"text": {"with_photo": 0.5, "without_photo": 0.5},
                                            "fused": {"with_photo": 0.45,
                                                      "without_photo": 0.53}},
                            "departure": 0.05}
    (run.knn / KNN_META).write_text(json.dumps(meta))
    image_meta = json.loads((quick.image / IMG_META).read_text())
    del image_meta["decode_cpu_s"], image_meta["image_decode"]
    (run.image / IMG_META).write_text(json.dumps(
        {**image_meta, "encoded_this_attempt": 0, "throughput_items_per_sec": 0}))
    config = json.loads((quick.fused / FUSION_CONFIG).read_text())
    del config["run_id"]  # a run id neither given nor recorded
    (run.fused / FUSION_CONFIG).write_text(json.dumps(config))
    summary, text = run.write(tmp_path / "out", run_id=None)  # the step's default
    page = Page(text)
    assert page.root.find_all("title")[0].all_text() == "QA report "
    assert page.root.by_class("meta")[0].all_text().startswith(f"run – · {N} items · ")
    assert json.loads((tmp_path / "out" / REPORT_META).read_text())["run_id"] == ""
    assert summary["drift"] == {s: meta["spaces"][s]["drift"] for s in ("text", "fused")}
    assert _rows(page, "knn") == [
        ["text", "exact", str(TEXT_DIM), '{"metric": "ip"}', "0.9871", "1,000", "0.01", "0.02",
         "incremental", "11", "37", "–"],
        ["fused", "exact", str(FUSED_DIM), '{"metric": "ip", "nlist": 4}', "1", "1,000",
         "1.230e-04", "nan", "full", "–", "–", "encoder changed"]]
    assert _rows(page, "knn", 1) == [["text", "45", "0.97", "0.5", "0.35"],
                                     ["fused", "45", "0.42", "0", "0.1"]]
    assert [th.all_text() for th in page.section("knn").find_all("table")[1].find_all("th")] == [
        "space", "unchanged items", "mean top-20 overlap", "identical lists", "10th percentile"]
    section = _text(page, "knn")
    assert ("Night-over-night drift For the items whose content (text and image keys) is "
            "unchanged since the previous set (run night-<41>): the share of their first 20 "
            "neighbours that were among their first 20 in the previous set.") in section
    assert _rows(page, "run", 1) == [
        ["downloads", "1.5", "–", "wall-clock s with a download in flight"],
        ["encoding", "1.9", "–", "wall-clock s in the encoder"],
        ["the whole processing", "–", "–", "wall-clock s from the first download to the last "
         "batch"]]
    assert "image_decode = exact; 0 images encoded" in _text(page, "run")
    assert "night-&lt;41&gt;" in text and "&amp;lt;" not in text  # escaped once, read as it is
    assert [r[7] for r in _rows(page, "distributions")] == ["190"] * 3  # 20 rows: every pair
    mix_rows = np.sort(np.random.default_rng([0, 3]).choice(N, 10, replace=False))
    has_image = pq.read_table(quick.fused / FUSED_ITEMS).column("has_image").to_numpy()[mix_rows]
    categories = np.array(quick.table.column("main_category").to_pylist())
    purity = [(categories[quick.graphs[s][mix_rows]] == categories[mix_rows, None]).mean(1)
              for s in ("text", "fused")]
    assert [r[1:3] for r in _rows(page, "modality", 1)] == [
        [f"{p[members].mean():.4g}" for p in purity]
        for members in (np.ones(10, bool), has_image, ~has_image)]
    modality = _text(page, "modality")
    assert "over 10 items drawn at random (seeded)" in modality
    assert "Largest gap +0.050: within 0.10." in modality
    assert page.section("modality").by_class("ok") and not page.section("modality").by_class(
        "warn")
    assert _rows(page, "modality")[0][3:] == ["0.5", "0.45", "-0.050"]
    checks = {r[0]: r[1:] for r in _rows(page, "summary", 1)}
    assert checks["modality mix: fused vs text photo share of neighbours"] == [
        "largest gap 0.050 (tolerance 0.10)", "OK"]


def test_a_run_that_recorded_no_modality_mix_says_so():
    items = ItemRows(titles={}, categories=None, category_column="main_category")
    assert modality_section(ModalityMix(None, "none", None, 0, None), items) == (
        "<p>Neither knn_meta.json nor fusion_config.json records a modality mix (outputs of a "
        "version before it was measured).</p>")
    # categories but no graph: the purity by group cannot be measured, said so
    mix = {"items": 10, "k": 5, "base_rate": 0.5, "items_with_photo": 5,
           "items_without_photo": 5, "photo_share": {}, "departure": None}
    with_categories = ItemRows(titles={}, categories={0: "a"}, category_column="main_category")
    page = Page(modality_section(ModalityMix(mix, "fusion sample", None, 0, None),
                                 with_categories))
    assert page.root.find_all("p")[-1].all_text() == (
        "Category purity by group needs the kNN graphs.")
    assert page.root.find_all("p")[-1].attrs["class"] == "note"
    assert table_rows(page.root.find_all("table")[0]) == [
        ["items with a photo", "5", "0.5", "–", "–", "–"],
        ["items without a photo", "5", "0.5", "–", "–", "–"]]


def test_failing_hosts_lists_the_ten_with_the_most_failures():
    urls = [f"http://h{i:02d}.example/{j}.jpg" for i in range(12) for j in range(12 - i)]
    urls += [None, "not a url"]
    reasons = ["timeout"] * (len(urls) - 3) + ["http_error", "no_url", "bad_url"]
    page = Page(failing_hosts(pa.table({"url": urls, "reason": reasons})))
    rows = table_rows(page.root.find_all("table")[0])
    assert [r[:2] for r in rows] == [[f"h{i:02d}.example", str(12 - i)] for i in range(10)]
    assert rows[0][2] == "timeout 12"
    assert page.root.find_all("h3")[0].all_text() == "Hosts with the most failures (top 10)"
    bad = Page(failing_hosts(pa.table({"url": [None, "x", "http://a.example/1"],
                                       "reason": ["no_url", "bad_url", "timeout"]})))
    assert table_rows(bad.root.find_all("table")[0]) == [
        ["(no host)", "2", "no_url 1, bad_url 1"], ["a.example", "1", "timeout 1"]]
    assert failing_hosts(pa.table({"id": ["a"], "reason": ["timeout"]})) == ""


def test_neighbour_lists_mark_shared_rows_including_row_0_and_skip_padding(quick):
    inputs = load_run_inputs(quick.text, quick.image, quick.fused, None)
    titles = dict(enumerate(quick.table.column("title").to_pylist()))
    items = ItemRows(titles=titles, categories=None, category_column="main_category")
    rows = {"text": np.array([[0, 2, 3, -1, -1], [-1] * 5]),
            "fused": np.array([[3, 0, 4, 5, -1], [0, 1, -1, -1, -1]])}
    scores = {"text": np.array([[0.9, 0.8, 0.7, -np.inf, -np.inf], [-np.inf] * 5]),
              "fused": np.array([[0.95, 0.85, 0.75, 0.65, -np.inf],
                                 [0.5, 0.25, -np.inf, -np.inf, -np.inf]])}
    queries = np.array([1, 5])
    found = Neighbours("exact", rows, scores, {})
    page = Page(neighbours_section(inputs, items, queries, found))
    first, second = page.root.find_all("tr")[1:]
    text_cell, fused_cell = [c for c in first.children if c.tag == "td"][1:]
    assert [(li.all_text().strip(), li.attrs.get("class")) for li in text_cell.find_all("li")] == [
        (f"{titles[0]} 0.900", "both"), (f"{titles[2]} 0.800", None),
        (f"{titles[3]} 0.700", "both")]
    assert [li.attrs.get("class") for li in fused_cell.find_all("li")] == [
        "both", "both", None, None]
    assert "2 of 5 shared" in first.all_text()
    cells = [c for c in second.children if c.tag == "td"]
    assert " ".join(" ".join(_leaves(cells[0])).split()) == (
        f"(no title) {quick.table.column('asin')[5]} with image; 0 of 5 shared")
    assert cells[1].all_text() == "none" and cells[1].by_class("note")
    assert [li.all_text().strip() for li in cells[2].find_all("li")] == [
        f"{titles[0]} 0.500", f"{titles[1]} 0.250"]


def test_the_page_style_keeps_its_rules():
    """What the reader sees of the styles: warnings red and bold, passes green, notes grey and
    italic, tables with borders, shared neighbours bold (the browser test sees the layout)."""
    rules = {}
    for rule in CSS.replace("\n", "").split("}"):
        if rule:
            selector, declarations = rule.split("{")
            rules[selector] = dict(d.split(":", 1) for d in declarations.split(";"))
    assert list(rules) == ["body", "h1", "h2", "table", "th,td", "th", "td", "figure", "img",
                           "nav ul", ".meta,.note", ".note", ".ok", ".warn", ".info",
                           "table.neighbours td", "table.neighbours ol", ".cat", ".score",
                           ".both", ".id"]
    assert rules[".warn"] == {"color": "#b3261e", "font-weight": "600"}
    assert rules[".ok"] == {"color": "#1a7f37", "font-weight": "600"}
    assert rules[".note"] == {"font-style": "italic"} and rules[".meta,.note"] == {
        "color": "#555"}
    assert rules[".both"] == {"font-weight": "600"}
    assert rules["th,td"]["border"] == "1px solid #ddd"
    assert rules["table"] == {"border-collapse": "collapse", "margin": "12px 0",
                              "font-size": "14px"}
    assert rules["img"] == {"max-width": "100%", "height": "auto"}
    assert rules["body"]["max-width"] == "1400px"


def test_pca_of_a_few_rows_and_its_signs():
    x = np.array([[-2.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, np.nan]], np.float32)
    coords, keep, share = analysis.pca_2d(x)
    assert keep.tolist() == [True] * 4 + [False]
    np.testing.assert_allclose(coords[:, 0], [-2, -1, 1, 2], atol=1e-12)  # largest loading +
    np.testing.assert_allclose(share, [1, 0], atol=1e-12)
    flipped, _, _ = analysis.pca_2d(-x)
    np.testing.assert_allclose(flipped[:, 0], [2, 1, -1, -2], atol=1e-12)
    one, keep, share = analysis.pca_2d(x[:1])
    assert one.shape == (1, 2) and not one.any() and share.tolist() == [0, 0]
    same, _, share = analysis.pca_2d(np.ones((3, 4), np.float32))
    assert same.shape == (3, 2) and share.tolist() == [0, 0]
    line, _, share = analysis.pca_2d(np.array([[0.0], [1.0], [3.0]], np.float32))
    assert line.shape == (3, 2) and not line[:, 1].any()
    np.testing.assert_allclose(share, [1, 0])


def test_exact_neighbours_of_a_table_smaller_than_five_rows():
    """Four rows: three neighbours each, and the query itself as -1 (never shown)."""
    x = unit(np.array([[1, 0], [1, 0.1], [0, 1], [1, 0.2]], np.float32))
    scan = analysis.scan_space(x, np.array([0, 3]), np.array([0, 2]), "test")
    assert scan.exact_rows.tolist() == [[1, 3, 2, -1], [3, 1, 0, -1]]
    assert np.isneginf(scan.exact_scores[:, 3]).all()
    np.testing.assert_allclose(scan.exact_scores[0, :3], x[0] @ x[[1, 3, 2]].T, rtol=1e-6)
    np.testing.assert_array_equal(scan.sample, x[[0, 3]])
    assert scan.count == 4 and scan.dim == 2 and scan.off_unit == 0 and scan.nonfinite == 0
    plain = analysis.scan_space(x, np.array([1]), None, "test")
    assert plain.exact_rows is None and plain.exact_scores is None


def test_category_legend_most_frequent_first_ties_alphabetical():
    labels = ["b", "a", "c", "b", "a", "d"] + [f"x{i}" for i in range(10)]
    assert analysis.category_legend(labels) == [
        ("a", 2), ("b", 2), ("c", 1), ("d", 1), ("x0", 1), ("x1", 1), ("x2", 1), ("x3", 1),
        ("x4", 1)]
    assert analysis.category_legend([]) == []


def test_a_graph_of_one_space_is_not_used_for_the_neighbour_table(quick, tmp_path):
    run = _copy_run(quick, tmp_path)
    meta = json.loads((quick.knn / KNN_META).read_text())
    del meta["spaces"]["fused"]
    (run.knn / KNN_META).write_text(json.dumps(meta))
    (run.knn / KNN_FUSED).unlink()
    params = PipelineParams(seed=0)
    inputs = load_run_inputs(run.text, run.image, run.fused, run.knn)
    assert set(inputs.knn.neighbours) == {"text"}
    findings = analysis.analyse_run(inputs, str(run.items), params)
    assert findings.neighbours.source == "exact" and findings.neighbours.exact_overlap == {}
    assert findings.modality.purity is None and findings.modality.purity_items == 0
    np.testing.assert_array_equal(findings.neighbours.rows["text"],
                                  findings.scans["text"].exact_rows)


def test_training_section_of_a_fusion_step_without_history():
    assert training_section({"loss_history": []}) == (
        "<p>fusion_config.json has no loss_history.</p>")
    page = Page(training_section({"loss_history": [{"loss": 0.5}]}))
    assert page.root.find_all("p")[0].all_text() == (
        "1 epoch(s), objective –, lr –, batch size –, seed –; train time – s. Loss is "
        "sim_loss + norm_weight × norm_loss; it should fall and settle.")
    assert table_rows(page.root.find_all("table")[0]) == [["1", "0.5", "–", "–"]]
    many = Page(training_section({"loss_history": [{"loss": e} for e in range(1, 22)]}))
    assert [r[0] for r in table_rows(many.root.find_all("table")[0])] == [
        str(e) for e in (*range(1, 11), *range(12, 22))]
    assert many.root.find_all("p")[-1].all_text() == (
        "Epochs 11-11 are left out of the table (they are in the figure and in "
        "fusion_config.json).")
    assert many.root.find_all("p")[-1].attrs["class"] == "note"
    assert [th.all_text() for th in many.root.find_all("th")] == [
        "epoch", "loss", "sim_loss", "norm_loss"]
    # up to MAX_EPOCH_ROWS (20) every epoch is listed and nothing is said to be left out
    twenty = training_section({"loss_history": [{"loss": e} for e in range(1, 21)]})
    assert [r[0] for r in table_rows(Page(twenty).root.find_all("table")[0])] == [
        str(e) for e in range(1, 21)]
    assert twenty.endswith("</table>") and len(Page(twenty).root.find_all("p")) == 1
    # 5 asked for, 50 trained for fusion_min_steps (a small catalogue)
    raised = Page(training_section({"loss_history": [{"loss": 1.0}] * 50, "epochs": 5,
                                    "min_steps": 200, "objective": "o"}))
    assert raised.root.find_all("p")[0].all_text().startswith(
        "50 epoch(s) (5 asked for; more to reach fusion_min_steps 200), objective o, lr –")
    five = Page(training_section({"loss_history": [{"loss": 1.0}] * 5, "epochs": 5}))
    assert five.root.find_all("p")[0].all_text().startswith("5 epoch(s), objective –")


def _inside(inner, outer) -> bool:
    return (inner.x0 >= outer.x0 - 0.5 and inner.y0 >= outer.y0 - 0.5
            and inner.x1 <= outer.x1 + 0.5 and inner.y1 <= outer.y1 + 0.5)


def test_legends_and_labels_stay_clear_of_the_plots():
    """Laid out as drawn: each legend beside its axes (below the coverage bar, right of the
    maps), not over the points, and every axis label inside the picture."""
    coords = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    forty = "c" * 40
    figures = {
        "coverage": plot_coverage.__wrapped__([("embedded", 30), ("failed", 5),
                                               ("no URL", 15)], 50),
        "maps": plot_maps.__wrapped__([MapPanel("text", coords, ["a", forty, "b"],
                                                np.array([0.5, 0.3]))],
                                      [("a", 1), (forty, 1)]),
    }
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for name, fig in figures.items():
        canvas = FigureCanvasAgg(fig)  # what savefig draws the PNG with
        canvas.draw()
        renderer = canvas.get_renderer()
        whole = fig.bbox
        [legend] = fig.legends
        box = legend.get_window_extent(renderer)
        assert _inside(box, whole), name
        for ax in fig.axes:
            axes_box = ax.get_window_extent(renderer)
            assert not axes_box.overlaps(box), name
            for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
                if label.get_text():
                    assert _inside(label.get_window_extent(renderer), whole), (name, label)
        if name == "coverage":
            assert box.y1 <= axes_box.y0
        else:
            assert box.x0 >= axes_box.x1
    assert _legend(figures["maps"]) == ["a (1)", f"{forty} (1)", "other categories"]
