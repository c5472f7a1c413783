"""The QA report: rendered from a tiny real run, parsed back, every section and image checked."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import browser
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_run import Element, Page, decode_png, table_rows, unit, write_image_outputs, write_knn

from item_embeddings import modality
from item_embeddings.config import PipelineParams
from item_embeddings.fusion import fuse_item_embeddings
from item_embeddings.fusion.synthetic import write_synthetic_catalogue
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_META,
    QA_REPORT,
    TXT_ARRAY,
    TXT_ITEMS,
)
from item_embeddings.report import SECTIONS, ReportInputError, analysis, write_qa_report
from item_embeddings.report.inputs import MISSING_CATEGORY, category_label
from item_embeddings.sample import make_sample_catalogue
from item_embeddings.text import embed_items_text, load_text_encoder

N_ITEMS = 48
SCRIPT_TITLE = '<script>alert("title")</script> Acme & <b>bold</b> cable'
SCRIPT_ID = '<img src="http://evil.example/x.png">'
ODD_CATEGORY = r"Sale $\bogus{5}$ <deals> & more"  # not math: \bogus would not parse


# ------------------------------------------------------------------------ a tiny real run


@dataclass
class TinyRun:
    root: Path
    items: Path
    text: Path
    image: Path
    fused: Path
    knn: Path
    graphs: dict[str, np.ndarray] = field(default_factory=dict)

    def render(self, out: Path, *, items: Path | None = None, knn: Path | None | str = "same",
               params: PipelineParams = PipelineParams(seed=0)) -> tuple[dict, str]:
        summary = write_qa_report(str(items or self.items), self.text, self.image, self.fused,
                                  self.knn if knn == "same" else knn, out / QA_REPORT, params,
                                  run_id="tiny-run")
        return summary, (out / QA_REPORT).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    """Real text and fusion steps on a generated catalogue; generated image step outputs with
    failures; an exact kNN graph."""
    root = tmp_path_factory.mktemp("run")
    table = make_sample_catalogue(N_ITEMS, image_base_url="http://127.0.0.1:9")
    titles = table.column("title").to_pylist()
    titles[3] = SCRIPT_TITLE
    titles[5] = None
    ids = table.column("asin").to_pylist()
    ids[7] = SCRIPT_ID
    categories = table.column("main_category").to_pylist()
    categories[11] = ODD_CATEGORY
    categories[17] = None
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles))
    table = table.set_column(0, "asin", pa.array(ids))
    table = table.set_column(table.schema.get_field_index("main_category"), "main_category",
                             pa.array(categories, pa.string()))
    items = root / "items.parquet"
    pq.write_table(table, items)
    run = TinyRun(root, items, root / "text", root / "image", root / "fused", root / "knn")
    embed_items_text(str(items), run.text, encoder=load_text_encoder(batch_size=16),
                     run_id="tiny")
    write_image_outputs(run.image, table)
    fuse_item_embeddings(run.text, run.image, run.fused, PipelineParams(seed=0, fusion_epochs=4,
                                                                        fusion_batch_size=16),
                         run_id="tiny")
    run.graphs = write_knn(run.knn, run.text, run.fused)
    return run


@pytest.fixture(scope="module")
def rendered(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary, text = tiny_run.render(out)
    return summary, text, Page(text)


# ------------------------------------------------------------------------------------ tests


def test_every_section_in_order_with_inlined_png_plots(rendered):
    summary, text, page = rendered
    headings = [h.all_text() for h in page.root.find_all("h2")]
    assert headings == [title for _, title in SECTIONS]
    assert [s.attrs["id"] for s in page.root.find_all("section")] == summary["sections"]
    assert summary["size_bytes"] == len(text.encode("utf-8"))
    assert summary["neighbours"] == "graph" and summary["has_categories"]
    # the plots each section must have
    expected_images = {"summary": 1, "failures": 1, "distributions": 2, "maps": 1,
                       "training": 1, "knn": 1}
    for key, count in expected_images.items():
        images = page.section(key).find_all("img")
        assert len(images) == count, key
        for img in images:
            decode_png(img.attrs["src"])
            assert img.attrs["alt"]
    assert not page.section("neighbours").find_all("img")


def test_page_is_self_contained(rendered):
    _, text, page = rendered
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base"}
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "action", "poster"):
            if name in attrs:
                value = attrs[name]
                assert value.startswith(("data:image/png;base64,", "#")), (tag, name, value)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    style = "".join(s.all_text() for s in page.root.find_all("style"))
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    # the only absolute URLs on the page are escaped item data shown as text
    assert "evil.example" not in "".join(v for _, a in page.tags for v in a.values())


def test_item_data_is_escaped(rendered, tiny_run, tmp_path, monkeypatch):
    _, text, page = rendered
    failures = page.section("failures").all_text()
    assert "<script>alert('detail')</script>" in failures        # shown as text ...
    assert "<script>" not in text and "<deals>" not in text         # ... never as markup
    assert ODD_CATEGORY in page.section("maps").all_text()
    # every item in the neighbour table: the script title and the odd id appear, as text only
    monkeypatch.setattr(analysis, "NEIGHBOUR_ITEMS", N_ITEMS)
    _, text = tiny_run.render(tmp_path)
    page = Page(text)
    table = page.section("neighbours").all_text()
    assert SCRIPT_TITLE in table and SCRIPT_ID in table and "(no title)" in table
    assert "<script>" not in text and "<b>bold" not in text and '<img src="http' not in text
    assert {tag for tag, _ in page.tags} & {"script", "b"} == set()
    assert len(page.root.find_all("img")) == 7


def _title_of(tiny_run: TinyRun) -> dict[str, str]:
    table = pq.read_table(tiny_run.items, columns=["asin", "title"]).to_pylist()
    return {r["asin"]: r["title"] or "(no title)" for r in table}


def _category_of(tiny_run: TinyRun) -> list[str]:
    """Each text row's category label, as the report reads it."""
    return [category_label(c) for c in
            pq.read_table(tiny_run.items, columns=["main_category"]).column(0).to_pylist()]


