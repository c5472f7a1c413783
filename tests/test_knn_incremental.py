"""Incremental kNN graphs (issue #23): with ``previous_uri`` the kNN step updates the previous
set's graphs; on the exact path the result is a full rebuild's, on the IVF path its recall is.

Core level: ``build_knn_graphs`` on generated step outputs (the kfp.local nightly run in
test_pipeline_local.py covers the pipeline parameter).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from item_embeddings.config import PipelineParams
from item_embeddings.incremental import PreviousSetError
from item_embeddings.knn import build_knn_graphs, exact_knn, recall_at_k, unit_rows
from item_embeddings.knn import graph as knn_graph
from item_embeddings.knn.incremental import RESERVE, match_rows, rows_by_id
from item_embeddings.knn.state import IvfState, SpaceState, content_digests, row_digests
from item_embeddings.knn.synthetic import clustered_unit_vectors
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_ITEMS,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    KNN_TEXT_STATE,
    TXT_ARRAY,
    TXT_ITEMS,
)
from item_embeddings.storage import write_parquet_atomic
from item_embeddings.tracking import LocalTracker, list_local_runs

K = 10
GRAPHS = {"text": (KNN_TEXT, KNN_TEXT_SCORES), "fused": (KNN_FUSED, KNN_FUSED_SCORES)}


class Catalogue:
    """Items with a text and a fused vector and content keys; a night is a copy with edits."""

    def __init__(self, n: int, seed: int = 0, spare: int = 400, text_dim: int = 24,
                 fused_dim: int = 8):
        self.pool_text = clustered_unit_vectors(n + spare, text_dim, topics=6, seed=seed)
        self.pool_fused = clustered_unit_vectors(n + spare, fused_dim, topics=6, seed=seed + 1)
        self.next_spare = n
        self.ids = [f"item{i:05d}" for i in range(n)]
        self.text = self.pool_text[:n].copy()
        self.fused = self.pool_fused[:n].copy()
        self.keys = [f"{hash(('k', i)) & (2 ** 64 - 1):016x}{i:016x}" for i in range(n)]
        self.weights = "weights-1"

    def _spare(self) -> int:
        self.next_spare += 1
        return self.next_spare - 1

    def change(self, rows) -> None:
        """New text (and so new fused) vectors and keys for ``rows``."""
        for row in rows:
            spare = self._spare()
            self.text[row], self.fused[row] = self.pool_text[spare], self.pool_fused[spare]
            self.keys[row] = f"{spare:032x}"

    def delete(self, rows) -> None:
        keep = np.setdiff1d(np.arange(len(self.ids)), rows)
        self.ids = [self.ids[i] for i in keep]
        self.keys = [self.keys[i] for i in keep]
        self.text, self.fused = self.text[keep], self.fused[keep]

    def insert(self, at: int, count: int) -> None:
        rows = [self._spare() for _ in range(count)]
        self.ids[at:at] = [f"new{r:05d}" for r in rows]
        self.keys[at:at] = [f"{r:032x}" for r in rows]
        self.text = np.insert(self.text, at, self.pool_text[rows], axis=0)
        self.fused = np.insert(self.fused, at, self.pool_fused[rows], axis=0)

    def write(self, folder: Path) -> Path:
        """The text and fusion steps' files the kNN step reads, in one folder."""
        folder.mkdir(parents=True)
        np.save(folder / TXT_ARRAY, self.text.astype(np.float32))
        np.save(folder / FUSED_ARRAY, self.fused.astype(np.float32))
        write_parquet_atomic(folder / TXT_ITEMS, pa.table({"id": self.ids, "key": self.keys}))
        write_parquet_atomic(folder / FUSED_ITEMS, pa.table({
            "id": self.ids, "has_image": [False] * len(self.ids), "text_key": self.keys,
            "image_key": pa.nulls(len(self.ids), pa.string())}))
        (folder / FUSION_CONFIG).write_text(json.dumps({
            "run_id": "fusion-run", "fusion_mode": "apply", "weights_sha256": self.weights}))
        return folder


