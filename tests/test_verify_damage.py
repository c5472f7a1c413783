"""`item-embeddings verify` on real output sets (the core steps on tiny data), damaged every way
issue #16 lists: each damage is refused with a message naming it, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (
    catalogue,
    exact_knn,
    refused,
    reseal,
    verify_cli,
    write_items,
    write_knn,
    write_report,
)
from image_server import ImageServer, make_images
from item_embeddings.config import PipelineParams
from item_embeddings.fusion import fuse_item_embeddings
from item_embeddings.image import embed_items_images, load_image_encoder
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    FUSION_EXCLUSIONS,
    FUSION_WEIGHTS,
    GROUPS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    META_FILES,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.publish import publish_outputs
from item_embeddings.storage import place_files
from item_embeddings.text import embed_items_text, load_text_encoder

N = 24
K = 4
GOOD_IMAGES = ["rgb.jpg", "photo.webp", "palette.png", "grey.jpg", "rgba.png", "anim.gif"]


def _image_url(srv: ImageServer, i: int) -> str | None:
    if i % 4 == 0:
        return None                                   # no URL: not attempted
    if i % 7 == 3:
        return srv.url("img/missing.png")             # 404: a recorded failure
    return srv.url(f"img/{GOOD_IMAGES[i % len(GOOD_IMAGES)]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Two runs (``run-a``, ``run-b``) of the real text, image and fusion steps on the same
    items, each placed flat like ``run-local`` does, plus exact kNN graphs and the QA report."""
    root = tmp_path_factory.mktemp("real-sets")
    config, checkpoint, _ = tiny_model
    params = PipelineParams(image_model=str(config), image_pretrained=str(checkpoint),
                            image_batch_size=8, shard_size=8, download_retries=0,
                            allow_private_hosts=True, fusion_epochs=1, seed=0)
    text_encoder = load_text_encoder(batch_size=16)
    image_encoder = load_image_encoder(str(config), str(checkpoint))
    sets = {}
    with ImageServer(make_images()) as srv:
        columns = catalogue(N)
        columns["image_url"] = [_image_url(srv, i) for i in range(N)]
        items = str(write_items(root / "items.parquet", columns))
        for run_id in ("run-a", "run-b"):
            steps = root / run_id
            embed_items_text(items, steps / "text", params, run_id=run_id, encoder=text_encoder)
            embed_items_images(items, steps / "image", params, run_id=run_id,
                               encoder=image_encoder)
            fuse_item_embeddings(steps / "text", steps / "image", steps / "fusion", params,
                                 run_id=run_id)
            flat = steps / "set"
            for step in ("text", "image", "fusion"):
                place_files(sorted(p for p in (steps / step).iterdir() if p.is_file()), flat,
                            META_FILES)
            sets[run_id] = write_report(write_knn(flat, k=K, run_id=run_id), run_id=run_id)
    return sets


@pytest.fixture
def damaged(runs, tmp_path) -> Path:
    """A private copy of run-a's set to damage."""
    return Path(shutil.copytree(runs["run-a"], tmp_path / "set"))


def _delete(root: Path, *names: str) -> None:
    for name in names:
        (root / name).unlink()


def _group(name: str) -> list[str]:
    arr, ids, meta, extra = GROUPS[name]
    return [arr, ids, meta, *extra]


def _swap_rows(path: Path, a: int = 0, b: int = 1) -> None:
    arr = np.load(path)
    arr[[a, b]] = arr[[b, a]]
    np.save(path, arr)


def _edit_table(path: Path, column: str, change) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    new = change(values)
    array = new if isinstance(new, (pa.Array, pa.ChunkedArray)) else pa.array(
        new, table.schema.field(column).type)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, array), path)


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- clean sets

def test_real_sets_pass_with_hashes_and_run_links(runs, tmp_path, capsys):
    for root in runs.values():
        rc, out = verify_cli(root, capsys)
        assert rc == 0 and "all checks passed" in out, out
    meta = json.loads((runs["run-a"] / TXT_META).read_text())
    assert set(meta["files"]) == {TXT_ARRAY, TXT_ITEMS}
    fusion = json.loads((runs["run-a"] / FUSION_CONFIG).read_text())
    assert set(fusion["files"]) == {FUSED_ARRAY, FUSED_ITEMS, FUSION_EXCLUSIONS,
                                    FUSION_WEIGHTS}
    assert (fusion["text_run_id"], fusion["image_run_id"]) == ("run-a", "run-a")
    img = json.loads((runs["run-a"] / IMG_META).read_text())
    assert img["count"] > 0 and img["failed_count"] > 0 and img["no_url_count"] > 0
    published = tmp_path / "published"
    publish_outputs([runs["run-a"]], str(published), run_id="run-a")
    rc, out = verify_cli(published, capsys)
    assert rc == 0, out


# ----------------------------------------------------------------------------- missing groups