def _neighbour_rows(page: Page) -> list[tuple[str, list[str], list[str]]]:
    """(query id, text neighbour titles, fused neighbour titles) per row of the table."""
    table = page.section("neighbours").by_class("neighbours")[0]
    rows = []
    for tr in table.find_all("tr")[1:]:
        cells = [c for c in tr.children if c.tag == "td"]
        assert len(cells) == 3
        query = cells[0].by_class("id")[0].all_text()

        def titles(cell: Element) -> list[str]:
            return [re.sub(r"\s*(\[[^\]]*\])?\s*-?\d\.\d{3}$", "", li.all_text().strip())
                    for li in cell.find_all("li")]

        rows.append((query, titles(cells[1]), titles(cells[2])))
    return rows


def _expected_titles(tiny_run: TinyRun, graph: np.ndarray, query: str) -> list[str]:
    ids = pq.read_table(tiny_run.text / TXT_ITEMS).column("id").to_pylist()
    title = _title_of(tiny_run)
    return [title[ids[r]] for r in graph[ids.index(query)][:analysis.TOP_NEIGHBOURS]]


def test_neighbour_table_shows_the_graph_neighbours_side_by_side(rendered, tiny_run):
    _, _, page = rendered
    rows = _neighbour_rows(page)
    assert len(rows) == analysis.NEIGHBOUR_ITEMS
    assert len({q for q, _, _ in rows}) == analysis.NEIGHBOUR_ITEMS
    for query, text, fused in rows:
        assert text == _expected_titles(tiny_run, tiny_run.graphs["text"], query)
        assert fused == _expected_titles(tiny_run, tiny_run.graphs["fused"], query)
    # the graph here is exact: it shares every neighbour with the exact search
    note = page.section("neighbours").all_text()
    total = analysis.NEIGHBOUR_ITEMS * analysis.TOP_NEIGHBOURS
    assert f"shares {total} of the {total} exact top-5 text" in note