def run_knn(inputs: Path, out: Path, previous: Path | None = None, tracker=None, device=None,
            **params) -> dict:
    settings = PipelineParams(**{"knn_k": K, "knn_recall_queries": 200,
                                 "previous_uri": str(previous) if previous else "", **params})
    return build_knn_graphs(inputs, inputs, out, settings, tracker=tracker, device=device)


def assert_same_graphs(a: Path, b: Path) -> None:
    for space, (ids_file, scores_file) in GRAPHS.items():
        np.testing.assert_array_equal(np.load(a / ids_file), np.load(b / ids_file), err_msg=space)
        np.testing.assert_allclose(np.load(a / scores_file), np.load(b / scores_file), atol=1e-6)


def check_counts(meta: dict, n: int) -> None:
    for space, info in meta["spaces"].items():
        assert info["recomputed_count"] + info["reused_count"] == n, space


@pytest.fixture()
def night_one(tmp_path):
    """A 600-item catalogue and its graphs (exact), as the previous set."""
    cat = Catalogue(600)
    meta = run_knn(cat.write(tmp_path / "a"), tmp_path / "knn-a")
    assert {s["update"] for s in meta["spaces"].values()} == {"full"}
    return cat, tmp_path / "knn-a"


def test_exact_update_equals_a_full_rebuild(night_one, tmp_path):
    cat, previous = night_one
    cat.change([3, 50, 51, 400])
    cat.delete([7, 8, 120, 599])
    cat.insert(10, 3)            # new items inside the table: later rows move, order is kept
    cat.insert(len(cat.ids), 2)
    inputs = cat.write(tmp_path / "b")
    meta = run_knn(inputs, tmp_path / "inc", previous)
    run_knn(inputs, tmp_path / "full")
    assert_same_graphs(tmp_path / "inc", tmp_path / "full")
    n = len(cat.ids)
    check_counts(meta, n)
    for info in meta["spaces"].values():
        done = info["incremental"]
        assert info["update"] == "incremental" and info["rebuild_reason"] is None
        assert (done["changed_count"], done["deleted_count"]) == (4 + 5, 4)
        assert done["searched_count"] >= 9 and done["completed_from_reserve_count"] > 0
        assert 0 < info["reused_count"] < n - 9
        assert info["recall_at_k"] == 1.0
    assert pq.read_table(tmp_path / "inc" / KNN_ITEMS).column("id").to_pylist() == cat.ids
    # the experiment-run metrics and the files the meta pins
    assert set(meta["files"]) >= {KNN_ITEMS, KNN_TEXT_STATE, KNN_TEXT, KNN_FUSED_SCORES}


def test_successive_nights_stay_equal_when_reserves_run_out(night_one, tmp_path):
    """Three updates in a row, one deleting a row's 9 nearest neighbours (more than its
    reserve of 8 can replace): that row is searched again, and every night equals a rebuild."""
    cat, previous = night_one
    rng = np.random.default_rng(3)
    for night in range(3):
        if night == 1:
            x = unit_rows(cat.text, K)
            nearest, _ = exact_knn(x, K, queries=np.array([42]))
            cat.delete(nearest[0, :9])
        else:
            cat.change(rng.choice(len(cat.ids), 12, replace=False))
            cat.delete(rng.choice(len(cat.ids), 6, replace=False))
        inputs = cat.write(tmp_path / f"in{night}")
        meta = run_knn(inputs, tmp_path / f"inc{night}", previous)
        run_knn(inputs, tmp_path / f"full{night}")
        assert_same_graphs(tmp_path / f"inc{night}", tmp_path / f"full{night}")
        check_counts(meta, len(cat.ids))
        assert {s["update"] for s in meta["spaces"].values()} == {"incremental"}
        if night == 1:
            assert meta["spaces"]["text"]["incremental"]["reserve_exhausted_count"] >= 1
        previous = tmp_path / f"inc{night}"


