"""verify_outputs and `item-embeddings verify` on generated output sets, good and broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_output_set
from item_embeddings.ops.cli import main
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    TXT_ARRAY,
    TXT_META,
)
from item_embeddings.publish import publish_outputs
from item_embeddings.verify import verify_outputs


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