def test_a_broken_run_is_shown_as_it_is_and_flagged(tiny_run, tmp_path):
    knn = tmp_path / "knn"
    graphs = write_knn(knn, tiny_run.text, tiny_run.fused, skip=analysis.TOP_NEIGHBOURS)
    fused = tmp_path / "fused"
    shutil.copytree(tiny_run.fused, fused)
    array = np.load(fused / FUSED_ARRAY)
    array[2] *= 3.0
    array[4] = np.nan
    np.save(fused / FUSED_ARRAY, array)
    write_qa_report(str(tiny_run.items), tiny_run.text, tiny_run.image, fused, knn,
                    tmp_path / QA_REPORT)
    page = Page((tmp_path / QA_REPORT).read_text())
    # the graph's neighbours are shown as they are, with how many the exact search shares
    for query, text_titles, _ in _neighbour_rows(page):
        assert text_titles == _expected_titles(tiny_run, graphs["text"], query)
    total = analysis.NEIGHBOUR_ITEMS * analysis.TOP_NEIGHBOURS
    assert f"shares 0 of the {total} exact top-5 text" in page.section("neighbours").all_text()
    # vectors that are not unit length or not finite
    checks = {r[0]: r[1:] for r in table_rows(page.section("summary").find_all("table")[1])}
    assert checks["fused vectors L2-normalised and finite"] == [
        f"2 of {N_ITEMS} rows off", "WARN"]
    assert checks["text vectors L2-normalised and finite"][1] == "OK"
    dist = {r[0]: r for r in table_rows(page.section("distributions").find_all("table")[0])}
    assert dist["fused"][5:7] == ["1", "1"] and dist["text"][5:7] == ["0", "0"]


def test_without_knn_or_categories(tiny_run, tmp_path):
    """No kNN graph: exact neighbours; no category column: one-colour maps, said so."""
    table = pq.read_table(tiny_run.items).drop_columns(["main_category"])
    pq.write_table(table, tmp_path / "items.parquet")
    summary, text = tiny_run.render(tmp_path, items=tmp_path / "items.parquet", knn=None)
    page = Page(text)
    assert summary["neighbours"] == "exact" and not summary["has_categories"]
    assert "No kNN graph" in page.section("knn").all_text()
    assert not page.section("knn").find_all("img")
    assert "neighbours are exact" in page.section("neighbours").all_text()
    for query, text_titles, fused_titles in _neighbour_rows(page):
        assert text_titles == _expected_titles(tiny_run, tiny_run.graphs["text"], query)
        assert fused_titles == _expected_titles(tiny_run, tiny_run.graphs["fused"], query)
    maps = page.section("maps")
    assert "has no 'main_category' column" in maps.all_text()
    assert not maps.find_all("table") and len(maps.find_all("img")) == 1
    assert "[" not in page.section("neighbours").by_class("neighbours")[0].all_text()


def test_empty_knn_dir_and_another_category_column(tiny_run, tmp_path):
    table = pq.read_table(tiny_run.items).drop_columns(["main_category"])
    pq.write_table(table, tmp_path / "items.parquet")
    (tmp_path / "knn").mkdir()
    summary, text = tiny_run.render(tmp_path, items=tmp_path / "items.parquet",
                                    knn=tmp_path / "knn",
                                    params=PipelineParams(category_column="title"))
    maps = Page(text).section("maps")
    assert summary["neighbours"] == "exact" and summary["has_categories"]
    assert "Coloured by 'title'" in maps.all_text()
    legend = table_rows(maps.find_all("table")[0])
    titles = set(_title_of(tiny_run).values()) | {MISSING_CATEGORY}
    assert len(legend) == 9 and {label for label, _ in legend} <= titles


