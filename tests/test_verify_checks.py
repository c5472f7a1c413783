"""The pass of ``verify`` over a whole set (verify/checks.py), read as a user reads it: the
facts and violations ``verify`` prints, word for word, on generated sets (no model; the QA page
a plain self-contained one with its record, ``write_page_record``), so that each check costs
milliseconds. tests/test_verify.py verifies sets with their real QA report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_output_set, reseal, verify_cli, write_knn, write_page_record
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    FUSION_EXCLUSIONS,
    FUSION_WEIGHTS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    MANIFEST,
    QA_REPORT,
    REPORT_META,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.publish import publish_outputs
from item_embeddings.verify import verify_outputs

REPORT_MISSING = ("report outputs missing (qa_report.html): the QA report belongs to the set "
                  "(the report step writes it, and report_meta.json, with the other outputs)")


@pytest.fixture
def plain_set(tmp_path) -> Path:
    """A whole set of 40 items (text, image, fusion, kNN graphs with k = 3, the QA page)."""
    return write_page_record(write_knn(make_output_set(tmp_path / "out", with_report=False), k=3))


def _violations(root: Path | str) -> list[str]:
    return verify_outputs(str(root)).violations


def _facts(root: Path | str) -> list[str]:
    """The facts ``verify`` lists, the steps' wall times (different each run) left out."""
    report = verify_outputs(str(root))
    return [re.sub(r", wall_time_sec=[0-9.e-]+", "", fact) for fact in report.facts]


def _edit_json(path: Path, **changes) -> dict:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return data


def _rewrite(path: Path, table: pa.Table, reseal_root: Path | None = None) -> None:
    pq.write_table(table, path)
    if reseal_root is not None:
        reseal(reseal_root)


SET_FACTS = [
    "txt_meta.json: count=40, embed_dim=384, encoder_name=all-MiniLM-L6-v2, run_id=run-1",
    "img_meta.json: attempted_count=26, count=21, embed_dim=512, failed_count=5, "
    "no_url_count=14, run_id=run-1",
    "fusion_config.json: count=40, hidden_dim=256, image_run_id=run-1, items_with_images=20, "
    "output_dim=128, run_id=run-1, text_run_id=run-1",
    "knn_meta.json: count=40, k=3, run_id=run-1",
    "report_meta.json: count=40, fusion_run_id=run-1, image_run_id=run-1, knn_run_id=run-1, "
    "run_id=run-1, text_run_id=run-1",
    "txt.npy: shape [40, 384], dtype float32",
    "text items: 40",
    "img.npy: shape [21, 512], dtype float32",
    "items with images: 21",
    "failed downloads: 5 (http_status: 4, timeout: 1)",
    "fused.npy: shape [40, 128], dtype float32",
    "image vectors excluded from fusion: 1",
    "fused items: 40, with images: 20",
    "knn_text.npy: shape [40, 3], dtype int32",
    "knn_text_scores.npy: shape [40, 3], dtype float32",
    "knn_meta.json text: build_time_sec=0.0, dim=384, method=exact, query_time_sec=0.0, "
    "recall_at_k=1.0, recall_queries=40",
    "knn_text.npy: 40 of 40 rows (seeded sample) searched exactly: recall@3 1.0000 "
    "(recorded 1.0000, method exact)",
    "knn_fused.npy: shape [40, 3], dtype int32",
    "knn_fused_scores.npy: shape [40, 3], dtype float32",
    "knn_meta.json fused: build_time_sec=0.0, dim=128, method=exact, query_time_sec=0.0, "
    "recall_at_k=1.0, recall_queries=40",
    "knn_fused.npy: 40 of 40 rows (seeded sample) searched exactly: recall@3 1.0000 "
    "(recorded 1.0000, method exact)",
]


# ----------------------------------------------------------------------------- a whole set

def test_a_whole_set_lists_its_facts_in_order_and_passes(plain_set, capsys):
    report = verify_outputs(str(plain_set))
    assert report.violations == []
    assert _facts(plain_set) == ["manifest.json: none (not a published set)", *SET_FACTS]
    rc, out = verify_cli(plain_set, capsys)
    assert rc == 0 and out.rstrip().endswith("all checks passed"), out
    assert f"output set: {plain_set}\n  manifest.json: none (not a published set)\n" in out, out


def test_a_set_without_graphs_says_so_and_passes(plain_set):
    for name in (KNN_TEXT, KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES, KNN_META):
        (plain_set / name).unlink()
    write_page_record(plain_set)
    assert _violations(plain_set) == []
    facts = _facts(plain_set)
    assert "kNN graphs: none" in facts
    assert not any(f.startswith(("knn_", KNN_META)) for f in facts), facts