def test_ties_among_duplicate_items_follow_the_full_rebuild(tmp_path):
    """Vectors whose dot products are exact in float32 (many equal scores): the update keeps
    the smaller row first and breaks ties at the k-th place as a rebuild does."""
    base = np.zeros((6, 8), dtype=np.float32)
    for row, cols in enumerate([(0, 1, 2, 3), (0, 1, 2, 4), (0, 1, 5, 6), (4, 5, 6, 7),
                                (1, 3, 5, 7), (0, 2, 4, 6)]):
        base[row, list(cols)] = 0.5
    cat = Catalogue(90)
    pick = np.random.default_rng(0).integers(0, 6, 90 + 400)
    cat.pool_text = cat.pool_fused = base[pick]
    cat.text, cat.fused = cat.pool_text[:90].copy(), cat.pool_fused[:90].copy()
    run_knn(cat.write(tmp_path / "a"), tmp_path / "knn-a")
    cat.change([5, 6, 60])
    cat.delete([0, 33])
    cat.insert(40, 2)
    inputs = cat.write(tmp_path / "b")
    meta = run_knn(inputs, tmp_path / "inc", tmp_path / "knn-a")
    run_knn(inputs, tmp_path / "full")
    assert meta["spaces"]["text"]["update"] == "incremental"
    for ids_file, scores_file in GRAPHS.values():
        np.testing.assert_array_equal(np.load(tmp_path / "inc" / ids_file),
                                      np.load(tmp_path / "full" / ids_file))
        np.testing.assert_array_equal(np.load(tmp_path / "inc" / scores_file),
                                      np.load(tmp_path / "full" / scores_file))


def test_ivf_update_matches_the_full_rebuilds_recall(tmp_path):
    cat = Catalogue(20000, spare=600, text_dim=32, fused_dim=16)
    ivf = dict(knn_exact_max_items=0)
    first = run_knn(cat.write(tmp_path / "a"), tmp_path / "knn-a", **ivf)
    rng = np.random.default_rng(1)
    cat.change(rng.choice(20000, 200, replace=False))
    cat.delete(rng.choice(20000, 100, replace=False))
    cat.insert(5000, 100)
    inputs = cat.write(tmp_path / "b")
    meta = run_knn(inputs, tmp_path / "inc", tmp_path / "knn-a", **ivf)
    run_knn(inputs, tmp_path / "full", **ivf)
    check_counts(meta, 20000)
    sample = np.sort(rng.choice(20000, 2000, replace=False))
    for space, (ids_file, _) in GRAPHS.items():
        info = meta["spaces"][space]
        assert (info["method"], info["update"]) == ("ivf-flat", "incremental")
        assert info["index_params"]["nprobe"] == first["spaces"][space]["index_params"]["nprobe"]
        assert info["incremental"]["reverse_nprobe"] == 2 * info["incremental"]["nprobe"]
        assert info["recomputed_count"] < 20000 // 2
        x = unit_rows((cat.text if space == "text" else cat.fused).astype(np.float32), K)
        _, exact = exact_knn(x, K, queries=sample)
        updated = recall_at_k(x, np.load(tmp_path / "inc" / ids_file), sample, exact)
        rebuilt = recall_at_k(x, np.load(tmp_path / "full" / ids_file), sample, exact)
        assert updated >= rebuilt - 0.01, (space, updated, rebuilt)
        assert info["recall_at_k"] > 0.9


def test_a_retrained_fusion_model_rebuilds_the_fused_graph(night_one, tmp_path, caplog):
    cat, previous = night_one
    cat.fused = clustered_unit_vectors(len(cat.ids), 8, topics=6, seed=9)  # a new model's codes
    cat.weights = "weights-2"
    inputs = cat.write(tmp_path / "b")
    with caplog.at_level("INFO", logger="item_embeddings"):
        meta = run_knn(inputs, tmp_path / "inc", previous)
    fused, text = meta["spaces"]["fused"], meta["spaces"]["text"]
    assert fused["update"] == "full" and "retrained" in fused["rebuild_reason"]
    assert (fused["recomputed_count"], fused["reused_count"]) == (600, 0)
    assert "fused vectors: kNN graph built in full: the fusion model is not the previous" \
        in caplog.text
    # nothing changed in the text space: every row reused
    assert (text["update"], text["recomputed_count"], text["reused_count"]) == \
        ("incremental", 0, 600)
    # drift: the same items (content unchanged), their fused neighbours moved
    assert text["drift"]["items"] == fused["drift"]["items"] == 600
    assert text["drift"]["mean_overlap"] == 1.0 and text["drift"]["identical_share"] == 1.0
    assert fused["drift"]["mean_overlap"] < 0.5


