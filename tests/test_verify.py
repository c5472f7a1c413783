"""verify_outputs and `item-embeddings verify` on generated output sets, good and broken."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import exact_knn, make_output_set, refused, reseal, verify_cli, write_report
from item_embeddings.ops.cli import main
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_META,
    MANIFEST,
    QA_REPORT,
    REPORT_META,
    TXT_ARRAY,
    TXT_META,
)
from item_embeddings.publish import publish_outputs
from item_embeddings.verify import Report, verify_outputs


@pytest.fixture
def good_set(tmp_path) -> Path:
    return make_output_set(tmp_path / "out")


def test_consistent_set_passes(good_set, capsys):
    report = verify_outputs(str(good_set))
    assert report.ok, report.violations
    text = report.format()
    for expected in ("txt.npy: shape [40, 384], dtype float32", "img.npy: shape [21, 512]",
                     "items with images: 21", "failed downloads: 5", "http_status: ",
                     "timeout: 1", "fused items: 40",
                     "no_url_count=14", "all checks passed"):
        assert expected in text, expected
    assert main(["verify", str(good_set)]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_text_only_set_is_refused_as_incomplete(tmp_path):
    """No pipeline mode skips the image and fusion steps: text alone is a run that stopped."""
    root = make_output_set(tmp_path / "txt", with_images=False)
    _expect(root, "image outputs missing (img.npy, img_items.parquet, img_meta.json, "
            "img_failures.parquet)", "fusion outputs missing")


def _expect(root: Path, *fragments: str) -> None:
    report = verify_outputs(str(root))
    assert not report.ok
    joined = "\n".join(report.violations)
    for fragment in fragments:
        assert fragment in joined, (fragment, report.violations)


def test_truncated_array_fails(good_set, capsys):
    arr = np.load(good_set / TXT_ARRAY)
    np.save(good_set / TXT_ARRAY, arr[:-3])
    _expect(good_set, "txt.npy has 37 rows but txt_items.parquet has 40 ids",
            "txt_meta.json: count = 40 but the data says 37")
    assert main(["verify", str(good_set)]) == 1
    err = capsys.readouterr()
    assert "VIOLATION: txt.npy has 37 rows" in err.out + err.err


def test_file_cut_short_fails_without_crash(good_set):
    data = (good_set / IMG_ARRAY).read_bytes()
    (good_set / IMG_ARRAY).write_bytes(data[: len(data) // 2])
    _expect(good_set, "img.npy: unreadable .npy")


def test_shuffled_fused_ids_fail(good_set):
    table = pq.read_table(good_set / FUSED_ITEMS)
    perm = np.random.default_rng(1).permutation(table.num_rows)
    pq.write_table(table.take(pa.array(perm)), good_set / FUSED_ITEMS)
    _expect(good_set, "fused_items.parquet ids are not in txt_items.parquet order")


def test_nan_row_fails(good_set):
    arr = np.load(good_set / FUSED_ARRAY)
    arr[7, 3] = np.nan
    np.save(good_set / FUSED_ARRAY, arr)
    _expect(good_set, "fused.npy: 1 row(s) with NaN/Inf (rows [7])")


def test_non_unit_rows_and_dtype(good_set):
    arr = np.load(good_set / TXT_ARRAY).astype(np.float64)
    arr[2] *= 2
    np.save(good_set / TXT_ARRAY, arr)
    _expect(good_set, "txt.npy: expected float32, got float64",
            "txt.npy: 1 row(s) not unit-norm")


def test_image_invariants(good_set):
    items = pq.read_table(good_set / IMG_ITEMS).to_pydict()
    failures = pq.read_table(good_set / IMG_FAILURES)
    items["row"][0] = 999  # out of range
    items["id"][1] = failures.column("id")[0].as_py()  # id both embedded and failed
    pq.write_table(pa.table(items), good_set / IMG_ITEMS)
    _expect(good_set, "row index(es) outside img.npy", "both in img_items.parquet and "
            "img_failures.parquet", "has_image disagrees")


def test_excluded_image_must_not_count_as_image(good_set):
    fused = pq.read_table(good_set / FUSED_ITEMS).to_pydict()
    fused["has_image"] = [i in pq.read_table(good_set / IMG_ITEMS).column("id")
                          .to_pylist() for i in fused["id"]]
    pq.write_table(pa.table(fused), good_set / FUSED_ITEMS)
    _expect(good_set, "has_image disagrees with img_items.parquet / fusion_exclusions.parquet "
            "for 1 id(s)", "fusion_config.json: items_with_images = 20 but the data says 21")


def test_failure_reasons_must_match_meta(good_set):
    meta = json.loads((good_set / IMG_META).read_text())
    meta["failures_by_reason"] = {"http_status": 5}
    (good_set / IMG_META).write_text(json.dumps(meta))
    _expect(good_set, "img_meta.json: failures_by_reason")


def test_meta_mismatch_and_missing_fused_item(good_set):
    meta = json.loads((good_set / IMG_META).read_text())
    meta["failed_count"] += 1
    (good_set / IMG_META).write_text(json.dumps(meta))
    table = pq.read_table(good_set / FUSED_ITEMS)
    pq.write_table(table.slice(0, 39), good_set / FUSED_ITEMS)
    _expect(good_set, "img_meta.json: failed_count", "fused_items.parquet does not cover the "
            "text items: 1 text id(s) missing", "fused.npy has 40 rows but fused_items.parquet "
            "has 39 ids")


def test_incomplete_group_and_not_a_set(good_set, tmp_path):
    (good_set / IMG_FAILURES).unlink()
    _expect(good_set, "image outputs incomplete: missing ['img_failures.parquet']")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(empty, "no text outputs")
    _expect(tmp_path / "nope", "directory not found")


def test_manifest_hashes_checked(good_set, tmp_path):
    published = tmp_path / "pub"
    manifest = publish_outputs([good_set], str(published), run_id="r1")
    assert verify_outputs(str(published)).ok
    files = published / manifest["set"]  # the set the pointer names
    arr = np.load(files / FUSED_ARRAY)
    arr[0] = -arr[0]  # same size, still unit norm: only the hash can tell
    np.save(files / FUSED_ARRAY, arr)
    (files / TXT_META).unlink()
    _expect(published, "fused.npy: content does not match manifest.json",
            "fused.npy: content does not match fusion_config.json",
            "manifest.json lists txt_meta.json but it is missing")
    shutil.rmtree(good_set)


def test_recorded_size_is_checked_before_hashing(good_set):
    size = (good_set / FUSED_ITEMS).stat().st_size
    with open(good_set / FUSED_ITEMS, "ab") as fh:
        fh.write(b"\0")
    _expect(good_set, f"fused_items.parquet: content does not match fusion_config.json "
                      f"(size {size + 1}, recorded {size})")


def test_row_blocks_flag_rows_that_are_not_finite_and_measure_the_others():
    """The block reader verify and the kNN step share: NaN/Inf rows are not finite and get
    norm 0; finite rows get their L2 norm, inf when their squares overflow float32."""
    from item_embeddings.blocks import row_blocks

    rows = np.array([[3, 4], [np.nan, 1], [0, 0], [np.inf, 0], [3e38, 3e38], [-6, 8]],
                    dtype=np.float32)
    blocks = list(row_blocks(rows, 4))
    assert [b.start for b in blocks] == [0, 4] and [len(b.rows) for b in blocks] == [4, 2]
    finite = np.concatenate([b.finite for b in blocks])
    norms = np.concatenate([b.norms for b in blocks])
    assert finite.tolist() == [True, False, True, False, True, True]
    assert norms.tolist() == [5.0, 0.0, 0.0, 0.0, np.inf, 10.0]
    as64 = next(row_blocks(rows, 6, dtype=np.float64))
    assert as64.rows.dtype == np.float64 and as64.norms[4] == pytest.approx(3e38 * 2 ** 0.5)


# ----------------------------------------------------------------------------- the QA report
# Each damage passed verify before the report belonged to the set (#22.3).

def test_set_without_its_report_is_refused(good_set, capsys):
    (good_set / QA_REPORT).unlink()
    refused(good_set, capsys, "report outputs missing (qa_report.html): the QA report belongs to "
                             "the set", "report_meta.json lists qa_report.html but it is missing")
    (good_set / REPORT_META).unlink()
    violations = refused(good_set, capsys, "report outputs missing (qa_report.html)")
    assert len(violations.splitlines()) == 1, violations


def test_report_without_its_record(good_set, tmp_path, capsys):
    """A run folder whose report's hash is recorded nowhere is refused with a message that
    says why; a set published before the report recorded itself (its manifest lists the page)
    passes, and says that only the manifest records it."""
    (good_set / REPORT_META).unlink()
    refused(good_set, capsys, "qa_report.html: no report_meta.json records its size and sha256 "
                             "(a set written before the report recorded itself, or the record "
                             "was removed)")
    published = tmp_path / "published"
    publish_outputs([good_set], str(published), run_id="old")
    rc, out = verify_cli(published, capsys)
    assert rc == 0, out
    assert "qa_report.html: recorded by manifest.json only (no report_meta.json" in out
    # the manifest's record is checked as any other: an edited page is refused
    pointer = json.loads((published / MANIFEST).read_text())
    page = published / pointer["set"] / QA_REPORT
    page.write_text(page.read_text().replace("QA report", "QA rep0rt"))
    refused(published, capsys, "qa_report.html: content does not match manifest.json")


def test_report_of_another_run_or_edited_is_refused(good_set, tmp_path, capsys):
    other = make_output_set(tmp_path / "other", run_id="run-2")
    for name in (QA_REPORT, REPORT_META):
        shutil.copyfile(other / name, good_set / name)
    refused(good_set, capsys, "report_meta.json: text_run_id = 'run-2' but txt_meta.json has "
                             "run_id 'run-1': groups of different runs",
            "report_meta.json: fusion_run_id = 'run-2' but fusion_config.json has run_id 'run-1'")
    write_report(good_set)
    page = good_set / QA_REPORT
    page.write_text(page.read_text().replace("items", "itens", 1))
    refused(good_set, capsys, "qa_report.html: content does not match report_meta.json")


@pytest.mark.parametrize("added,shown", [
    ('<script src="https://cdn.example.com/plot.js"></script>',
     "<script src='https://cdn.example.com/plot.js'>"),
    ('<link rel="stylesheet" href="https://fonts.example.com/a.css">',
     "<link href='https://fonts.example.com/a.css'>"),
    ('<img src="http://img.example.com/x.png" alt="">', "<img src='http://img.example.com/x.png'>"),
    ('<img src="plot.png" alt="">', "<img src='plot.png'>"),
    ('<iframe src="https://example.com/"></iframe>', "<iframe>: another document embedded"),
    ("<style>h1{background:url(https://x.example.com/b.png)}</style>",
     "<style> url('https://x.example.com/b.png')"),
    ("<div style=\"background-image:url('//cdn.example.com/b.png')\"></div>",
     "<div style> url('//cdn.example.com/b.png')"),
    ('<script>fetch("https://track.example.com/p")</script>',
     "<script> text: 'https://track.example.com/p'"),
    ('<img srcset="data:image/png;base64,iVBO,Rw0K 1x, https://x.example.com/2x.png 2x">',
     "<img srcset> 'https://x.example.com/2x.png'"),
])
def test_report_referencing_outside_itself_is_refused(good_set, capsys, added, shown):
    page = good_set / QA_REPORT
    page.write_text(page.read_text().replace("</body>", added + "</body>", 1))
    reseal(good_set)
    violations = refused(good_set, capsys, "qa_report.html: ", "reference(s) outside the page "
                                          "(a QA report is self-contained: data: URIs and "
                                          f"#anchors only), e.g. {shown}")
    assert len(violations.splitlines()) == 1, violations


def test_inline_data_and_anchors_are_fine_but_not_utf8_is_refused(good_set, capsys):
    page = good_set / QA_REPORT
    page.write_text(page.read_text().replace(
        "</body>", '<img src="data:image/png;base64,iVBORw0KGgo=" alt=""><a href="#maps">maps'
                   "</a><svg><use href=\"#dot\"/></svg></body>", 1))
    reseal(good_set)
    rc, out = verify_cli(good_set, capsys)
    assert rc == 0, out
    page.write_bytes(b"\xff\xfe<html>" + page.read_bytes())
    reseal(good_set)
    refused(good_set, capsys, "qa_report.html: unreadable as UTF-8 text")


def test_report_record_must_cover_the_page(good_set, capsys):
    meta = json.loads((good_set / REPORT_META).read_text())
    meta["files"] = {}
    (good_set / REPORT_META).write_text(json.dumps(meta))
    refused(good_set, capsys, "report_meta.json: 'files' records no hash of ['qa_report.html']")


# ----------------------------------------------------------------------------- the checks' parts
# The kNN search and the page scan on their own: cases a whole set cannot easily hold.

@pytest.mark.parametrize("html,found", [
    ('<img src="DATA:image/png;base64,iVBO" alt=""><a href="#maps">maps</a><a href="">top</a>'
     '<svg><use href="#dot"/></svg><script>let a = 1;</script><meta http-equiv="Content-Type">',
     []),
    ('<A HREF="https://example.com/docs">docs</A>', ["<a href='https://example.com/docs'>"]),
    ('<a href="javascript:alert(1)">x</a>', ["<a href='javascript:alert(1)'>"]),
    ('<object data="movie.swf"></object>',
     ["<object>: another document embedded", "<object data='movie.swf'>"]),
    ('<iframe srcdoc="<p>hi</p>"></iframe>', ["<iframe>: another document embedded"]),
    ('<form action="https://collect.example.com/"><button formaction="/x">go</button></form>',
     ["<form action='https://collect.example.com/'>", "<button formaction='/x'>"]),
    ('<img srcset="data:image/png;base64,AA,BB 1x, big.png 2x,data:,x">',
     ["<img srcset> 'big.png'"]),
    ('<p style="color:red; background:URL( &quot;https://x.example/b.png&quot; )">x</p>',
     ["<p style> url('https://x.example/b.png')"]),
    ("<style>@import 'https://fonts.example.com/a.css'; .a{b:url(#f)} .c{d:url(data:x)}</style>",
     ["<style> @import"]),
    ('<meta http-equiv="Refresh" content="0; url=https://x.example">',
     ["<meta http-equiv='refresh'>: a redirect"]),
    ('<script>new WebSocket("wss://live.example.com/s")</script>',
     ["<script> text: 'wss://live.example.com/s'"]),
    (f'<img src="https://x.example/{"a" * 100}.png">',
     [f"<img src='https://x.example/{'a' * 61}…'>"]),
])
def test_outside_references_of_a_page(html, found):
    from item_embeddings.verify.page import outside_references

    assert outside_references(html) == found


@pytest.mark.parametrize("attribute", [
    "src", "href", "xlink:href", "data", "poster", "action", "formaction", "background",
    "manifest", "codebase", "cite", "longdesc", "ping", "lowsrc", "dynsrc", "archive", "classid",
    "profile", "usemap"])
def test_every_attribute_that_loads_or_links_is_named(attribute):
    from item_embeddings.verify.page import outside_references

    assert outside_references(f'<p {attribute}="https://x.example/a">x</p><a href>top</a>') == [
        f"<p {attribute}='https://x.example/a'>"]


@pytest.mark.parametrize("html,found", [
    *((f"<{tag}></{tag}>", [f"<{tag}>: another document embedded"])
      for tag in ("iframe", "frame", "frameset", "object", "embed", "applet", "portal")),
    ('<link rel="preload" as="image" imagesrcset="a.png 1x, data:,x 2x">',
     ["<link imagesrcset> 'a.png'"]),
    ('<img srcset="a.png, b.png 2x,c.png">',
     ["<img srcset> 'a.png'", "<img srcset> 'b.png'", "<img srcset> 'c.png'"]),
    ('<script>get("ftp://f.example/a"); open("ws://w.example/s");'
     ' get("HTTP://H.example/p)")</script>',
     ["<script> text: 'ftp://f.example/a'", "<script> text: 'ws://w.example/s'",
      "<script> text: 'HTTP://H.example/p'"]),
    ("<style>.a{b:url(\n  'https://x.example/b.png'\n)} @IMPORT url(#f);</style>",
     ["<style> url('https://x.example/b.png')", "<style> @import"]),
    # references of every kind add up, in page order (a srcset URL may end in any letter)
    ('<a href="https://x.example/">x</a><img srcset="a/X, b.png 2x"><script>go("https://x'
     '.example/s")</script><script>let a;</script>',
     ["<a href='https://x.example/'>", "<img srcset> 'a/X'", "<img srcset> 'b.png'",
      "<script> text: 'https://x.example/s'"]),
    # text outside <style> and <script> loads nothing, even after them
    ("<style>.a{}</style>url(https://x.example/b.png) see https://x.example/docs"
     "<script>let a;</script>https://x.example/", []),
    ('<img src=" #top "><img src="data:,x"><img src="https://x.example/a\n   b.png">',
     ["<img src='https://x.example/a b.png'>"]),
    (f'<img src="https://x.example/{"a" * 62}">', [f"<img src='https://x.example/{'a' * 62}'>"]),
    (f'<img src="https://x.example/{"a" * 63}">',
     [f"<img src='https://x.example/{'a' * 61}…'>"]),
])
def test_outside_references_of_each_kind(html, found):
    """What the page scan names, as the violation shows it: each element that embeds another
    document, image candidates, the URL schemes a script reaches, CSS across lines and in any
    letter case; a reference is shown whole up to 80 characters, with its whitespace folded."""
    from item_embeddings.verify.page import outside_references

    assert outside_references(html) == found


def test_page_violation_counts_every_reference_and_shows_five(tmp_path):
    from item_embeddings.verify.page import check_page

    page = tmp_path / QA_REPORT
    page.write_text("".join(f'<img src="https://x.example/{i}.png">' for i in range(7)))
    report = Report("set")
    check_page(page, report)
    assert report.violations == [
        "qa_report.html: 7 reference(s) outside the page (a QA report is self-contained: data: "
        "URIs and #anchors only), e.g. " + "; ".join(
            f"<img src='https://x.example/{i}.png'>" for i in range(5))]
    page.write_text('<p>A QA report <a href="#top">top</a></p>')
    report = Report("set")
    check_page(page, report)
    assert report.ok and not report.facts
    page.write_bytes(b"\xff<p>")
    check_page(page, report)
    page.unlink()
    page.mkdir()
    check_page(page, report)
    assert report.violations == [
        "qa_report.html: unreadable as UTF-8 text: 'utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte",
        f"qa_report.html: unreadable as UTF-8 text: [Errno 21] Is a directory: '{page}'"]


def test_report_lists_facts_then_violations():
    report = Report("gs://b/set")
    report.facts.append("txt.npy: shape [2, 4], dtype float32")
    assert report.ok and report.format() == (
        "output set: gs://b/set\n  txt.npy: shape [2, 4], dtype float32\nall checks passed")
    report.fail("a")
    report.fail("b")
    assert not report.ok and report.format() == (
        "output set: gs://b/set\n  txt.npy: shape [2, 4], dtype float32\n2 violation(s):\n"
        "  VIOLATION: a\n  VIOLATION: b")


def test_readers_turn_damaged_files_into_violations(tmp_path):
    """JSON, parquet and .npy files that cannot be used are violations naming the file and
    what is wrong, never a traceback; a float64 array is a violation but still read."""
    from item_embeddings.verify.report import load_array, load_json, load_table

    report = Report("set")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "cut.json").write_text('{"a": ')
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert load_json(tmp_path / "list.json", report) is None
    assert load_json(tmp_path / "cut.json", report) is None
    assert load_json(tmp_path / "gone.json", report) is None
    assert load_json(tmp_path / "ok.json", report) == {"a": 1}
    assert report.violations[0] == "list.json: expected a JSON object"
    assert report.violations[1].startswith("cut.json: unreadable JSON: Expecting value")
    assert report.violations[2].startswith("gone.json: unreadable JSON: [Errno 2]")
    assert len(report.violations) == 3

    report = Report("set")
    columns = {"id": "id", "url": "str", "row": "int", "ok": "bool"}
    good = pa.table({"id": pa.array(["a"], pa.large_string()), "url": pa.array(["u"]),
                     "row": pa.array([0], pa.int16()), "ok": [True]})
    pq.write_table(good, tmp_path / "good.parquet")
    assert load_table(tmp_path / "good.parquet", columns, report).equals(good)
    pq.write_table(good.drop(["row"]), tmp_path / "short.parquet")
    assert load_table(tmp_path / "short.parquet", columns, report) is None
    pq.write_table(pa.table({"id": [1.5], "url": [2], "row": ["0"], "ok": [1]}),
                   tmp_path / "types.parquet")
    assert load_table(tmp_path / "types.parquet", columns, report) is None
    (tmp_path / "text.parquet").write_text("id,url")
    assert load_table(tmp_path / "text.parquet", columns, report) is None
    assert report.violations[:5] == [
        "short.parquet: missing column(s) ['row'] (has ['id', 'url', 'ok'])",
        "types.parquet: column 'id' has type double, expected string or integer ids",
        "types.parquet: column 'url' has type int64, expected a string type",
        "types.parquet: column 'row' has type string, expected an integer type",
        "types.parquet: column 'ok' has type int64, expected bool"]
    assert report.violations[5].startswith("text.parquet: unreadable parquet: ")
    assert len(report.violations) == 6
    pq.write_table(pa.table({"id": [7], "url": pa.array(["u"], pa.large_string())}),
                   tmp_path / "ints.parquet")
    assert load_table(tmp_path / "ints.parquet", {"id": "id", "url": "str"}, report) is not None
    assert len(report.violations) == 6

    report = Report("set")
    np.save(tmp_path / "a64.npy", np.eye(2))
    np.save(tmp_path / "flat.npy", np.zeros(3, np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((2, 3), np.int32))
    np.save(tmp_path / "objects.npy", np.array([[None]], dtype=object))
    np.save(tmp_path / "ints64.npy", np.zeros((2, 3), np.int64))
    # a pickle is not read (unpickling runs code): not even one of an array
    (tmp_path / "pickled.npy").write_bytes(pickle.dumps(np.eye(2, dtype=np.float32)))
    assert load_array(tmp_path / "a64.npy", report).tolist() == [[1, 0], [0, 1]]
    assert load_array(tmp_path / "flat.npy", report) is None
    assert load_array(tmp_path / "ints.npy", report) is None
    assert load_array(tmp_path / "ints.npy", report, np.int32).shape == (2, 3)
    assert load_array(tmp_path / "objects.npy", report) is None
    assert load_array(tmp_path / "ints64.npy", report, np.int32).shape == (2, 3)
    assert load_array(tmp_path / "pickled.npy", report) is None
    assert report.facts == ["a64.npy: shape [2, 2], dtype float64",
                            "flat.npy: shape [3], dtype float32",
                            "ints.npy: shape [2, 3], dtype int32",
                            "ints.npy: shape [2, 3], dtype int32",
                            "ints64.npy: shape [2, 3], dtype int64"]
    assert report.violations[:3] == ["a64.npy: expected float32, got float64",
                                     "flat.npy: expected a 2-D array, got shape [3]",
                                     "ints.npy: expected float32, got int32"]
    assert report.violations[3].startswith("objects.npy: unreadable .npy: ")
    assert report.violations[4] == "ints64.npy: expected int32, got int64"
    assert report.violations[5].startswith("pickled.npy: unreadable .npy: ")
    assert "pickle" in report.violations[5] and len(report.violations) == 6


@pytest.mark.parametrize("block_rows", [3, 65536])
def test_row_values_and_meta_fields_checked_as_reported(monkeypatch, block_rows):
    """NaN/Inf rows and rows off unit norm (by more than 0.001) are named by row, the first five
    shown, in blocks of any size; a meta field missing or disagreeing with the data is named."""
    from item_embeddings.verify import report as verify_report
    from item_embeddings.verify.report import check_meta, check_values, meta_fact, rows_text

    monkeypatch.setattr(verify_report, "CHUNK_ROWS", block_rows)
    rows = np.tile(np.array([[0.6, 0.8]], np.float32), (16, 1))
    rows[[1, 3, 5, 7, 9, 11]] = np.nan
    rows[13, 1] = np.inf
    rows[2] *= 1.0009   # within the tolerance
    rows[4] *= 1.0011
    rows[6] *= 0.9989
    rows[8] = 0
    rows[[10, 12, 14]] *= 2
    report = Report("set")
    check_values(FUSED_ARRAY, rows, report)
    assert report.violations == [
        "fused.npy: 7 row(s) with NaN/Inf (rows [1, 3, 5, 7, 9])",
        "fused.npy: 6 row(s) not unit-norm (tolerance 0.001; rows [4, 6, 8, 10, 12])"]
    report = Report("set")
    check_values(FUSED_ARRAY, rows[[0, 2]], report)
    assert report.ok
    # a float16 array (a dtype violation) is measured in float64 all the same: this row's
    # norm is 1.00137, though float16 arithmetic would round it to 1.00098
    check_values(TXT_ARRAY, np.array([[0.6006, 0.8013]], np.float16), report)
    assert report.violations == [
        "txt.npy: 1 row(s) not unit-norm (tolerance 0.001; rows [0])"]
    report = Report("set")
    check_meta(IMG_META, {"count": 3, "embed_dim": 512, "extra": 1},
               {"count": 3, "embed_dim": 32, "failed_count": 0}, report)
    assert report.violations == ["img_meta.json: embed_dim = 512 but the data says 32",
                                 "img_meta.json: field 'failed_count' missing"]
    assert meta_fact(KNN_META, {"k": 5, "spaces": {}, "files": [], "count": 2.5,
                                "a": "x"}) == "knn_meta.json: a=x, count=2.5, k=5"
    assert rows_text(list(range(9))) == "9 row(s) (rows [0, 1, 2, 3, 4])"


def _unit_rows(n: int, dim: int, seed: int = 3) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("block_rows", [64, 65536])
def test_sampled_exact_search_across_blocks(monkeypatch, block_rows):
    """A seeded sample of 256 of 300 rows searched exactly, in blocks of any size: an exact
    graph by cosine passes (rows of any length; the row itself and the rows it lists are no
    candidates in whichever block they fall); every row listing its 2nd..6th nearest misses
    one, and the message names the rows and an example."""
    from item_embeddings.verify import nearest

    monkeypatch.setattr(nearest, "CHUNK_ROWS", block_rows)
    vectors = _unit_rows(300, 16) * np.linspace(0.5, 2, 300, dtype=np.float32)[:, None]
    idx, scores = exact_knn(vectors, 6)
    exact = nearest.Recorded("exact", 1.0, 1000)
    report = Report("set")
    nearest.check_nearest("fused", idx[:, :5], vectors, exact, report)
    assert report.ok and report.facts == [
        "knn_fused.npy: 256 of 300 rows (seeded sample) searched exactly: recall@5 1.0000 "
        "(recorded 1.0000, method exact)"]
    report = Report("set")
    nearest.check_nearest("fused", idx[:, 1:], vectors, exact, report)
    [violation] = report.violations
    first = int(violation.split("(rows [")[1].split(",")[0])
    assert violation == (
        f"knn_fused.npy: 256 row(s) (rows {violation.split('(rows ')[1].split(']')[0]}]) of 256 "
        f"sampled do not list their nearest fused.npy rows, though knn_meta.json says the "
        f"graph is exact (e.g. row {first} lists row {idx[first, 5]} (cosine "
        f"{scores[first, 5]:.4f}) but not row {idx[first, 0]} (cosine {scores[first, 0]:.4f}))")
    assert "recall@5 0.8000 (recorded 1.0000, method exact)" in report.facts[0]


@pytest.mark.parametrize("recorded,allowed", [(0.85, None), (0.9, "0.0841")])
def test_sampled_search_of_an_approximate_graph(recorded, allowed):
    """recall@5 0.8 on the sample (each row misses its nearest): within sampling noise of a
    recorded 0.85 (1,000 rows), not of 0.9."""
    from item_embeddings.verify import nearest

    vectors = _unit_rows(300, 16)
    idx, _ = exact_knn(vectors, 6)
    report = Report("set")
    nearest.check_nearest("text", idx[:, 1:], vectors,
                          nearest.Recorded("ivf-flat", recorded, 1000), report)
    assert report.facts == [f"knn_text.npy: 256 of 300 rows (seeded sample) searched exactly: "
                            f"recall@5 0.8000 (recorded {recorded:.4f}, method ivf-flat)"]
    if allowed is None:
        assert report.ok
    else:
        [violation] = report.violations
        assert violation.startswith(
            f"knn_text.npy: recall@5 0.8000 on 256 sampled rows searched exactly, but "
            f"knn_meta.json records 0.9000 (ivf-flat; sampling noise explains {allowed} "
            f"less): the graph does not list the nearest txt.npy rows (e.g. row ")


@pytest.mark.filterwarnings("error")  # and verify prints no numpy warning about them
def test_sampled_search_skips_rows_it_cannot_judge():
    """Rows without a direction (NaN, Inf, zero, too small to measure) and listed indices out
    of range are the other checks' violations: the search leaves those rows out and does not
    count such rows as nearer; an approximate graph without a usable recorded recall is not
    judged."""
    from item_embeddings.verify import nearest

    vectors = _unit_rows(200, 8)
    idx, _ = exact_knn(vectors, 4)
    vectors[7] = np.nan
    vectors[8] = 0
    vectors[10] = [np.inf, -np.inf, 1, 1, 1, 1, 1, 1]
    vectors[11] = 1e-45  # subnormal: its squares are 0
    idx[9, 0] = 200
    bad = {7, 8, 10, 11}
    judged = [r for r in range(200) if r not in bad | {9} and not bad & set(idx[r])]
    report = Report("set")
    nearest.check_nearest("text", idx, vectors, nearest.Recorded("exact", None, None), report)
    assert report.ok and report.facts == [
        f"knn_text.npy: {len(judged)} of 200 rows (seeded sample) searched exactly: recall@4 "
        f"1.0000 (recorded ?, method exact)"]
    report = Report("set")
    nearest.check_nearest("text", idx[:, ::-1], vectors,
                          nearest.Recorded("ivf-flat", None, 1000), report)
    assert report.ok and not report.facts
    report = Report("set")
    nearest.check_nearest("text", np.full((200, 4), 300), vectors,
                          nearest.Recorded("exact", 1.0, 10), report)
    assert report.ok and not report.facts  # no row to judge


def test_sampled_search_is_seeded_and_names_the_worst_row(monkeypatch):
    """Rows that miss 0 to 4 of their 5 nearest, searched in blocks of 64 rows: the example is
    a row that misses the most, with the nearest row it does not list; the same graph gets the
    same report every time (a seeded sample). A graph recorded with recall 0 may miss all."""
    from item_embeddings.verify import nearest

    monkeypatch.setattr(nearest, "CHUNK_ROWS", 64)
    vectors = _unit_rows(2000, 8)
    exact, scores = exact_knn(vectors, 10)
    missing = (np.arange(2000) + 1) % 5  # row i lists its (m + 1)-th to (m + 5)-th nearest
    idx = np.stack([exact[i, m:m + 5] for i, m in enumerate(missing)])
    reports = []
    for _ in range(2):
        report = Report("set")
        nearest.check_nearest("text", idx, vectors, nearest.Recorded("exact", 1.0, 100), report)
        reports.append(report)
    assert reports[0] == reports[1]
    [violation] = reports[0].violations
    row = int(violation.split("e.g. row ")[1].split(" ")[0])
    assert missing[row] == 4 and violation.endswith(
        f"(e.g. row {row} lists row {exact[row, 8]} (cosine {scores[row, 8]:.4f}) but not row "
        f"{exact[row, 0]} (cosine {scores[row, 0]:.4f}))")
    assert violation.startswith("knn_text.npy: ") and " of 256 sampled do not list" in violation
    report = Report("set")
    nearest.check_nearest("text", exact[:, 5:], vectors, nearest.Recorded("ivf-flat", 0.0, 100),
                          report)
    assert report.ok and report.facts == [
        "knn_text.npy: 256 of 2000 rows (seeded sample) searched exactly: recall@5 0.0000 "
        "(recorded 0.0000, method ivf-flat)"]


@pytest.mark.parametrize("angle,misses", [(-0.3, False), (-0.30002, False), (-0.3003, True)])
def test_sampled_search_takes_equal_cosines_as_a_tie(angle, misses):
    """Row 0 lists row 2 though row 1 is as near (cosine equal, or less than 1e-5 apart): no
    miss; 9e-5 nearer is a miss, named with both cosines."""
    from item_embeddings.verify import nearest

    angles = np.array([0, 0.3, angle, 1.5, 1.6, 3.0, 3.1])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    idx, scores = exact_knn(vectors, 1)
    assert idx[0, 0] == 1
    idx[0, 0] = 2
    report = Report("set")
    nearest.check_nearest("text", idx, vectors, nearest.Recorded("exact", 1.0, 10), report)
    assert report.facts == ["knn_text.npy: 7 of 7 rows (seeded sample) searched exactly: "
                            f"recall@1 {6 / 7 if misses else 1:.4f} (recorded 1.0000, method "
                            f"exact)"]
    assert report.violations == ([
        f"knn_text.npy: 1 row(s) (rows [0]) of 7 sampled do not list their nearest txt.npy "
        f"rows, though knn_meta.json says the graph is exact (e.g. row 0 lists row 2 (cosine "
        f"{np.cos(angle):.4f}) but not row 1 (cosine {np.cos(0.3):.4f}))"] if misses else [])


@pytest.mark.parametrize("info,k,recorded,violations", [
    ({"method": "ivf-flat", "recall_at_k": 0.97, "recall_at": {"1": 0.99, "5": 0.98},
      "recall_queries": 1000}, 10, ("ivf-flat", 0.97, 1000), []),
    ({"method": "exact", "recall_at_k": 1, "recall_at": {"1": 0}, "recall_queries": 0}, 2,
     ("exact", 1, None), []),
    ({"recall_at_k": 0}, 4, ("None", 0, None), []),
    ({"recall_at_k": 1.0000001, "recall_at": {"0": 0.5, "x": 0.5}}, None, ("None", None, None),
     ["recall_at_k = 1.0000001 is not a number in [0, 1]"]),
    ({"recall_at_k": 0.5, "recall_at": {"0": 0.5, "4": 0.5, "3": -0.5}}, 4,
     ("None", 0.5, None),
     ["recall_at: '0' is not a column count in [1, 4)", "recall_at: '4' is not a column count",
      "recall_at['3'] = -0.5 is not a number in [0, 1]"]),
    ({"recall_at_k": 0.5, "recall_queries": True}, 4, ("None", 0.5, None),
     ["recall_queries = True is not a row count"]),
    ({"recall_at_k": 0.5, "recall_queries": 2.5}, 4, ("None", 0.5, None),
     ["recall_queries = 2.5 is not a row count"]),
    ({"method": "ivf-pq", "recall_at_k": True, "recall_at": [0.9], "recall_queries": -1}, 4,
     ("ivf-pq", None, None),
     ["recall_at_k = True is not a number in [0, 1]",
      "recall_at = [0.9] is not a mapping of column count to recall",
      "recall_queries = -1 is not a row count"]),
    ({"recall_at_k": "0.9", "recall_at": {"x": 1, "3": 1.0}}, 4, ("None", None, None),
     ["recall_at_k = '0.9' is not a number in [0, 1]",
      "recall_at: 'x' is not a column count in [1, 4)"]),
    ({"recall_at_k": float("nan"), "recall_at": {"1": None}}, 2, ("None", None, None),
     ["recall_at_k = nan is not a number in [0, 1]", "recall_at['1'] = None is not a number"]),
])
def test_recorded_recall_read_from_the_meta(info, k, recorded, violations):
    from item_embeddings.verify.nearest import Recorded, recorded_recall

    report = Report("set")
    assert recorded_recall("fused", info, k, report) == Recorded(*recorded)
    assert len(report.violations) == len(violations)
    for got, fragment in zip(report.violations, violations):
        assert got.startswith(f"knn_meta.json: spaces.fused.{fragment}"), (got, fragment)


@pytest.mark.parametrize("block_rows", [5, 65536])
def test_graph_checks_name_each_damaged_row(monkeypatch, block_rows):
    """Each rule of a kNN graph, checked in blocks of any size, on rows of any length: the
    violation names the file, the rows and the rule, word for word; scores within the tolerance
    of their cosine, a cosine of 1 (two equal rows) and ties in order pass."""
    from item_embeddings.verify import graphs

    monkeypatch.setattr(graphs, "CHUNK_ROWS", block_rows)
    vectors = _unit_rows(14, 4) * np.linspace(0.5, 2, 14, dtype=np.float32)[:, None]
    vectors[13] = vectors[12] * 3  # the same direction: cosine 1
    idx, scores = exact_knn(vectors, 3)
    assert scores[12, 0] == pytest.approx(1.0, abs=1e-6) and idx[12, 0] == 13
    assert idx[10].tolist() == [12, 13, 7]
    scores[0] -= 0.0011                              # just past the tolerance (the first row)
    idx[1, 2] = 14                                   # outside [0, 14)
    idx[2, 0], scores[2, 0] = 2, 1.0                 # itself (its true cosine)
    idx[3, 1], scores[3, 1] = idx[3, 0], scores[3, 0]  # twice (a tie: in order)
    idx[10, 2], scores[10, 2] = 13, scores[10, 1]    # twice, not the smallest index
    scores[4, 2] = np.nan
    scores[5] = 1.5                                  # outside [-1, 1], and not the cosine
    idx[6, :2], scores[6, :2] = idx[6, 1::-1].copy(), scores[6, 1::-1].copy()
    scores[7] -= 0.0011
    scores[8] += 0.0009                              # within the tolerance
    scores[9] = [-1.2, -1.3, -1.4]                   # below -1, and not the cosine
    scores[12, 0] = np.float32(1.001)                # the float32 just above 1 + 0.001
    report = Report("set")
    graphs.check_graph("text", idx, scores, vectors, report)
    assert report.violations == [
        "knn_text.npy: 1 row(s) (rows [1]) with neighbour indices outside [0, 14)",
        "knn_text.npy: 1 row(s) (rows [2]) listing the item itself as its neighbour",
        "knn_text.npy: 2 row(s) (rows [3, 10]) listing a neighbour twice",
        "knn_text_scores.npy: 1 row(s) (rows [4]) with NaN/Inf scores",
        "knn_text_scores.npy: 3 row(s) (rows [5, 9, 12]) with scores outside [-1, 1] "
        "(tolerance 0.001)",
        "knn_text_scores.npy: 1 row(s) (rows [6]) not sorted most similar first",
        "knn_text_scores.npy: 5 row(s) (rows [0, 5, 7, 9, 12]) whose scores are not the cosine "
        "of the txt.npy rows they link (tolerance 0.001): built from other vectors, or rows "
        "moved"]
    # without the rows (txt.npy missing, or of another length) the cosines are not checked
    for other in (None, vectors[:-1]):
        report = Report("set")
        graphs.check_graph("fused", idx, scores, other, report)
        assert len(report.violations) == 6 and report.violations[-1] == (
            "knn_fused_scores.npy: 1 row(s) (rows [6]) not sorted most similar first")
    for rows in (vectors, _unit_rows(8, 96)):  # k x dim above 256: fewer rows gathered at once
        report = Report("set")
        graphs.check_graph("fused", *exact_knn(rows, 3), rows, report)
        assert report.ok and not report.facts
    report = Report("set")  # a set of one item: its one neighbour can only be out of range
    graphs.check_graph("text", np.array([[1]], np.int32), np.array([[0.5]], np.float32),
                       vectors[:1], report)
    assert report.violations == [
        "knn_text.npy: 1 row(s) (rows [0]) with neighbour indices outside [0, 1)"]


def test_allowed_shortfall_of_a_recall():
    from item_embeddings.verify.nearest import Recorded, allowed_shortfall

    # a measured recall of 1 bounds the miss rate at 3/1000 only; no queries: the sample's
    assert allowed_shortfall(Recorded("ivf-flat", 1.0, 1000), 256) == pytest.approx(0.01532,
                                                                                  abs=1e-5)
    assert allowed_shortfall(Recorded("ivf-flat", 0.9, None), 100) == pytest.approx(0.16971,
                                                                                  abs=1e-5)
    assert allowed_shortfall(Recorded("ivf-flat", 0.9, 50), 100) == pytest.approx(0.20785,
                                                                                abs=1e-5)