def test_a_published_set_is_read_as_its_manifest_lists_it(plain_set, tmp_path, capsys):
    published = tmp_path / "pub"
    pointer = publish_outputs([plain_set], str(published), run_id="r1")
    root = published / pointer["set"].rstrip("/")
    facts = _facts(published)
    assert facts[:2] == [f"publish prefix: its pointer names the set {root}",
                         f"manifest.json: run_id='r1', published_at={pointer['published_at']}, "
                         f"{len(pointer['files'])} files"]
    assert facts[2:] == SET_FACTS
    # The set's own folder is the same set, without the pointer's line.
    assert _facts(root)[0].startswith("manifest.json: run_id='r1'")
    # A file beside the set that its manifest does not list is named, and ignored.
    (root / "notes.txt").write_text("left here by hand")
    assert _violations(published) == []
    assert ("files not in the manifest (ignored by readers): ['notes.txt']"
            in _facts(published))
    # A manifest that lists no files is a set without files.
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps({"run_id": "r1"}))
    assert _violations(published) == [
        "no text outputs (txt.npy, txt_items.parquet, txt_meta.json): not an item-embeddings "
        "output set"]
    assert _facts(published)[1] == "manifest.json: run_id='r1', published_at=, 0 files"
    (root / MANIFEST).write_text(json.dumps(manifest))
    # A file the manifest does not list is not part of the set, even when it is there.
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["files"][IMG_FAILURES]
    (root / MANIFEST).write_text(json.dumps(manifest))
    assert _violations(root) == ["image outputs incomplete: missing ['img_failures.parquet']"]
    assert ("files not in the manifest (ignored by readers): ['img_failures.parquet', "
            "'notes.txt']") in _facts(root)


def test_a_manifest_that_cannot_be_used_is_named_and_the_files_still_checked(plain_set):
    (plain_set / MANIFEST).write_text(json.dumps({"run_id": "r1", "files": {TXT_ARRAY: 1}}))
    assert _violations(plain_set) == [
        "manifest.json: 'files' is not a mapping of file name to size and sha256"]
    assert _facts(plain_set)[0] == SET_FACTS[0]  # no manifest fact; every group read
    (plain_set / MANIFEST).write_text(json.dumps({"files": {}}))  # lists nothing
    assert _facts(plain_set)[0] == "manifest.json: run_id='', published_at=, 0 files"
    assert _violations(plain_set)[0].startswith("no text outputs")
    for bad in ("[1, 2]", json.dumps({"run_id": "r1"})):
        (plain_set / MANIFEST).write_text(bad)
        assert _violations(plain_set) == [
            f"{plain_set}/manifest.json: a manifest is a JSON object with 'files'"]


def test_a_manifest_records_each_file(plain_set):
    from item_embeddings.storage import file_record

    files = {name: file_record(plain_set / name) for name in (TXT_ARRAY, TXT_ITEMS, TXT_META)}
    files[TXT_ARRAY] = {**files[TXT_ARRAY], "sha256": "0" * 64}
    files["gone.npy"] = {"size": 1, "sha256": "0" * 64}
    (plain_set / MANIFEST).write_text(json.dumps({"run_id": "r2", "published_at": "t",
                                                   "files": files}))
    assert _violations(plain_set) == [
        "manifest.json lists gone.npy but it is missing",
        "txt.npy: content does not match manifest.json (same size, sha256 differs): changed "
        "after it was written, or from another run",
        "image outputs missing (img.npy, img_items.parquet, img_meta.json, "
        "img_failures.parquet): a complete set holds the text, image and fusion outputs of one "
        "run",
        "fusion outputs missing (fused.npy, fused_items.parquet, fusion_config.json): a "
        "complete set holds the text, image and fusion outputs of one run",
        REPORT_MISSING,
    ]
    facts = _facts(plain_set)
    assert facts[0] == "manifest.json: run_id='r2', published_at=t, 4 files"
    assert facts[1].startswith("files not in the manifest (ignored by readers): ['fused.npy', ")
    assert "kNN graphs: none" in facts


# ----------------------------------------------------------------------------- not a set

def test_what_is_not_a_set_is_one_violation(tmp_path):
    assert _violations(tmp_path / "nope") == [f"directory not found: {tmp_path / 'nope'}"]
    (tmp_path / "file").write_text("x")
    assert _violations(tmp_path / "file") == [f"directory not found: {tmp_path / 'file'}"]
    (tmp_path / "empty").mkdir()
    not_a_set = ("no text outputs (txt.npy, txt_items.parquet, txt_meta.json): not an "
                 "item-embeddings output set")
    assert _violations(tmp_path / "empty") == [not_a_set]
    (tmp_path / "empty" / "sub").mkdir()  # folders are not files of a set
    (tmp_path / "empty" / "sub" / TXT_ARRAY).write_bytes(b"x")
    assert _violations(tmp_path / "empty") == [not_a_set]
    (tmp_path / "empty" / MANIFEST).write_text("{not json")
    [violation] = _violations(tmp_path / "empty")
    assert violation.startswith(f"{tmp_path / 'empty' / MANIFEST}: unreadable manifest: ")


@pytest.mark.parametrize("name", [TXT_ARRAY, TXT_ITEMS, TXT_META])
def test_any_text_file_makes_it_a_set_to_check(tmp_path, name):
    root = make_output_set(tmp_path / "out", with_images=False)
    for other in {TXT_ARRAY, TXT_ITEMS, TXT_META} - {name}:
        (root / other).unlink()
    missing = sorted({TXT_ARRAY, TXT_ITEMS, TXT_META} - {name})
    assert _violations(root)[0] == f"text outputs incomplete: missing {missing}"