def test_category_legend_and_maps(rendered):
    _, _, page = rendered
    maps = page.section("maps")
    legend = table_rows(maps.find_all("table")[0])
    labels = [label for label, _ in legend]
    # 6 sample categories + the odd one + missing, most frequent first
    assert set(labels) == {"Headphones", "Cables", "Keyboards", "Storage", "Cameras",
                           "Chargers", ODD_CATEGORY, MISSING_CATEGORY}
    counts = [int(c) for _, c in legend]
    assert counts == sorted(counts, reverse=True) and sum(counts) == N_ITEMS
    assert "Coloured by 'main_category'" in maps.all_text()


def test_recall_training_failures_and_run_figures(rendered, tiny_run):
    _, _, page = rendered
    knn = table_rows(page.section("knn").find_all("table")[0])
    assert [(r[0], r[1], r[4]) for r in knn] == [("text", "exact", "0.9871"),
                                                 ("fused", "exact", "0.9123")]
    epochs = table_rows(page.section("training").find_all("table")[0])
    history = json.loads((tiny_run.fused / FUSION_CONFIG).read_text())["loss_history"]
    # 48 items in batches of 16: the 4 epochs asked for became 67 for fusion_min_steps' 200
    # steps; the table shows the first and last ten
    assert len(history) == 67
    assert [int(r[0]) for r in epochs] == [*range(1, 11), *range(58, 68)]
    assert float(epochs[-1][1]) == pytest.approx(history[-1]["loss"], rel=1e-3)
    assert page.section("training").find_all("p")[0].all_text().startswith(
        "67 epoch(s) (4 asked for; more to reach fusion_min_steps 200), objective ")
    failures = table_rows(page.section("failures").find_all("table")[0])
    assert [(r[0], r[1]) for r in failures] == [("http_error", "2"), ("decode_error", "1"),
                                                ("timeout", "1")]
    summary = {r[0]: r[1:] for r in table_rows(page.section("summary").find_all("table")[0])}
    n_url = sum(1 for u in pq.read_table(tiny_run.items).column("image_url").to_pylist() if u)
    assert summary["image: embedded"][0] == str(n_url - 4)
    assert summary["image: failed"][0] == "4"
    checks = table_rows(page.section("summary").find_all("table")[1])
    assert all(result in ("OK", "INFO") for *_, result in checks), checks
    run = page.section("run").all_text()
    assert "category_column" in run and "main_category" in run and "matplotlib" in run
    # where the image step's time went: seconds and ms per image of each stage
    stages = table_rows(page.section("run").find_all("table")[1])
    assert [r[:3] for r in stages] == [["downloads", "1.5", "3.75"],
                                       ["decoding, resize and crop", "1.2", "3"],
                                       ["encoding", "1.9", "4.75"],
                                       ["the whole processing", "2", "5"]]
    assert "image_decode = fast; 400 images encoded" in run


def test_inputs_that_do_not_line_up_are_named(tiny_run, tmp_path):
    other = tmp_path / "other.parquet"
    table = pq.read_table(tiny_run.items)
    pq.write_table(table.slice(1), other)
    with pytest.raises(ReportInputError, match="row 0 has id"):
        write_qa_report(str(other), tiny_run.text, tiny_run.image, tiny_run.fused, None,
                        tmp_path / QA_REPORT)
    knn = tmp_path / "knn"
    shutil.copytree(tiny_run.knn, knn)
    meta = json.loads((knn / KNN_META).read_text())
    (knn / KNN_META).write_text(json.dumps({**meta, "count": N_ITEMS + 1}))
    with pytest.raises(ReportInputError, match="knn_meta.json count is 49"):
        write_qa_report(str(tiny_run.items), tiny_run.text, tiny_run.image, tiny_run.fused, knn,
                        tmp_path / QA_REPORT)
    with pytest.raises(ReportInputError, match="fusion_config.json not found"):
        write_qa_report(str(tiny_run.items), tiny_run.text, tiny_run.image, tmp_path, None,
                        tmp_path / QA_REPORT)
    assert not (tmp_path / QA_REPORT).exists()