@pytest.mark.parametrize("removed", [("image",), ("fusion",), ("image", "fusion")])
def test_missing_groups_are_refused(damaged, capsys, removed):
    for group in removed:
        _delete(damaged, *(n for n in _group(group) if (damaged / n).exists()))
    refused(damaged, capsys, *(f"{group} outputs missing" for group in removed))


def test_text_only_folder_of_a_killed_run_is_refused(runs, tmp_path, capsys):
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in _group("text")[:3]:
        shutil.copyfile(runs["run-a"] / name, killed / name)
    refused(killed, capsys, "image outputs missing", "fusion outputs missing")


def test_partial_knn_group_is_refused(damaged, capsys):
    _delete(damaged, KNN_FUSED_SCORES)
    refused(damaged, capsys, "knn outputs incomplete: missing ['knn_fused_scores.npy']")


# ----------------------------------------------------------------------------- alignment

@pytest.mark.parametrize("name,meta", [(TXT_ARRAY, TXT_META), (IMG_ARRAY, IMG_META),
                                       (FUSED_ARRAY, FUSION_CONFIG),
                                       (KNN_TEXT, KNN_META),
                                       (KNN_FUSED_SCORES, KNN_META)])
def test_swapped_rows_are_refused(damaged, capsys, name, meta):
    _swap_rows(damaged / name)
    refused(damaged, capsys, f"{name}: content does not match {meta}")


def test_swapped_image_rows_of_two_ids_are_refused(damaged, capsys):
    _edit_table(damaged / IMG_ITEMS, "row",
                lambda rows: [rows[1], rows[0], *rows[2:]])
    refused(damaged, capsys, "img_items.parquet: content does not match img_meta.json")


@pytest.mark.parametrize("group,meta,key", [("text", TXT_META, "text_run_id"),
                                            ("image", IMG_META, "image_run_id")])
def test_groups_of_two_runs_are_refused(runs, damaged, capsys, group, meta, key):
    """The other run's files are intact and hold the same items: only the run ids tell."""
    for name in _group(group):
        if (runs["run-b"] / name).exists():
            shutil.copyfile(runs["run-b"] / name, damaged / name)
    refused(damaged, capsys, f"fusion_config.json: {key} = 'run-a' but {meta} has run_id "
                             f"'run-b': groups of different runs")


def test_knn_graph_of_other_vectors_is_refused(damaged, capsys):
    """A graph built on other vectors (a different run, or rows moved before the build) is
    refused by its scores even when every hash matches."""
    txt = np.load(damaged / TXT_ARRAY)
    idx, scores = exact_knn(txt[::-1].copy(), K)
    np.save(damaged / KNN_TEXT, idx)
    np.save(damaged / KNN_TEXT_SCORES, scores)
    reseal(damaged)
    refused(damaged, capsys, "knn_text_scores.npy: ", "whose scores are not the cosine of the "
                                                      "txt.npy rows they link")


def test_meta_without_hashes_is_refused(damaged, capsys):
    meta = json.loads((damaged / IMG_META).read_text())
    del meta["files"]
    (damaged / IMG_META).write_text(json.dumps(meta))
    files = json.loads((damaged / TXT_META).read_text())["files"]
    del files[TXT_ARRAY]
    _edit_meta(damaged / TXT_META, files=files)
    refused(damaged, capsys, "img_meta.json: no 'files' record",
            "txt_meta.json: 'files' records no hash of ['txt.npy']")


def test_listed_file_missing_and_no_run_id(damaged, capsys):
    _delete(damaged, FUSION_WEIGHTS)
    _edit_meta(damaged / TXT_META, run_id="")
    refused(damaged, capsys, "fusion_config.json lists fusion_model.safetensors but it is missing",
            "txt_meta.json: no run_id")


# ----------------------------------------------------------------------------- content checks
# Each file is resealed (its new hash recorded, as if the step itself had written it), so the
# content check alone must catch the damage.

def test_string_row_column_is_a_violation_not_a_traceback(damaged, capsys):
    _edit_table(damaged / IMG_ITEMS, "row",
                lambda rows: pa.array([str(r) for r in rows]))
    reseal(damaged)
    refused(damaged, capsys,
            "img_items.parquet: column 'row' has type string, expected an integer type")


@pytest.mark.parametrize("name,column,change,message", [
    (TXT_ITEMS, "id", lambda v: pa.array([float(i) for i, _ in enumerate(v)]),
     "txt_items.parquet: column 'id' has type double, expected string or integer ids"),
    (FUSED_ITEMS, "has_image", lambda v: pa.array([int(h) for h in v]),
     "fused_items.parquet: column 'has_image' has type int64, expected bool"),
    (IMG_FAILURES, "http_status", lambda v: pa.array([str(s) for s in v]),
     "img_failures.parquet: column 'http_status' has type string, expected an integer type"),
    (FUSED_ITEMS, "has_image", lambda v: [None, *v[1:]],
     "fused_items.parquet: 1 null has_image value(s)"),
    (IMG_ITEMS, "id", lambda v: pa.array(list(range(len(v)))),
     "img_items.parquet: ids are int64 but txt_items.parquet ids are string: they cannot join"),
])
def test_wrong_column_types_are_violations(damaged, capsys, name, column, change, message):
    _edit_table(damaged / name, column, change)
    reseal(damaged)
    refused(damaged, capsys, message)