def test_above_the_threshold_a_full_rebuild_is_cheaper(night_one, tmp_path):
    cat, previous = night_one
    cat.change(range(0, 600, 2))
    meta = run_knn(cat.write(tmp_path / "b"), tmp_path / "out", previous)
    for info in meta["spaces"].values():
        assert info["update"] == "full" and "a full rebuild is cheaper" in info["rebuild_reason"]
        assert info["reused_count"] == 0


def test_settings_or_order_that_change_the_graph_rebuild(night_one, tmp_path):
    cat, previous = night_one
    inputs = cat.write(tmp_path / "same")
    meta = run_knn(inputs, tmp_path / "k", previous, knn_k=K + 1)
    assert "k is 11 now and was 10" in meta["spaces"]["text"]["rebuild_reason"]
    meta = run_knn(inputs, tmp_path / "ivf", previous, knn_exact_max_items=100)
    assert "the graph is ivf-flat now and was exact" in meta["spaces"]["fused"]["rebuild_reason"]
    order = np.random.default_rng(0).permutation(len(cat.ids))
    cat.ids = [cat.ids[i] for i in order]
    cat.keys = [cat.keys[i] for i in order]
    cat.text, cat.fused = cat.text[order], cat.fused[order]
    inputs = cat.write(tmp_path / "shuffled")
    meta = run_knn(inputs, tmp_path / "reordered", previous)
    assert "relative order" in meta["spaces"]["text"]["rebuild_reason"]
    run_knn(inputs, tmp_path / "full")
    assert_same_graphs(tmp_path / "reordered", tmp_path / "full")


def test_a_previous_set_without_state_rebuilds_and_a_damaged_one_is_refused(night_one,
                                                                          tmp_path):
    cat, previous = night_one
    inputs = cat.write(tmp_path / "b")
    older = tmp_path / "older"
    shutil.copytree(previous, older)
    (older / KNN_TEXT_STATE).unlink()
    meta = run_knn(inputs, tmp_path / "out", older)
    assert {s["update"] for s in meta["spaces"].values()} == {"full"}
    assert "no kNN graphs with an update state" in meta["spaces"]["text"]["rebuild_reason"]
    assert "drift" not in meta["spaces"]["text"]
    damaged = tmp_path / "damaged"
    shutil.copytree(previous, damaged)
    graph = np.load(damaged / KNN_FUSED)
    graph[0, 0] = graph[0, 1]
    np.save(damaged / KNN_FUSED, graph)
    with pytest.raises(PreviousSetError, match="knn_fused.npy: content does not match"):
        run_knn(inputs, tmp_path / "refused", damaged)
    assert not (tmp_path / "refused" / KNN_META).exists()


def test_row_digests_tell_every_changed_row():
    x = clustered_unit_vectors(300, 16, seed=0)
    digests = row_digests(x)
    assert len(np.unique(digests)) == 300
    np.testing.assert_array_equal(row_digests(x.copy()), digests)
    changed = x.copy()
    changed[5, 3] = np.nextafter(changed[5, 3], 2)        # one bit of one value
    changed[9] = -changed[9]                               # every sign
    changed[11, [0, 1]] = changed[11, [1, 0]]              # two values swapped
    differ = np.flatnonzero(row_digests(changed) != digests)
    assert differ.tolist() == [5, 9, 11]
    odd = clustered_unit_vectors(50, 7, seed=1)
    assert row_digests(odd).shape == (50,) and len(np.unique(row_digests(odd))) == 50


