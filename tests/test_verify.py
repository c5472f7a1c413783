"""verify_outputs and `item-embeddings verify` on generated output sets, good and broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from item_embeddings.ops.cli import main
from item_embeddings.publish import publish_outputs
from item_embeddings.step import step_run
from item_embeddings.storage import file_record
from item_embeddings.verify import KNN_SPACES, verify_outputs


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_output_set(root: Path, n: int = 40, with_images: bool = True, seed: int = 0,
                    run_id: str = "run-1") -> Path:
    """A consistent output set in the documented layout (docs/outputs.md), each group written
    through the step skeleton (``step_run``), so its meta file records run id and file hashes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"B{i:05d}" for i in range(n)]
    with step_run("embed-text", root, params={}, artifact="text", run_id=run_id) as run:
        np.save(root / "txt.npy", _unit(rng, n, 384))
        pq.write_table(pa.table({"id": ids}), root / "txt_items.parquet")
        run.finish("txt_meta.json", {"count": n, "embed_dim": 384,
                                     "encoder_name": "all-MiniLM-L6-v2"}, metrics={})
    if not with_images:
        return root
    # Every 3rd item has no URL, every 5th download failed, the rest have an image.
    no_url = [i for i in ids if int(i[1:]) % 3 == 0]
    failed = [i for i in ids if i not in no_url and int(i[1:]) % 5 == 0]
    good = [i for i in ids if i not in no_url and i not in failed]
    with step_run("embed-image", root, params={}, artifact="image", run_id=run_id) as run:
        order = rng.permutation(len(good))  # img.npy rows need not follow id order
        np.save(root / "img.npy", _unit(rng, len(good), 512))
        pq.write_table(pa.table({"id": good, "url": [f"http://img/{i}.jpg" for i in good],
                                 "row": order.astype(np.int64)}), root / "img_items.parquet")
        pq.write_table(pa.table({
            "id": failed, "url": [f"http://img/{i}.jpg" for i in failed],
            "reason": ["http_status"] * (len(failed) - 1) + ["timeout"],
            "detail": ["HTTP 404"] * (len(failed) - 1) + ["no response in 5 s"],
            "http_status": pa.array([404] * (len(failed) - 1) + [None], pa.int32()),
            "attempts": [1] * (len(failed) - 1) + [3]}), root / "img_failures.parquet")
        run.finish("img_meta.json", {
            "count": len(good), "failed_count": len(failed), "embed_dim": 512,
            "attempted_count": len(good) + len(failed), "no_url_count": len(no_url),
            "failures_by_reason": {"http_status": len(failed) - 1, "timeout": 1}}, metrics={})
    with step_run("fuse-modal", root, params={}, artifact="fused", run_id=run_id) as run:
        np.save(root / "fused.npy", _unit(rng, n, 128))
        # The fusion step may exclude an unusable image vector: that item is fused without image.
        excluded = good[:1]
        pq.write_table(pa.table({"id": ids, "has_image": [i in good and i not in excluded
                                                          for i in ids]}),
                       root / "fused_items.parquet")
        pq.write_table(pa.table({"id": excluded, "reason": ["non-finite or zero image vector"]}),
                       root / "fusion_exclusions.parquet")
        (root / "fusion_model.safetensors").write_bytes(b"\x08" * 64)
        run.finish("fusion_config.json", {
            "count": n, "items_with_images": len(good) - 1, "output_dim": 128, "hidden_dim": 256,
            "text_run_id": run_id, "image_run_id": run_id}, metrics={})
    return root