def test_one_pass_scan_matches_brute_force_across_chunks(monkeypatch):
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((101, 16)))
    x[10] = 0.0                       # a zero row never becomes a neighbour
    x[20] *= 2.0                      # cosines, not dot products, rank the neighbours
    monkeypatch.setattr(analysis, "CHUNK_ROWS", 7)
    sample = np.array([0, 6, 7, 50, 100])
    queries = np.array([3, 7, 64, 100])
    scan = analysis.scan_space(x, sample, queries, "test")
    np.testing.assert_allclose(scan.norms, np.linalg.norm(x, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(scan.sample, x[sample])
    with np.errstate(all="ignore"):
        units = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.nan_to_num(units[queries] @ units.T, nan=-np.inf)
    sims[np.arange(len(queries)), queries] = -np.inf
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :analysis.TOP_NEIGHBOURS]
    np.testing.assert_array_equal(scan.exact_rows, expected)
    np.testing.assert_allclose(scan.exact_scores, np.take_along_axis(sims, expected, 1),
                               rtol=1e-5)
    assert scan.off_unit == 2 and scan.nonfinite == 0


def test_pca_axes_are_the_principal_ones():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 20)) * np.arange(20, 0, -1)).astype(np.float32)
    x[7] = np.inf
    coords, keep, share = analysis.pca_2d(x)
    assert keep.sum() == 299 and coords.shape == (299, 2)
    centred = x[keep].astype(np.float64) - x[keep].mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(centred @ vt[:2].T), atol=1e-6)
    np.testing.assert_allclose(share, s[:2] ** 2 / (s ** 2).sum())


def test_page_size_stays_bounded_above_the_sample_sizes(tmp_path):
    """Past MAP_ROWS items every plot is drawn from fixed-size samples: the page is as large
    as it gets (the 500k-item size is measured by bench/bench_report.py)."""
    n = analysis.MAP_ROWS + 1000
    cat = write_synthetic_catalogue(tmp_path / "text", tmp_path / "image", n=n, seed=1)
    rng = np.random.default_rng(0)
    np.save(tmp_path / FUSED_ARRAY, unit(rng.standard_normal((n, 128))))
    pq.write_table(pa.table({"id": cat.ids, "has_image": cat.has_image}),
                   tmp_path / FUSED_ITEMS)
    (tmp_path / FUSION_CONFIG).write_text(json.dumps(
        {"count": n, "items_with_images": int(cat.has_image.sum()),
         "loss_history": [{"loss": 1.0 / e, "sim_loss": 1.0 / e, "norm_loss": 0.0}
                          for e in range(1, 6)]}))
    categories = [f"category {label}" for label in cat.text_label]
    pq.write_table(pa.table({"asin": cat.ids, "title": [f"title {i}" for i in cat.ids],
                             "main_category": categories}), tmp_path / "items.parquet")
    summary = write_qa_report(str(tmp_path / "items.parquet"), tmp_path / "text",
                              tmp_path / "image", tmp_path, None, tmp_path / QA_REPORT)
    assert summary["size_bytes"] < 2_000_000
    page = Page((tmp_path / QA_REPORT).read_text())
    legend = table_rows(page.section("maps").find_all("table")[0])
    assert sum(int(c) for _, c in legend) == analysis.MAP_ROWS
    assert len(page.root.find_all("img")) == 5   # no image failed: no failure chart