def test_groups_missing_or_incomplete(plain_set):
    for name in (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, FUSION_EXCLUSIONS, FUSION_WEIGHTS,
                 KNN_TEXT_SCORES):
        (plain_set / name).unlink()
    (plain_set / IMG_META).unlink()
    assert _violations(plain_set) == [
        "image outputs incomplete: missing ['img_meta.json']",
        "fusion outputs missing (fused.npy, fused_items.parquet, fusion_config.json): a "
        "complete set holds the text, image and fusion outputs of one run",
        "knn outputs incomplete: missing ['knn_text_scores.npy']",
    ]
    assert "kNN graphs: none" not in _facts(plain_set)


# ----------------------------------------------------------------------------- meta files

@pytest.mark.parametrize("run_id", [None, "", 7])
def test_a_meta_file_without_its_run_id(plain_set, run_id):
    _edit_json(plain_set / IMG_META, run_id=run_id)
    violations = _violations(plain_set)
    assert violations[0] == "img_meta.json: no run_id: which run wrote these files is unknown"


def test_a_meta_file_that_records_no_files_or_not_all(plain_set):
    _edit_json(plain_set / TXT_META, files=None)
    _edit_json(plain_set / KNN_META, files={})
    assert _violations(plain_set) == [
        "txt_meta.json: no 'files' record (size and sha256 of each file of the step): the "
        "alignment of its files cannot be proven",
        "knn_meta.json: 'files' records no hash of ['knn_text.npy', 'knn_text_scores.npy', "
        "'knn_fused.npy', 'knn_fused_scores.npy']",
    ]


def test_a_meta_file_whose_record_is_not_one(plain_set):
    _edit_json(plain_set / IMG_META, files=[IMG_ARRAY])
    assert _violations(plain_set) == [
        "img_meta.json: 'files' is not a mapping of file name to size and sha256"]


def test_an_unreadable_meta_file_is_named_and_its_group_not_checked_against_it(plain_set):
    (plain_set / FUSION_CONFIG).write_text("{")
    (plain_set / TXT_META).write_text("[]")
    violations = _violations(plain_set)
    assert violations[0] == "txt_meta.json: expected a JSON object"
    assert violations[1].startswith("fusion_config.json: unreadable JSON: ")
    assert len(violations) == 2, violations
    facts = _facts(plain_set)
    assert not any(f.startswith((f"{TXT_META}:", f"{FUSION_CONFIG}:")) for f in facts), facts


def test_groups_of_other_runs_are_named(plain_set):
    _edit_json(plain_set / FUSION_CONFIG, text_run_id="run-0", image_run_id=None)
    _edit_json(plain_set / REPORT_META, knn_run_id="run-9")
    assert _violations(plain_set) == [
        "fusion_config.json: text_run_id = 'run-0' but txt_meta.json has run_id 'run-1': "
        "groups of different runs",
        "fusion_config.json: image_run_id = None but img_meta.json has run_id 'run-1': groups "
        "of different runs",
        "report_meta.json: knn_run_id = 'run-9' but knn_meta.json has run_id 'run-1': groups "
        "of different runs",
    ]


def test_a_run_link_to_a_group_that_is_not_there_is_not_checked(plain_set):
    for name in (KNN_TEXT, KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES, KNN_META):
        (plain_set / name).unlink()
    assert _violations(plain_set) == []  # the report's record still names the kNN run


# ----------------------------------------------------------------------------- the QA report

def test_the_qa_report_and_its_record(plain_set, tmp_path):
    (plain_set / QA_REPORT).unlink()
    assert _violations(plain_set) == [
        REPORT_MISSING,
        "report_meta.json lists qa_report.html but it is missing"]
    (plain_set / REPORT_META).unlink()
    assert _violations(plain_set) == [REPORT_MISSING]
    write_page_record(plain_set)
    (plain_set / REPORT_META).unlink()
    assert _violations(plain_set) == [
        "qa_report.html: no report_meta.json records its size and sha256 (a set written before "
        "the report recorded itself, or the record was removed): it cannot be shown to be this "
        "set's report; run the QA report step again"]
    # A set published before the report recorded itself: the manifest's record is taken.
    published = tmp_path / "pub"
    pointer = publish_outputs([plain_set], str(published), run_id="old")
    assert _violations(published) == []
    assert ("qa_report.html: recorded by manifest.json only (no report_meta.json: published "
            "before the report recorded itself), so the runs it was made from are not checked"
            ) in _facts(published)
    # ... but only when the manifest lists the page
    root = published / pointer["set"].rstrip("/")
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["files"][QA_REPORT]
    (root / MANIFEST).write_text(json.dumps(manifest))
    assert _violations(root) == [REPORT_MISSING]