def test_state_round_trip_and_row_matching(tmp_path):
    state = SpaceState(digests=np.arange(4, dtype=np.uint64),
                       reserve_neighbours=np.array([[1], [2], [3], [-1]], np.int32),
                       reserve_scores=np.array([[0.5], [0.4], [0.3], [-np.inf]], np.float32),
                       ivf=IvfState(centroids=np.eye(2, 3, dtype=np.float32),
                                    lists=np.array([0, 1, 1, 0], np.int32), nprobe=2))
    state.save(tmp_path / "s.npz")
    loaded = SpaceState.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.reserve_scores, state.reserve_scores)
    np.testing.assert_array_equal(loaded.ivf.lists, state.ivf.lists)
    assert loaded.ivf.nprobe == 2
    exact = SpaceState(state.digests, state.reserve_neighbours, state.reserve_scores, None)
    exact.save(tmp_path / "e.npz")
    assert SpaceState.load(tmp_path / "e.npz").ivf is None
    digests = np.array([10, 11, 12], np.uint64)
    by_id = rows_by_id(pa.array(["a", "b", "c"]), pa.array(["c", "x", "a"]))
    assert by_id.tolist() == [2, -1, 0]
    rows = match_rows(by_id, digests, np.array([12, 11, 99], np.uint64))
    assert rows.tolist() == [2, -1, -1]            # c unchanged, x new, a changed
    assert rows_by_id(pa.array([1, 2]), pa.array(["1", "2"])).tolist() == [-1, -1]
    assert RESERVE == 8


def test_content_digests_follow_the_keys():
    text = pa.array(["0123456789abcdef" * 2, None, "ffffffffffffffff" + "0" * 16, "abc"])
    image = pa.array([None, "aa", "1" * 32, None])
    digests = content_digests(text, image)
    assert digests[1] == 0 and (digests[[0, 2, 3]] % 2 == 1).all()
    moved = content_digests(text, pa.array([None, "aa", "2" * 32, None]))
    assert (moved == digests).tolist() == [True, True, False, True]
    sliced = content_digests(text.slice(2), image.slice(2))
    np.testing.assert_array_equal(sliced, digests[2:])


def test_a_machine_too_small_is_refused_before_any_work(night_one, tmp_path, monkeypatch):
    from item_embeddings.knn import memory

    cat, _ = night_one
    inputs = cat.write(tmp_path / "b")
    need = memory.step_peak_bytes(600, (24, 8), K, RESERVE, ivf=False)
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: int(need * 1.05))
    with pytest.raises(memory.KnnMemoryError, match=r"600 items .* need about .* GB of memory.*"
                                                    r"knn_machine_type"):
        run_knn(inputs, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: need * 2)
    assert run_knn(inputs, tmp_path / "fits")["count"] == 600
    # above knn_exact_max_items the IVF path's estimate is the one checked (a little more)
    need_ivf = memory.step_peak_bytes(600, (24, 8), K, RESERVE, ivf=True)
    assert need_ivf > need
    monkeypatch.setattr(memory, "machine_memory_bytes",
                        lambda: int(need_ivf * memory.HEADROOM) - 1)
    with pytest.raises(memory.KnnMemoryError, match=r"600 items .* need about"):
        run_knn(inputs, tmp_path / "refused-ivf", knn_exact_max_items=100)


def test_the_memory_model_at_catalogue_scale():
    from item_embeddings.knn.memory import check_memory, machine_memory_bytes, step_peak_bytes

    ten_million = step_peak_bytes(10_000_000, (384, 128), 20, RESERVE, ivf=True)
    assert 15.4e9 < ten_million < 40e9            # above the IVF index's own 384-d copy
    assert step_peak_bytes(10_000_000, (384, 128), 20, RESERVE, ivf=False) < ten_million
    with pytest.raises(Exception, match="10,000,000 items"):
        check_memory(10_000_000, (384, 128), 20, RESERVE, ivf=True, available=16 * 10 ** 9)
    assert check_memory(10_000_000, (384, 128), 20, RESERVE, ivf=True,
                        available=64 * 10 ** 9) == ten_million
    assert machine_memory_bytes() > 2 ** 30      # this machine's, from cgroup or /proc/meminfo


class _Files:
    """``Path`` for memory.py over a fixed set of files (the others cannot be read)."""

    files: dict[str, str] = {}

    def __init__(self, path: str):
        self.path = path

    def read_text(self) -> str:
        if self.path not in self.files:
            raise FileNotFoundError(self.path)
        return self.files[self.path]