def test_image_rows_map_to_text_rows_by_id():
    from item_embeddings.report.inputs import _image_text_rows

    ids = pa.chunked_array([pa.array(["a", "b", "c", "d"])])
    # img_items order differs from txt_items; 'c' and 'b' share img.npy row 1 (the first id
    # listed names it); row 2 is listed by no id
    img_items = pa.table({"id": ["c", "a", "b"], "row": pa.array([1, 0, 1], pa.int64())})
    assert _image_text_rows(img_items, ids, Path(IMG_ITEMS)).tolist() == [0, 2, -1]
    with pytest.raises(ReportInputError, match="1 id.* not in txt_items.parquet"):
        _image_text_rows(pa.table({"id": ["z"], "row": pa.array([0], pa.int64())}), ids,
                         Path(IMG_ITEMS))
    with pytest.raises(ReportInputError, match=r"must be an img.npy row in \[0, 1\)"):
        _image_text_rows(pa.table({"id": ["a"], "row": pa.array([1], pa.int64())}), ids,
                         Path(IMG_ITEMS))


def test_hosts_with_the_most_failures(tiny_run, tmp_path):
    image = tmp_path / "image"
    shutil.copytree(tiny_run.image, image)
    failures = pq.read_table(image / IMG_FAILURES)
    n = failures.num_rows  # all on the catalogue's host, 127.0.0.1:9
    dead = [f"http://dead.example:8080/{i}.jpg" for i in range(n)]
    urls = failures.column("url").to_pylist()
    urls[:2] = dead[:2]
    reasons = failures.column("reason").to_pylist()
    reasons[:2] = ["host_unavailable", "timeout"]
    failures = failures.set_column(failures.schema.get_field_index("url"), "url", pa.array(urls))
    failures = failures.set_column(failures.schema.get_field_index("reason"), "reason",
                                   pa.array(reasons))
    pq.write_table(failures, image / IMG_FAILURES)
    write_qa_report(str(tiny_run.items), tiny_run.text, image, tiny_run.fused, tiny_run.knn,
                    tmp_path / QA_REPORT)
    section = Page((tmp_path / QA_REPORT).read_text()).section("failures")
    assert "Hosts with the most failures" in section.all_text()
    hosts = table_rows(section.find_all("table")[1])
    first, second = hosts
    assert first[:2] == ["127.0.0.1:9", str(n - 2)] and second[:2] == ["dead.example:8080", "2"]
    assert second[2] == "host_unavailable 1, timeout 1"
    assert "circuit breaker" in section.all_text()


def _modality_tables(page: Page) -> tuple[list[list[str]], list[list[str]]]:
    tables = page.section("modality").find_all("table")
    return table_rows(tables[0]), table_rows(tables[1]) if len(tables) > 1 else []


def test_modality_mix_shows_the_graphs_photo_shares_and_purity_by_group(rendered, tiny_run):
    _, _, page = rendered
    shares, purity = _modality_tables(page)
    has_image = pq.read_table(tiny_run.fused / FUSED_ITEMS).column("has_image").to_numpy()
    categories = _category_of(tiny_run)
    expected_purity = {}
    for space in ("text", "fused"):
        graph = tiny_run.graphs[space]
        share = has_image[graph].mean(axis=1)
        same = np.array([[categories[j] == categories[i] for j in row]
                         for i, row in enumerate(graph)]).mean(axis=1)
        for group, members in (("with", has_image), ("without", ~has_image)):
            row = next(r for r in shares if r[0] == f"items {group} a photo")
            assert int(row[1]) == members.sum()
            assert float(row[2]) == pytest.approx(has_image.mean(), abs=5e-4)
            assert float(row[3 if space == "text" else 4]) == pytest.approx(
                share[members].mean(), abs=5e-4)
            expected_purity[space, group] = same[members].mean()
        expected_purity[space, "all"] = same.mean()
    for row in purity:
        group = {"all items": "all", "items with a photo": "with",
                 "items without a photo": "without"}[row[0]]
        assert float(row[1]) == pytest.approx(expected_purity["text", group], abs=5e-4)
        assert float(row[2]) == pytest.approx(expected_purity["fused", group], abs=5e-4)
    assert len(purity) == 3
    # 16 items without a photo: too few to judge, said so (not a warning)
    assert "not judged" in page.section("modality").all_text()
    assert not page.section("modality").by_class("warn")