def test_the_page_is_scanned(plain_set):
    write_page_record(plain_set, page='<html><script src="https://x.example/a.js"></script>'
                                       '</html>')
    [violation] = _violations(plain_set)
    assert violation.startswith("qa_report.html: 1 reference(s) outside the page"), violation


# ----------------------------------------------------------------------------- the groups

def test_ids_that_cannot_join_or_repeat(plain_set):
    items = pq.read_table(plain_set / IMG_ITEMS)
    ids = [int(i[1:]) for i in items.column("id").to_pylist()]
    _rewrite(plain_set / IMG_ITEMS, items.set_column(0, "id", pa.array(ids, pa.int64())))
    fused = pq.read_table(plain_set / FUSED_ITEMS).to_pydict()
    fused["id"][5] = fused["id"][4]
    fused["id"][0] = None
    _rewrite(plain_set / FUSED_ITEMS, pa.table(fused), reseal_root=plain_set)
    assert _violations(plain_set) == [
        "img_items.parquet: ids are int64 but txt_items.parquet ids are string: they cannot "
        "join",
        "img_items.parquet: 21 id(s) not in txt_items.parquet, e.g. ['1', '11', '13']",
        "fused_items.parquet: 1 null id(s), at rows [0]",
        "fused_items.parquet: 1 duplicated id(s), e.g. ['B00004'] at rows [4, 5]",
        "fused_items.parquet does not cover the text items: 2 text id(s) missing, 1 extra, "
        "40 rows vs 40",
        "fused_items.parquet: has_image disagrees with img_items.parquet / "
        "fusion_exclusions.parquet for 20 id(s), e.g. ['B00002', 'B00004', 'B00007']",
        "fusion_exclusions.parquet: 1 id(s) not in img_items.parquet",
    ]


def test_text_rows_ids_and_meta_agree(plain_set):
    arr = np.load(plain_set / TXT_ARRAY)
    np.save(plain_set / TXT_ARRAY, np.concatenate([arr[:-2], arr[-2:] * 3]).astype(np.float32))
    _edit_json(plain_set / TXT_META, count=41, embed_dim=380)
    reseal(plain_set)
    violations = _violations(plain_set)
    assert violations[:3] == [
        "txt_meta.json: count = 41 but the data says 40",
        "txt_meta.json: embed_dim = 380 but the data says 384",
        "txt.npy: 2 row(s) not unit-norm (tolerance 0.001; rows [38, 39])",
    ], violations


def test_text_ids_and_rows_of_another_length(plain_set):
    pq.write_table(pq.read_table(plain_set / TXT_ITEMS).slice(0, 39), plain_set / TXT_ITEMS)
    reseal(plain_set)
    violations = _violations(plain_set)
    assert violations[0] == "txt.npy has 40 rows but txt_items.parquet has 39 ids"
    assert "text items: 39" in _facts(plain_set)


def test_text_meta_without_its_fields(plain_set):
    _edit_json(plain_set / TXT_META, count=None, embed_dim=None)
    assert _violations(plain_set) == ["txt_meta.json: field 'count' missing",
                                      "txt_meta.json: field 'embed_dim' missing"]


def test_unreadable_text_files_stop_the_text_checks_only(plain_set):
    (plain_set / TXT_ARRAY).write_bytes(b"not an array")
    reseal(plain_set)
    violations = _violations(plain_set)
    assert violations[0].startswith("txt.npy: unreadable .npy: "), violations
    assert "text items: 40" not in _facts(plain_set)


def test_image_rows_outside_the_array_or_shared(plain_set):
    items = pq.read_table(plain_set / IMG_ITEMS).to_pydict()
    items["row"][0] = -1
    items["row"][1] = 21  # one past the last row
    items["row"][2] = None
    items["row"][3] = items["row"][4]
    items["row"][5] = items["row"][6]
    items["row"][7] = None  # two ids without a row do not share one
    items["row"][8] = 100
    _rewrite(plain_set / IMG_ITEMS, pa.table(items), reseal_root=plain_set)
    violations = _violations(plain_set)
    shared = sorted([items["row"][4], items["row"][6]])
    assert violations == [
        "img_items.parquet: 5 row index(es) outside img.npy [0, 21), e.g. [-1, 21, None]",
        f"img_items.parquet: several ids point at the same img.npy row (rows {shared})",
    ]


def test_image_rows_the_last_row_is_inside(plain_set):
    items = pq.read_table(plain_set / IMG_ITEMS).to_pydict()
    assert sorted(items["row"]) == list(range(21))
    assert _violations(plain_set) == []