@pytest.mark.parametrize("files,expected", [
    ({"/sys/fs/cgroup/memory.max": "8589934592\n",
      "/proc/meminfo": "MemTotal:       16384000 kB\nMemFree:  1 kB\n"}, 8589934592),
    ({"/sys/fs/cgroup/memory.max": "max\n",
      "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
      "/proc/meminfo": "MemFree:  1 kB\nMemTotal:       16384000 kB\n"}, 16384000 * 1024),
    ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": "4294967296\n",
      "/proc/meminfo": "MemTotal:       16384000 kB\n"}, 4294967296),
    ({"/sys/fs/cgroup/memory.max": "2147483648"}, 2147483648),
    ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
    ({}, None),
])
def test_the_memory_a_step_may_use_is_the_smallest_limit(monkeypatch, files, expected):
    """The cgroup limit (v2, or v1) when it is below the machine's memory; 'max' or v1's huge
    number is no limit; nothing readable: unknown, and the step is not refused."""
    from item_embeddings.knn import memory

    monkeypatch.setattr(_Files, "files", files)
    monkeypatch.setattr(memory, "Path", _Files)
    assert memory.machine_memory_bytes() == expected
    if expected is None:
        assert memory.check_memory(10 ** 9, (384,), 20, RESERVE, ivf=True) > 10 ** 12


def test_the_memory_refusal_names_the_estimate_and_the_machine():
    """What the step refuses with, word for word, for the IVF and exact paths and an update
    (which may turn into a full build: the larger of the two counts)."""
    from item_embeddings.knn.memory import KnnMemoryError, check_memory, step_peak_bytes

    fixed = 1000 * 2 ** 20
    ivf = step_peak_bytes(2_000_000, (128, 384), 20, 10, ivf=True)
    assert ivf == fixed + 2_000_000 * (4 * 384 + 24 + 24 * 30)
    exact = step_peak_bytes(2_000_000, (384, 128), 20, 10, ivf=False)
    assert exact == fixed + 2_000_000 * 24 * 30
    update = step_peak_bytes(2_000_000, (384, 128), 20, 10, ivf=True, update=True)
    assert update == fixed + 2_000_000 * (4 * 384 + 24 + 40 * 30)
    for kwargs, gb in [({"ivf": True}, "6.4"), ({"ivf": True, "update": True}, "7.6"),
                       ({"ivf": False}, "2.9")]:
        with pytest.raises(KnnMemoryError) as exc:
            check_memory(2_000_000, (384, 128), 20, 10, available=2 * 10 ** 9, **kwargs)
        assert str(exc.value) == (
            f"the kNN graphs of 2,000,000 items (384-d, k=20) need about {gb} GB of memory, "
            "and this machine has 2.0 GB: set knn_machine_type to a machine with more memory "
            "(`item-embeddings estimate` names one; docs/knn.md, Memory)")
    assert check_memory(2_000_000, (384, 128), 20, 10, ivf=True, update=True,
                        available=10 ** 10) == update
    # gigabytes of 10^9 bytes, to one decimal (3.350000002 and 2.75 round up)
    with pytest.raises(KnnMemoryError) as exc:
        check_memory(77_686_145, (2,), 1, 0, ivf=False, available=2_750_000_000)
    assert str(exc.value).startswith("the kNN graphs of 77,686,145 items (2-d, k=1) need about "
                                     "3.4 GB of memory, and this machine has 2.8 GB: ")
    # 15 % headroom above the estimate
    assert check_memory(2_000_000, (384, 128), 20, 10, ivf=True,
                        available=int(ivf * 1.15) + 1) == ivf
    with pytest.raises(KnnMemoryError):
        check_memory(2_000_000, (384, 128), 20, 10, ivf=True, available=int(ivf * 1.14))