def test_a_fused_space_split_by_photo_is_flagged(tiny_run, tmp_path, monkeypatch):
    """A fused space that sorts items by whether they have a photo: the section says so in a
    warning, with both groups' shares, and the summary's check is WARN."""
    monkeypatch.setattr(modality, "MIN_GROUP_ITEMS", 10)  # the tiny run has 16 without photo
    fused = tmp_path / "fused"
    shutil.copytree(tiny_run.fused, fused)
    has_image = pq.read_table(fused / FUSED_ITEMS).column("has_image").to_numpy()
    text = np.load(tiny_run.text / TXT_ARRAY)[:, :127]
    np.save(fused / FUSED_ARRAY, unit(np.hstack([text, 4.0 * has_image[:, None]])))
    write_knn(tmp_path / "knn", tiny_run.text, fused)
    write_qa_report(str(tiny_run.items), tiny_run.text, tiny_run.image, fused, tmp_path / "knn",
                    tmp_path / QA_REPORT, PipelineParams(seed=0), run_id="split")
    page = Page((tmp_path / QA_REPORT).read_text(encoding="utf-8"))
    warning = page.section("modality").by_class("warn")
    assert len(warning) == 1
    assert "sorts items by whether they have a photo" in warning[0].all_text()
    assert "items with photo" in warning[0].all_text()
    checks = table_rows(page.section("summary").find_all("table")[1])
    [mix_check] = [c for c in checks if c[0].startswith("modality mix")]
    assert mix_check[2] == "WARN"


def test_modality_mix_without_a_graph_comes_from_the_fusion_step(tiny_run, tmp_path):
    _, text = tiny_run.render(tmp_path, knn=None)
    page = Page(text)
    section = page.section("modality").all_text()
    mix = json.loads((tiny_run.fused / FUSION_CONFIG).read_text())["modality_mix"]
    assert f"fusion step's {mix['items']} sampled items" in section
    assert "Category purity by group needs the kNN graphs" in section
    shares, _ = _modality_tables(page)
    assert float(shares[0][4]) == pytest.approx(mix["photo_share"]["fused"]["with_photo"],
                                                abs=5e-4)


def test_the_page_in_a_real_browser(rendered, tmp_path):
    """What people see: the page in headless Chromium (driven over the DevTools protocol on
    loopback) loads without a console error, every inlined plot decodes, every section is there
    with its heading, in order, and has a height; the full page renders to a PNG."""
    summary, _, _ = rendered
    if browser.find_chromium() is None:
        message = ("headless Chromium is not installed (Debian: apt-get install chromium; "
                   "or set CHROMIUM to a binary); .ci/run installs it")
        if os.environ.get(browser.REQUIRED_ENV) or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    started = time.perf_counter()
    view = browser.view_page(summary["path"])
    assert view.console_errors == []
    assert [(s["id"], s["heading"]) for s in view.sections] == list(SECTIONS)
    assert all(s["height"] > 0 for s in view.sections), view.sections
    assert view.nav == [f"#{key}" for key, _ in SECTIONS]
    assert view.title == "QA report tiny-run"
    expected = {"summary": 1, "failures": 1, "distributions": 2, "maps": 1, "training": 1,
                "knn": 1}
    assert sorted(i["section"] for i in view.images) == sorted(
        key for key, count in expected.items() for _ in range(count))
    for image in view.images:  # decoded by the browser, at its own size
        assert image["complete"] and image["width"] >= 300 and image["height"] >= 100, image
        assert image["alt"]
    from PIL import Image

    shot = tmp_path / "qa_report.png"
    shot.write_bytes(view.screenshot)
    with Image.open(shot) as png:
        assert png.format == "PNG" and png.size == view.size
        assert png.size[0] == 1400 and png.size[1] > 3000   # the whole page, not the viewport
        low, high = png.convert("L").getextrema()
        assert high - low > 100                              # something was drawn
    assert time.perf_counter() - started < 30