def test_image_ids_rows_meta_and_failures_agree(plain_set):
    items = pq.read_table(plain_set / IMG_ITEMS).slice(0, 20)
    failures = pq.read_table(plain_set / IMG_FAILURES).to_pydict()
    failures["id"][0] = items.column("id")[0].as_py()
    failures["id"].append("X-1")
    for column, value in (("url", "http://img/x.jpg"), ("reason", "timeout"),
                          ("detail", "no response"), ("http_status", None), ("attempts", 3)):
        failures[column].append(value)
    pq.write_table(items, plain_set / IMG_ITEMS)
    pq.write_table(pa.table(failures, schema=pq.read_schema(plain_set / IMG_FAILURES)),
                   plain_set / IMG_FAILURES)
    reseal(plain_set)
    first = items.column("id")[0].as_py()
    assert _violations(plain_set) == [
        "img.npy has 21 rows but img_items.parquet has 20 ids",
        f"1 id(s) are both in img_items.parquet and img_failures.parquet, e.g. ['{first}']",
        "img_meta.json: failures_by_reason = {'http_status': 4, 'timeout': 1} but the data says "
        "{'http_status': 4, 'timeout': 2}",
        "img_meta.json: failed_count = 5 but the data says 6",
        # the item whose image row was dropped still says it has one
        "fused_items.parquet: has_image disagrees with img_items.parquet / "
        "fusion_exclusions.parquet for 1 id(s), e.g. ['B00038']",
    ]
    assert "failed downloads: 6 (http_status: 4, timeout: 2)" in _facts(plain_set)
    _edit_json(plain_set / IMG_META, attempted_count=25)
    assert "img_meta.json: attempted_count = 25 but the data says 26" in _violations(plain_set)


def test_ids_both_embedded_and_failed_show_three(plain_set):
    items = pq.read_table(plain_set / IMG_ITEMS).to_pydict()
    failures = pq.read_table(plain_set / IMG_FAILURES)
    failed = failures.column("id").to_pylist()
    items["id"][:4] = failed[:4]
    _rewrite(plain_set / IMG_ITEMS, pa.table(items), reseal_root=plain_set)
    violations = _violations(plain_set)
    assert (f"4 id(s) are both in img_items.parquet and img_failures.parquet, e.g. "
            f"{sorted(failed[:4])[:3]}") in violations, violations


def test_image_meta_without_optional_counts_is_not_held_to_them(plain_set):
    _edit_json(plain_set / IMG_META, failures_by_reason=None, attempted_count=None)
    pq.write_table(pq.read_table(plain_set / IMG_FAILURES).slice(0, 0), plain_set / IMG_FAILURES)
    reseal(plain_set)
    assert _violations(plain_set) == ["img_meta.json: failed_count = 5 but the data says 0"]
    assert "failed downloads: 0" in _facts(plain_set)


def test_image_ids_not_among_the_text_ids(plain_set):
    items = pq.read_table(plain_set / IMG_ITEMS).to_pydict()
    items["id"][0], items["id"][1] = "Z2", "Z1"
    _rewrite(plain_set / IMG_ITEMS, pa.table(items), reseal_root=plain_set)
    assert _violations(plain_set)[0] == ("img_items.parquet: 2 id(s) not in txt_items.parquet, "
                                         "e.g. ['Z1', 'Z2']")


def test_fused_rows_ids_and_has_image(plain_set):
    fused = pq.read_table(plain_set / FUSED_ITEMS).to_pydict()
    fused["has_image"][1] = None
    img_ids = set(pq.read_table(plain_set / IMG_ITEMS).column("id").to_pylist())
    no_image = [i for i, h in zip(fused["id"], fused["has_image"]) if i not in img_ids]
    fused["has_image"][fused["id"].index(no_image[1])] = True
    _rewrite(plain_set / FUSED_ITEMS, pa.table(fused), reseal_root=plain_set)
    np.save(plain_set / FUSED_ARRAY, np.load(plain_set / FUSED_ARRAY)[:39])
    reseal(plain_set)
    assert _violations(plain_set) == [
        "fused_items.parquet: 1 null has_image value(s)",
        "fused.npy has 39 rows but fused_items.parquet has 40 ids",
        f"fused_items.parquet: has_image disagrees with img_items.parquet / "
        f"fusion_exclusions.parquet for 1 id(s), e.g. ['{no_image[1]}']",
        "fusion_config.json: count = 40 but the data says 39",
        "fusion_config.json: items_with_images = 20 but the data says 21",
    ]
    assert "fused items: 40, with images: 21" in _facts(plain_set)


def test_fused_ids_must_be_the_text_ids_in_their_order(plain_set):
    fused = pq.read_table(plain_set / FUSED_ITEMS).to_pydict()
    fused["id"][6], fused["id"][9] = fused["id"][9], fused["id"][6]
    fused["has_image"][6], fused["has_image"][9] = fused["has_image"][9], fused["has_image"][6]
    _rewrite(plain_set / FUSED_ITEMS, pa.table(fused), reseal_root=plain_set)
    assert _violations(plain_set) == [
        "fused_items.parquet ids are not in txt_items.parquet order (first difference at row 6)"]
    fused["id"][6] = "X"  # one text id missing, one extra
    _rewrite(plain_set / FUSED_ITEMS, pa.table(fused), reseal_root=plain_set)
    assert _violations(plain_set) == [
        "fused_items.parquet does not cover the text items: 1 text id(s) missing, 1 extra, "
        "40 rows vs 40"]