def test_row_digests_tell_rows_whose_values_moved():
    """Values moved to other places of the row (whole 64-bit words swapped, or 32-bit values
    of an odd dimension): the same values, another vector, so another digest."""
    x = clustered_unit_vectors(40, 16, seed=4)
    moved = x.copy()
    moved[3, [0, 1, 2, 3]] = moved[3, [2, 3, 0, 1]]        # two 64-bit words swapped
    assert np.flatnonzero(row_digests(moved) != row_digests(x)).tolist() == [3]
    odd = clustered_unit_vectors(40, 7, seed=5)
    moved = odd.copy()
    moved[6, [0, 4]] = moved[6, [4, 0]]
    assert np.flatnonzero(row_digests(moved) != row_digests(odd)).tolist() == [6]


def test_fill_ivf_puts_every_row_once_in_its_nearest_list():
    """The IVF index an update searches: each row in the list of its nearest centroid (found
    with nprobe=1 as its own nearest row), each list as long as its rows, and the state kept
    for the next run in the types the state file records (float32 centroids, int32 lists)."""
    import faiss

    from item_embeddings.knn.state import fill_ivf, ivf_state, nearest_lists

    x = clustered_unit_vectors(500, 16, topics=6, seed=2)
    centroids = np.ascontiguousarray(x[::63][:8])
    quantizer = faiss.IndexFlatIP(16)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, 16, 8, faiss.METRIC_INNER_PRODUCT)
    index.referenced_objects = [quantizer]
    lists = nearest_lists(index, x)
    np.testing.assert_array_equal(lists, np.argmax(x @ centroids.T, axis=1))
    fill_ivf(index, x, lists)
    assert index.ntotal == 500
    invlists = faiss.downcast_InvertedLists(index.invlists)
    sizes = [invlists.list_size(i) for i in range(8)]
    assert sizes == np.bincount(lists, minlength=8).tolist()
    index.nprobe = 1
    _, found = index.search(x, 1)
    assert found[:, 0].tolist() == list(range(500))
    state = ivf_state(index, lists)
    assert state.centroids.dtype == np.float32 and state.lists.dtype == np.int32
    np.testing.assert_array_equal(state.centroids, centroids)
    np.testing.assert_array_equal(state.lists, lists)
    assert state.nprobe == 1


def test_the_update_records_what_it_did(night_one, tmp_path, caplog):
    """knn_meta.json's ``incremental`` record and the log line of an exact update: the counts
    add up to the rows, the previous run is named, the times are measured."""
    cat, previous = night_one
    first = json.loads((previous / KNN_META).read_text())
    cat.change([3, 50, 400])
    cat.delete([7, 8])
    inputs = cat.write(tmp_path / "b")
    tracker = LocalTracker(tmp_path / "runs", "exp")
    with caplog.at_level("INFO", logger="item_embeddings.knn"):
        meta = run_knn(inputs, tmp_path / "inc", previous, tracker=tracker)
    n = len(cat.ids)
    [run] = list_local_runs(tmp_path / "runs")
    for space, info in meta["spaces"].items():
        # drift: the items kept with their content (not the 3 changed), against the previous run
        drift = info["drift"]
        assert (drift["items"], drift["top"], drift["previous_run_id"]) == (
            n - 3, K, first["run_id"]), space
        assert run["metrics"][f"{space}_drift_top{K}_overlap"] == drift["mean_overlap"]
        done = info["incremental"]
        assert set(done) == {
            "previous_run_id", "changed_count", "deleted_count", "searched_count",
            "reserve_exhausted_count", "completed_from_reserve_count", "entered_count",
            "reserve", "work_share", "rebuild_work_share", "search_time_sec",
            "merge_time_sec"}, space
        assert done["previous_run_id"] == first["run_id"]
        assert done["reserve"] == RESERVE and done["rebuild_work_share"] == 0.8
        assert done["entered_count"] == (n - done["searched_count"] - info["reused_count"]
                                         - done["completed_from_reserve_count"]) > 0
        assert done["search_time_sec"] > 0 and done["merge_time_sec"] > 0
        assert info["query_time_sec"] >= done["search_time_sec"] + done["merge_time_sec"]
        assert (f"{space} vectors: updated {n - info['reused_count']} rows of {n} "
                f"({done['changed_count']} changed, {done['searched_count']} searched, "
                f"{done['completed_from_reserve_count']} completed from the reserve, "
                f"{done['entered_count']} with changed rows entering), "
                f"{info['reused_count']} reused; recall@{K} 1.0000") in caplog.text