def test_the_report_records_its_hash_and_the_runs_it_was_made_from(tiny_run, tmp_path):
    """report_meta.json, beside the page: the page's size and sha256 (what `verify` checks
    the page against) and the run id of each step output it was made from."""
    import hashlib

    from item_embeddings.outputs import REPORT_META, TXT_META

    dirs = {}
    for step, folder, meta_name in (("text", tiny_run.text, TXT_META),
                                    ("image", tiny_run.image, IMG_META),
                                    ("fusion", tiny_run.fused, FUSION_CONFIG),
                                    ("knn", tiny_run.knn, KNN_META)):
        dirs[step] = Path(shutil.copytree(folder, tmp_path / step))
        meta = json.loads((dirs[step] / meta_name).read_text())
        meta["run_id"] = f"{step}-run"
        (dirs[step] / meta_name).write_text(json.dumps(meta))
    out = tmp_path / "out"
    out.mkdir()
    summary = write_qa_report(str(tiny_run.items), dirs["text"], dirs["image"], dirs["fusion"],
                              dirs["knn"], out / QA_REPORT)
    page = (out / QA_REPORT).read_bytes()
    record = json.loads((out / REPORT_META).read_text())
    assert sorted(p.name for p in out.iterdir()) == [QA_REPORT, REPORT_META]
    assert record["files"] == {QA_REPORT: {"size": len(page),
                                           "sha256": hashlib.sha256(page).hexdigest()}}
    assert {key: record[key] for key in ("run_id", "text_run_id", "image_run_id",
                                         "fusion_run_id", "knn_run_id", "count")} == {
        "run_id": "fusion-run", "text_run_id": "text-run", "image_run_id": "image-run",
        "fusion_run_id": "fusion-run", "knn_run_id": "knn-run", "count": N_ITEMS}
    assert record["sections"] == summary["sections"] and record["neighbours"] == "graph"
    assert b"run fusion-run" in page  # the run the page names is the one recorded


def test_night_over_night_drift_is_shown_and_returned(tiny_run, tmp_path):
    """A kNN directory updated from a previous set: the kNN section says so, and the drift
    table and the returned summary carry the drift figures."""
    knn = tmp_path / "knn"
    shutil.copytree(tiny_run.knn, knn)
    meta = json.loads((knn / KNN_META).read_text())
    for space, overlap in (("text", 0.97), ("fused", 0.42)):
        meta["spaces"][space].update({
            "update": "incremental", "rebuild_reason": None, "recomputed_count": 11,
            "reused_count": N_ITEMS - 11,
            "drift": {"items": N_ITEMS - 3, "top": 20, "mean_overlap": overlap,
                      "identical_share": 0.5, "p10_overlap": 0.35,
                      "previous_run_id": "night-41"}})
    (knn / KNN_META).write_text(json.dumps(meta))
    summary, text = tiny_run.render(tmp_path, knn=knn)
    assert summary["drift"]["fused"]["mean_overlap"] == 0.42
    section = Page(text).section("knn")
    graphs, drift = (table_rows(t) for t in section.find_all("table")[:2])
    assert [(r[0], r[8], r[9], r[10]) for r in graphs] == \
        [("text", "incremental", "11", str(N_ITEMS - 11)),
         ("fused", "incremental", "11", str(N_ITEMS - 11))]
    assert [r[:3] for r in drift] == [["text", str(N_ITEMS - 3), "0.97"],
                                      ["fused", str(N_ITEMS - 3), "0.42"]]
    assert "Night-over-night drift" in section.all_text() and "night-41" in section.all_text()
    plain, _ = tiny_run.render(tmp_path / "plain")
    assert plain["drift"] == {}