def test_fused_ids_repeated_to_the_same_set_of_ids(plain_set):
    fused = pq.read_table(plain_set / FUSED_ITEMS)
    _rewrite(plain_set / FUSED_ITEMS, pa.concat_tables([fused, fused.slice(39)]),
             reseal_root=plain_set)
    violations = _violations(plain_set)
    assert ("fused_items.parquet does not cover the text items: 0 text id(s) missing, 0 extra, "
            "41 rows vs 40") in violations, violations


def test_fusion_exclusions_and_items_with_images(plain_set):
    pq.write_table(pa.table({"id": ["B00002", "Q"], "reason": ["zero", "zero"]}),
                   plain_set / FUSION_EXCLUSIONS)
    _edit_json(plain_set / FUSION_CONFIG, items_with_images=21, output_dim=None)
    reseal(plain_set)
    assert _violations(plain_set) == [
        "fused_items.parquet: has_image disagrees with img_items.parquet / "
        "fusion_exclusions.parquet for 2 id(s), e.g. ['B00001', 'B00002']",
        "fusion_exclusions.parquet: 1 id(s) not in img_items.parquet",
        "fusion_config.json: items_with_images = 21 but the data says 20",
        "fusion_config.json: field 'output_dim' missing",
    ]
    assert "image vectors excluded from fusion: 2" in _facts(plain_set)


def test_without_fusion_exclusions_every_image_is_fused(plain_set):
    (plain_set / FUSION_EXCLUSIONS).unlink()
    files = json.loads((plain_set / FUSION_CONFIG).read_text())["files"]
    del files[FUSION_EXCLUSIONS]
    _edit_json(plain_set / FUSION_CONFIG, files=files)
    fused = pq.read_table(plain_set / FUSED_ITEMS).to_pydict()
    img_ids = set(pq.read_table(plain_set / IMG_ITEMS).column("id").to_pylist())
    excluded = [i for i, h in zip(fused["id"], fused["has_image"]) if i in img_ids and not h]
    assert _violations(plain_set) == [
        f"fused_items.parquet: has_image disagrees with img_items.parquet / "
        f"fusion_exclusions.parquet for 1 id(s), e.g. {excluded}"]
    assert not any(f.startswith("image vectors excluded") for f in _facts(plain_set))
    pq.write_table(pa.table({"id": [1], "reason": ["zero"]}), plain_set / FUSION_EXCLUSIONS)
    reseal(plain_set)
    assert _violations(plain_set)[0] == ("fusion_exclusions.parquet: ids are int64 but "
                                         "txt_items.parquet ids are string: they cannot join")


def test_fusion_checked_without_the_image_ids(plain_set):
    """img_items.parquet unreadable: the fused rows are still checked, has_image is not."""
    (plain_set / IMG_ITEMS).write_bytes(b"PAR1 not parquet")
    reseal(plain_set)
    violations = _violations(plain_set)
    assert violations[0].startswith("img_items.parquet: unreadable parquet: "), violations
    assert len(violations) == 1, violations
    assert "fused items: 40, with images: 20" in _facts(plain_set)


def test_the_fused_values_are_checked(plain_set):
    arr = np.load(plain_set / FUSED_ARRAY)
    arr[3] = np.nan
    np.save(plain_set / FUSED_ARRAY, arr)
    arr = np.load(plain_set / IMG_ARRAY)
    arr[4] *= 2
    np.save(plain_set / IMG_ARRAY, arr)
    reseal(plain_set)
    violations = _violations(plain_set)
    assert "img.npy: 1 row(s) not unit-norm (tolerance 0.001; rows [4])" in violations
    assert "fused.npy: 1 row(s) with NaN/Inf (rows [3])" in violations


# ----------------------------------------------------------------------------- kNN graphs

@pytest.mark.parametrize("k", [0, True, "3", 2.5, None])
def test_knn_k_must_be_a_positive_integer(plain_set, k):
    _edit_json(plain_set / KNN_META, k=k)
    if k is None:
        (plain_set / KNN_META).write_text(json.dumps(
            {**json.loads((plain_set / KNN_META).read_text()), "k": None}))
    reseal(plain_set)
    assert _violations(plain_set) == [f"knn_meta.json: k = {k!r} is not a positive integer"]
    facts = _facts(plain_set)
    assert "knn_meta.json text: build_time_sec=0.0, dim=384, method=exact, query_time_sec=0.0, " \
           "recall_at_k=1.0, recall_queries=40" in facts  # the spaces are still described
    assert not any("searched exactly" in f for f in facts), facts


def test_knn_k_of_one_is_taken(tmp_path):
    root = write_page_record(write_knn(make_output_set(tmp_path / "out", with_report=False),
                                       k=1))
    assert _violations(root) == []