def test_an_ivf_update_takes_the_nearest_of_many_new_near_duplicates(tmp_path, caplog):
    """30 new items next to one kept item (more than its k + reserve): the update lists that
    item's 10 nearest of them, as an exact search does, and logs the rows entering lists; the
    meta names the run that tuned the index."""
    cat = Catalogue(2000, text_dim=24)
    ivf = dict(knn_exact_max_items=0)
    first = run_knn(cat.write(tmp_path / "a"), tmp_path / "knn-a", **ivf)
    cat.insert(1000, 30)
    noise = np.random.default_rng(7).normal(size=(30, cat.text.shape[1])).astype(np.float32)
    near = cat.text[100] + 0.02 * noise
    cat.text[1000:1030] = near / np.linalg.norm(near, axis=1, keepdims=True)
    inputs = cat.write(tmp_path / "b")
    with caplog.at_level("INFO", logger="item_embeddings.knn"):
        meta = run_knn(inputs, tmp_path / "inc", tmp_path / "knn-a", **ivf)
    info = meta["spaces"]["text"]
    assert (info["method"], info["update"]) == ("ivf-flat", "incremental")
    assert info["index_params"]["tuned_by_run"] == first["run_id"]
    x = unit_rows(cat.text.astype(np.float32), K)
    exact, _ = exact_knn(x, K, queries=np.array([100]))
    assert np.load(tmp_path / "inc" / KNN_TEXT)[100].tolist() == exact[0].tolist()
    assert set(exact[0].tolist()) <= set(range(1000, 1030))
    entered = [int(m) for m in re.findall(r"^.*text vectors: (\d+) changed rows enter \d+ lists",
                                          caplog.text, re.M)]
    assert len(entered) == 1 and 10 <= entered[0] <= 30


def test_a_row_left_with_exactly_k_members_still_takes_a_new_neighbour(night_one, tmp_path):
    """An item loses its whole reserve (8 deleted items) and a new item is its nearest: the
    item is not searched (k members left) but the new item enters its list as in a rebuild."""
    cat, previous = night_one
    reserve = np.load(previous / KNN_TEXT_STATE)["reserve_neighbours"][42]
    cat.delete(reserve)
    cat.insert(300, 1)
    near = cat.text[cat.ids.index("item00042")] + 0.01 * cat.text[300]
    cat.text[300] = near / np.linalg.norm(near)
    inputs = cat.write(tmp_path / "b")
    meta = run_knn(inputs, tmp_path / "inc", previous)
    run_knn(inputs, tmp_path / "full")
    assert_same_graphs(tmp_path / "inc", tmp_path / "full")
    text = meta["spaces"]["text"]
    assert text["update"] == "incremental" and text["incremental"]["deleted_count"] == 8
    assert np.load(tmp_path / "inc" / KNN_TEXT)[cat.ids.index("item00042"), 0] == 300


def test_a_catalogue_smaller_than_k_plus_reserve_updates_with_the_rows_it_has(tmp_path,
                                                                             monkeypatch):
    """15 items, k=10: 4 other rows are left for the reserve (not RESERVE); the update records
    that and equals a full rebuild. The device asked for is the one the update searches on."""
    cat = Catalogue(15)
    run_knn(cat.write(tmp_path / "a"), tmp_path / "knn-a")
    cat.change([3])
    inputs = cat.write(tmp_path / "b")
    monkeypatch.setattr(knn_graph, "default_device", lambda: pytest.fail("default device"))
    meta = run_knn(inputs, tmp_path / "inc", tmp_path / "knn-a", device=torch.device("cpu"))
    monkeypatch.undo()
    run_knn(inputs, tmp_path / "full")
    assert_same_graphs(tmp_path / "inc", tmp_path / "full")
    for info in meta["spaces"].values():
        assert (info["update"], info["incremental"]["reserve"]) == ("incremental", 15 - 1 - K)
    assert SpaceState.load(tmp_path / "inc" / KNN_TEXT_STATE).reserve_neighbours.shape == (15, 4)