def exact_knn(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force neighbours by cosine, most similar first, the row itself left out."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k].astype(np.int32)
    return idx, np.take_along_axis(sims, idx, axis=1).astype(np.float32)


def write_knn(root: Path, k: int = 5, run_id: str = "run-1") -> Path:
    """The kNN graph files of the set in ``root`` (exact search), through the step skeleton."""
    spaces = {}
    with step_run("knn", root, params={}, artifact="knn", run_id=run_id) as run:
        for space, (idx_name, score_name, source) in KNN_SPACES.items():
            vectors = np.load(root / source)
            idx, scores = exact_knn(vectors, k)
            np.save(root / idx_name, idx)
            np.save(root / score_name, scores)
            spaces[space] = {"dim": vectors.shape[1], "method": "exact", "index_params": {},
                             "build_time_sec": 0.0, "query_time_sec": 0.0, "recall_at_k": 1.0,
                             "recall_queries": 0}
        run.finish("knn_meta.json", {"k": k, "count": len(idx), "spaces": spaces}, metrics={})
    return root


def reseal(root: Path) -> None:
    """Record the current hashes in every meta file, as if the step itself had written the
    damaged files: what is left to catch the damage is the content checks."""
    for meta_path in root.glob("*.json"):
        meta = json.loads(meta_path.read_text())
        if isinstance(meta.get("files"), dict):
            meta["files"] = {name: file_record(root / name) for name in meta["files"]}
            meta_path.write_text(json.dumps(meta))


@pytest.fixture
def good_set(tmp_path) -> Path:
    return make_output_set(tmp_path / "out")


def test_consistent_set_passes(good_set, capsys):
    report = verify_outputs(str(good_set))
    assert report.ok, report.violations
    text = report.format()
    for expected in ("txt.npy: shape [40, 384], dtype float32", "img.npy: shape [21, 512]",
                     "items with images: 21", "failed downloads: 5", "http_status: ", "timeout: 1", "fused items: 40",
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
    arr = np.load(good_set / "txt.npy")
    np.save(good_set / "txt.npy", arr[:-3])
    _expect(good_set, "txt.npy has 37 rows but txt_items.parquet has 40 ids",
            "txt_meta.json: count = 40 but the data says 37")
    assert main(["verify", str(good_set)]) == 1
    err = capsys.readouterr()
    assert "VIOLATION: txt.npy has 37 rows" in err.out + err.err


def test_file_cut_short_fails_without_crash(good_set):
    data = (good_set / "img.npy").read_bytes()
    (good_set / "img.npy").write_bytes(data[: len(data) // 2])
    _expect(good_set, "img.npy: unreadable .npy")


def test_shuffled_fused_ids_fail(good_set):
    table = pq.read_table(good_set / "fused_items.parquet")
    perm = np.random.default_rng(1).permutation(table.num_rows)
    pq.write_table(table.take(pa.array(perm)), good_set / "fused_items.parquet")
    _expect(good_set, "fused_items.parquet ids are not in txt_items.parquet order")


def test_nan_row_fails(good_set):
    arr = np.load(good_set / "fused.npy")
    arr[7, 3] = np.nan
    np.save(good_set / "fused.npy", arr)
    _expect(good_set, "fused.npy: 1 row(s) with NaN/Inf (rows [7])")


def test_non_unit_rows_and_dtype(good_set):
    arr = np.load(good_set / "txt.npy").astype(np.float64)
    arr[2] *= 2
    np.save(good_set / "txt.npy", arr)
    _expect(good_set, "txt.npy: expected float32, got float64",
            "txt.npy: 1 row(s) not unit-norm")


def test_image_invariants(good_set):
    items = pq.read_table(good_set / "img_items.parquet").to_pydict()
    failures = pq.read_table(good_set / "img_failures.parquet")
    items["row"][0] = 999  # out of range
    items["id"][1] = failures.column("id")[0].as_py()  # id both embedded and failed
    pq.write_table(pa.table(items), good_set / "img_items.parquet")
    _expect(good_set, "row index(es) outside img.npy", "both in img_items.parquet and "
            "img_failures.parquet", "has_image disagrees")


def test_excluded_image_must_not_count_as_image(good_set):
    fused = pq.read_table(good_set / "fused_items.parquet").to_pydict()
    fused["has_image"] = [i in pq.read_table(good_set / "img_items.parquet").column("id")
                          .to_pylist() for i in fused["id"]]
    pq.write_table(pa.table(fused), good_set / "fused_items.parquet")
    _expect(good_set, "has_image disagrees with img_items.parquet / fusion_exclusions.parquet "
            "for 1 id(s)", "fusion_config.json: items_with_images = 20 but the data says 21")


def test_failure_reasons_must_match_meta(good_set):
    meta = json.loads((good_set / "img_meta.json").read_text())
    meta["failures_by_reason"] = {"http_status": 5}
    (good_set / "img_meta.json").write_text(json.dumps(meta))
    _expect(good_set, "img_meta.json: failures_by_reason")


def test_meta_mismatch_and_missing_fused_item(good_set):
    meta = json.loads((good_set / "img_meta.json").read_text())
    meta["failed_count"] += 1
    (good_set / "img_meta.json").write_text(json.dumps(meta))
    table = pq.read_table(good_set / "fused_items.parquet")
    pq.write_table(table.slice(0, 39), good_set / "fused_items.parquet")
    _expect(good_set, "img_meta.json: failed_count", "fused_items.parquet does not cover the "
            "text items: 1 text id(s) missing", "fused.npy has 40 rows but fused_items.parquet "
            "has 39 ids")


def test_incomplete_group_and_not_a_set(good_set, tmp_path):
    (good_set / "img_failures.parquet").unlink()
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
    arr = np.load(files / "fused.npy")
    arr[0] = -arr[0]  # same size, still unit norm: only the hash can tell
    np.save(files / "fused.npy", arr)
    (files / "txt_meta.json").unlink()
    _expect(published, "fused.npy: content does not match manifest.json",
            "fused.npy: content does not match fusion_config.json",
            "manifest.json lists txt_meta.json but it is missing")
    shutil.rmtree(good_set)


def test_recorded_size_is_checked_before_hashing(good_set):
    size = (good_set / "fused_items.parquet").stat().st_size
    with open(good_set / "fused_items.parquet", "ab") as fh:
        fh.write(b"\0")
    _expect(good_set, f"fused_items.parquet: content does not match fusion_config.json "
                      f"(size {size + 1}, recorded {size})")