def test_knn_count_and_spaces(plain_set):
    _edit_json(plain_set / KNN_META, count=39)
    reseal(plain_set)
    assert _violations(plain_set) == ["knn_meta.json: count = 39 but the data says 40"]
    meta = _edit_json(plain_set / KNN_META, count=40)
    del meta["spaces"]["fused"]
    (plain_set / KNN_META).write_text(json.dumps(meta))
    reseal(plain_set)
    spaces_wrong = "knn_meta.json: 'spaces' must describe ['fused', 'text']"
    assert _violations(plain_set) == [spaces_wrong]
    facts = _facts(plain_set)
    assert not any(f.startswith("knn_meta.json text") for f in facts), facts
    # Without the spaces the graphs are still checked, but not against a recorded recall.
    assert "knn_text.npy: shape [40, 3], dtype int32" in facts
    assert not any("searched exactly" in f for f in facts), facts
    meta["spaces"]["fused"] = "exact"
    (plain_set / KNN_META).write_text(json.dumps(meta))
    reseal(plain_set)
    assert _violations(plain_set) == [spaces_wrong]
    _edit_json(plain_set / KNN_META, spaces=[1, 2])
    reseal(plain_set)
    assert _violations(plain_set) == [spaces_wrong]


def test_knn_dim_and_shapes(plain_set):
    meta = json.loads((plain_set / KNN_META).read_text())
    meta["spaces"]["fused"]["dim"] = 64
    (plain_set / KNN_META).write_text(json.dumps(meta))
    idx = np.load(plain_set / KNN_TEXT)
    np.save(plain_set / KNN_TEXT, idx[:, :2].copy())
    reseal(plain_set)
    assert _violations(plain_set) == [
        "knn_text.npy: shape [40, 2], expected [40, 3] (text items x k of knn_meta.json)",
        "knn_meta.json: spaces.fused.dim = 64 but fused.npy has 128 columns",
    ]
    scores = np.load(plain_set / KNN_FUSED_SCORES)
    np.save(plain_set / KNN_FUSED_SCORES, scores[:39])
    reseal(plain_set)
    assert _violations(plain_set)[-1] == ("knn_fused_scores.npy: shape [39, 3], expected "
                                          "[40, 3] (text items x k of knn_meta.json)")


def test_knn_graphs_are_checked_and_searched(plain_set):
    idx = np.load(plain_set / KNN_FUSED)
    idx[2, 0] = 2  # the row itself
    np.save(plain_set / KNN_FUSED, idx)
    reseal(plain_set)
    violations = _violations(plain_set)
    assert violations[0] == ("knn_fused.npy: 1 row(s) (rows [2]) listing the item itself as "
                             "its neighbour"), violations
    assert violations[-1].startswith("knn_fused.npy: "), violations
    assert "though knn_meta.json says the graph is exact" in violations[-1], violations


def test_knn_graph_of_rows_the_text_ids_do_not_match(plain_set):
    """txt.npy with a row more than its ids: the graph is checked against the ids' count and
    not searched (its rows are not the items')."""
    arr = np.load(plain_set / TXT_ARRAY)
    np.save(plain_set / TXT_ARRAY, np.concatenate([arr, arr[:1]]))
    _edit_json(plain_set / TXT_META, count=41)
    reseal(plain_set)
    violations = _violations(plain_set)
    assert violations[0] == "txt.npy has 41 rows but txt_items.parquet has 40 ids"
    facts = _facts(plain_set)
    assert not any(f.startswith("knn_text.npy: 40 of 40") for f in facts), facts
    assert any(f.startswith("knn_fused.npy: 40 of 40") for f in facts), facts


def test_knn_without_text_ids_is_not_checked_for_shape(plain_set):
    (plain_set / TXT_ITEMS).write_bytes(b"broken")
    reseal(plain_set)
    violations = _violations(plain_set)
    assert violations[0].startswith("txt_items.parquet: unreadable parquet"), violations
    assert not any("expected [" in v or "count =" in v for v in violations), violations
    assert not any("searched exactly" in f for f in _facts(plain_set))


# ----------------------------------------------------------------------------- on Cloud Storage

def _upload(bucket, root: Path, prefix: str, names=None) -> str:
    for path in sorted(root.iterdir()):
        if path.is_file() and (names is None or path.name in names):
            bucket.blob(f"{prefix}/{path.name}").upload_from_filename(str(path))
    return f"gs://{bucket.name}/{prefix}"


def test_a_set_on_cloud_storage(plain_set, gcs):
    bucket = gcs.create_bucket("verify-checks")
    uri = _upload(bucket, plain_set, "run")
    report = verify_outputs(uri)
    assert report.violations == []
    assert [re.sub(r", wall_time_sec=[0-9.e-]+", "", f) for f in report.facts] == [
        "manifest.json: none (not a published set)", *SET_FACTS]
    assert _violations(f"gs://{bucket.name}/nothing") == [
        f"nothing found under gs://{bucket.name}/nothing"]
    # A published set: only what its manifest lists is fetched; names that are not plain
    # names in the set are refused.
    published = f"gs://{bucket.name}/pub"
    pointer = publish_outputs([plain_set], published, run_id="r1")
    bucket.blob(f"pub/{pointer['set']}stray.bin").upload_from_string(b"x")
    assert _violations(published) == []
    root = f"{published}/{pointer['set'].rstrip('/')}"
    assert _facts(published) == [
        f"publish prefix: its pointer names the set {root}",
        f"manifest.json: run_id='r1', published_at={pointer['published_at']}, "
        f"{len(pointer['files'])} files", *SET_FACTS]  # the stray file not even fetched
    manifest = dict(pointer, files={**pointer["files"], "../up.npy": {"size": 1, "sha256": ""},
                                    "": {"size": 1, "sha256": ""},
                                    "a/b.npy": {"size": 1, "sha256": ""},
                                    "..": {"size": 1, "sha256": ""}})
    manifest.pop("set")
    bucket.blob(f"pub/{pointer['set']}{MANIFEST}").upload_from_string(json.dumps(manifest))
    violations = _violations(published)
    assert violations[:4] == [
        "manifest.json: file name '../up.npy' is not a plain name in the set",
        "manifest.json: file name '' is not a plain name in the set",
        "manifest.json: file name 'a/b.npy' is not a plain name in the set",
        "manifest.json: file name '..' is not a plain name in the set",
    ], violations