def test_two_ids_on_one_image_row_are_refused(damaged, capsys):
    _edit_table(damaged / IMG_ITEMS, "row", lambda rows: [rows[1], *rows[1:]])
    reseal(damaged)
    refused(damaged, capsys, "img_items.parquet: several ids point at the same img.npy row")


def test_unknown_image_id_is_refused(damaged, capsys):
    _edit_table(damaged / IMG_ITEMS, "id", lambda ids: ["not-an-item", *ids[1:]])
    reseal(damaged)
    refused(damaged, capsys, "img_items.parquet: 1 id(s) not in txt_items.parquet, "
                             "e.g. ['not-an-item']")


def test_duplicate_text_id_is_refused(damaged, capsys):
    _edit_table(damaged / TXT_ITEMS, "id", lambda ids: [ids[1], *ids[1:]])
    reseal(damaged)
    refused(damaged, capsys, "txt_items.parquet: 1 duplicated id(s)")


@pytest.mark.parametrize("meta,real", [(TXT_META, 384), (IMG_META, 32)])
def test_wrong_embed_dim_in_meta_is_refused(damaged, capsys, meta, real):
    _edit_meta(damaged / meta, embed_dim=real * 2)
    refused(damaged, capsys, f"{meta}: embed_dim = {real * 2} but the data says {real}")


# ----------------------------------------------------------------------------- kNN content

def _knn_damage(damaged: Path, change) -> None:
    idx = np.load(damaged / KNN_FUSED)
    scores = np.load(damaged / KNN_FUSED_SCORES)
    change(idx, scores)
    np.save(damaged / KNN_FUSED, idx)
    np.save(damaged / KNN_FUSED_SCORES, scores)
    reseal(damaged)


def _self_neighbour(idx, scores):
    idx[3, 0] = 3
    scores[3, 0] = 1.0


def _repeat(idx, scores):
    idx[4, 1], scores[4, 1] = idx[4, 0], scores[4, 0]


def _unsorted(idx, scores):
    idx[5, :2], scores[5, :2] = idx[5, 1::-1].copy(), scores[5, 1::-1].copy()


@pytest.mark.parametrize("change,message", [
    (lambda i, s: i.__setitem__((2, 1), N), f"knn_fused.npy: 1 row(s) (rows [2]) with neighbour "
                                            f"indices outside [0, {N})"),
    (_self_neighbour, "knn_fused.npy: 1 row(s) (rows [3]) listing the item itself"),
    (_repeat, "knn_fused.npy: 1 row(s) (rows [4]) listing a neighbour twice"),
    (_unsorted, "knn_fused_scores.npy: 1 row(s) (rows [5]) not sorted most similar first"),
    (lambda i, s: s.__setitem__((6, slice(None)), 1.5),
     "knn_fused_scores.npy: 1 row(s) (rows [6]) with scores outside [-1, 1]"),
    (lambda i, s: s.__setitem__((7, K - 1), np.nan),
     "knn_fused_scores.npy: 1 row(s) (rows [7]) with NaN/Inf scores"),
])
def test_knn_graph_damage_is_refused(damaged, capsys, change, message):
    _knn_damage(damaged, change)
    refused(damaged, capsys, message)


def test_knn_shape_dtype_and_meta_must_agree(damaged, capsys):
    idx = np.load(damaged / KNN_TEXT)
    np.save(damaged / KNN_TEXT, idx[:, :-1].astype(np.int64))
    meta = json.loads((damaged / KNN_META).read_text())
    meta["count"] = N + 1
    meta["spaces"]["fused"]["dim"] = 64
    (damaged / KNN_META).write_text(json.dumps(meta))
    reseal(damaged)
    refused(damaged, capsys, "knn_text.npy: expected int32, got int64",
            f"knn_text.npy: shape [{N}, {K - 1}], expected [{N}, {K}]",
            f"knn_meta.json: count = {N + 1} but the data says {N}",
            "knn_meta.json: spaces.fused.dim = 64 but fused.npy has 128 columns")


def test_unreadable_meta_values_are_violations(damaged, capsys):
    _edit_meta(damaged / KNN_META, k="four", spaces=[])
    _edit_meta(damaged / IMG_META, files=[IMG_ARRAY])
    refused(damaged, capsys, "knn_meta.json: k = 'four' is not a positive integer",
            "knn_meta.json: 'spaces' must describe ['fused', 'text']",
            "img_meta.json: 'files' is not a mapping of file name to size and sha256")