def test_a_set_on_cloud_storage_with_a_manifest_that_is_not_json(plain_set, gcs):
    bucket = gcs.create_bucket("verify-checks-2")
    uri = _upload(bucket, plain_set, "run", names={TXT_ARRAY, TXT_ITEMS, TXT_META})
    bucket.blob(f"run/{MANIFEST}").upload_from_string(b"{not json")
    violations = _violations(uri)
    assert len(violations) == 1 and violations[0].startswith(
        f"{uri}/{MANIFEST}: unreadable manifest: "), violations


def test_a_copied_set_without_a_manifest_on_cloud_storage_is_read_whole(plain_set, gcs):
    bucket = gcs.create_bucket("verify-checks-3")
    uri = _upload(bucket, plain_set, "run", names={TXT_ARRAY, TXT_ITEMS, TXT_META})
    assert _violations(uri)[0].startswith("image outputs missing")
    shutil.rmtree(plain_set)


@pytest.mark.parametrize("prefix", ["runX", "run ", "run\t"])
def test_a_set_on_cloud_storage_under_any_prefix_name(plain_set, gcs, prefix):
    """Object names may end in any character: the set's files are found under the prefix as
    it is spelled (not one with its last letters or spaces stripped)."""
    bucket = gcs.create_bucket(f"verify-checks-names-{ord(prefix[-1])}")
    uri = _upload(bucket, plain_set, prefix)
    _upload(bucket, plain_set, prefix.rstrip("X \t"), names={TXT_META})  # a decoy beside it
    (plain_set / MANIFEST).write_text(json.dumps({"run_id": "mine", "files": {}}))
    _upload(bucket, plain_set, prefix.rstrip("X \t"), names={MANIFEST})
    assert _violations(uri) == []
    assert _facts(uri)[0] == "manifest.json: none (not a published set)"


def test_a_published_set_on_cloud_storage_whose_own_manifest_is_damaged(plain_set, gcs):
    bucket = gcs.create_bucket("verify-checks-manifest")
    published = f"gs://{bucket.name}/pub"
    pointer = publish_outputs([plain_set], published, run_id="r1")
    own = bucket.blob(f"pub/{pointer['set']}{MANIFEST}")
    own.upload_from_string(b"{not json")  # fetched alone, and reported unreadable
    violations = _violations(published)
    assert len(violations) == 2, violations
    assert violations[0].startswith("manifest.json: unreadable JSON: "), violations
    assert violations[1] == ("no text outputs (txt.npy, txt_items.parquet, txt_meta.json): not "
                             "an item-embeddings output set")
    own.upload_from_string(json.dumps({"run_id": "r1"}))  # lists no files: nothing to read
    root = f"{published}/{pointer['set'].rstrip('/')}"
    assert _violations(published) == [f"nothing found under {root}"]


def test_the_recorded_recall_of_each_space_is_checked(plain_set):
    meta = json.loads((plain_set / KNN_META).read_text())
    assert meta["spaces"]["text"]["recall_at"] == {"1": 1.0}
    meta["spaces"]["text"]["recall_at_k"] = 1.5
    meta["spaces"]["fused"]["recall_at"] = {"1": 1.0, "3": 1.0}  # k = 3: columns 1 and 2 only
    (plain_set / KNN_META).write_text(json.dumps(meta))
    reseal(plain_set)
    assert _violations(plain_set) == [
        "knn_meta.json: spaces.text.recall_at_k = 1.5 is not a number in [0, 1]",
        "knn_meta.json: spaces.fused.recall_at: '3' is not a column count in [1, 3)",
    ]


@pytest.mark.parametrize("name", [KNN_TEXT, KNN_TEXT_SCORES])
def test_a_graph_file_that_cannot_be_read_stops_that_space_only(plain_set, name):
    (plain_set / name).write_bytes(b"\x93NUMPY broken")
    reseal(plain_set)
    violations = _violations(plain_set)
    assert len(violations) == 1 and violations[0].startswith(f"{name}: unreadable .npy: "), \
        violations
    facts = _facts(plain_set)
    assert not any(f.startswith("knn_text.npy: 40 of 40") for f in facts), facts
    assert any(f.startswith("knn_fused.npy: 40 of 40") for f in facts), facts
