"""kNN graphs: exact search against brute force, ties, the faiss path and its recall, bad inputs,
and the step's files and experiment run."""

import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from item_embeddings.config import PipelineParams
from item_embeddings.knn import (
    KnnInputError,
    build_knn_graph,
    build_knn_graphs,
    check_vectors,
    exact_knn,
    recall_at_k,
    unit_rows,
)
from item_embeddings.knn import graph as knn_graph
from item_embeddings.knn.incremental import RESERVE
from item_embeddings.knn.synthetic import clustered_unit_vectors
from item_embeddings.knn.vectors import CHECK_ROWS
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.storage import write_parquet_atomic
from item_embeddings.tracking import LocalTracker, list_local_runs


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 all-pairs scores, self excluded, ordered by (-score, index)."""
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def tied_vectors(n: int, seed: int = 0) -> np.ndarray:
    """Copies of 6 unit rows whose every dot product is a multiple of 1/4, exact in float32
    whatever the summation order: many exactly equal scores."""
    base = np.zeros((6, 8), dtype=np.float32)
    for row, cols in enumerate([(0, 1, 2, 3), (0, 1, 2, 4), (0, 1, 5, 6), (4, 5, 6, 7),
                                (1, 3, 5, 7), (0, 2, 4, 6)]):
        base[row, list(cols)] = 0.5
    base[4, 3] = -0.5
    return base[np.random.default_rng(seed).integers(0, 6, n)]


@pytest.mark.parametrize("query_block,db_block", [(7, 13), (64, 100), (2048, 16384)])
def test_exact_matches_brute_force(query_block, db_block):
    x = unit_rows(clustered_unit_vectors(517, 16, topics=6, seed=1), 9)  # 517: no block fits
    ids, scores = exact_knn(x, 9, query_block=query_block, db_block=db_block,
                            device=torch.device("cpu"))
    ref_ids, ref_scores = brute_force(x, 9)
    assert ids.shape == scores.shape == (517, 9)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-6)
    # every listed row truly has its listed score, and only near-ties may swap places
    true = np.einsum("nd,nkd->nk", x.astype(np.float64), x[ids].astype(np.float64))
    np.testing.assert_allclose(true, ref_scores, atol=2e-6)
    assert (ids == ref_ids).mean() > 0.999
    assert not (ids == np.arange(517)[:, None]).any()                 # self excluded
    assert (np.diff(scores, axis=1) <= 0).all()                       # most similar first


@pytest.mark.parametrize("query_block,db_block", [(5, 11), (16, 40), (2048, 16384)])
def test_ties_keep_the_smaller_index_first(query_block, db_block):
    x = tied_vectors(90)
    ids, scores = exact_knn(x, 12, query_block=query_block, db_block=db_block)
    ref_ids, ref_scores = brute_force(x, 12)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    np.testing.assert_array_equal(ids, ref_ids)           # (-score, index) order, exactly
    graph = build_knn_graph(x, 12, exact_max_items=1000, recall_queries=90)
    np.testing.assert_array_equal(graph.neighbours, ref_ids)
    assert graph.neighbours.dtype == np.int32 and graph.scores.dtype == np.float32
    assert graph.recall_at_k == 1.0


def test_exact_query_subset_equals_full_rows():
    x = unit_rows(clustered_unit_vectors(300, 12, seed=2), 5)
    all_ids, all_scores = exact_knn(x, 5, db_block=64)
    rows = np.array([0, 17, 299, 150])
    ids, scores = exact_knn(x, 5, queries=rows, db_block=64)
    np.testing.assert_array_equal(ids, all_ids[rows])
    np.testing.assert_array_equal(scores, all_scores[rows])


def test_unnormalised_rows_are_normalised():
    x = clustered_unit_vectors(200, 8, seed=4)
    scaled = x * np.random.default_rng(0).uniform(0.1, 50, (200, 1)).astype(np.float32)
    a = build_knn_graph(x, 6, exact_max_items=1000, recall_queries=10)
    b = build_knn_graph(scaled, 6, exact_max_items=1000, recall_queries=10)
    np.testing.assert_array_equal(a.neighbours, b.neighbours)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_recall_of_a_degraded_graph():
    x = unit_rows(clustered_unit_vectors(400, 16, topics=4, seed=5), 20)
    ids, _ = exact_knn(x, 20)
    queries = np.arange(0, 400, 7)
    _, exact_scores = exact_knn(x, 20, queries=queries)
    assert recall_at_k(x, ids, queries, exact_scores) == 1.0
    shuffled = np.random.default_rng(0).permuted(ids, axis=1)          # order does not matter
    assert recall_at_k(x, shuffled, queries, exact_scores) == 1.0
    worst = np.argsort(x @ x.T, axis=1)[:, :5]                         # the 5 least similar
    degraded = ids.copy()
    degraded[:, 15:] = worst
    assert recall_at_k(x, degraded, queries, exact_scores) == pytest.approx(15 / 20)
    # the first 15 columns are untouched: as a k=15 graph it is perfect
    assert recall_at_k(x, degraded[:, :15], queries, exact_scores[:, :15]) == 1.0
    repeated = ids.copy()
    repeated[:, 10:] = ids[:, :1]      # the first neighbour listed 11 times: 10 distinct hits
    assert recall_at_k(x, repeated, queries, exact_scores) == pytest.approx(10 / 20)
    with_self = ids.copy()
    with_self[:, -1] = np.arange(400)                                  # self is never a hit
    assert recall_at_k(x, with_self, queries, exact_scores) == pytest.approx(19 / 20)


def test_recall_counts_an_equally_good_choice_among_ties():
    x = tied_vectors(60, seed=3)
    ids, exact_scores = exact_knn(x, 5)
    group = [np.flatnonzero((x == x[q]).all(axis=1)) for q in range(60)]
    # another copy of the same vector, not the one exact search listed, is just as near
    swapped = ids.copy()
    for q in range(60):
        others = [r for r in group[q] if r != q and r not in ids[q]]
        if others:
            swapped[q, 0] = others[0]
    assert (swapped != ids).any()
    assert recall_at_k(x, swapped, np.arange(60), exact_scores) == 1.0


def test_approximate_path_reaches_its_recall(caplog):
    x = clustered_unit_vectors(4000, 32, topics=40, seed=6)
    with caplog.at_level("INFO", logger="item_embeddings"):
        graph = build_knn_graph(x, 10, exact_max_items=1000, recall_queries=500, seed=1,
                                what="text vectors")
    params = graph.index_params
    assert {key: params[key] for key in ("index", "metric", "nlist", "train_size",
                                         "spherical_kmeans", "tune_queries",
                                         "tune_recall_target", "exact_rows")} == {
        "index": "IVF102,Flat", "metric": "inner_product", "nlist": 102, "train_size": 4000,
        "spherical_kmeans": True, "tune_queries": 1000, "tune_recall_target": 0.965,
        "exact_rows": 0}
    assert {"kmeans_iterations", "tune_recall_by_nprobe", "tune_time_sec", "faiss_threads",
            "faiss_version"} < set(params)
    tried = {int(p): round(r, 4) for p, r in params["tune_recall_by_nprobe"].items()}
    assert (f"text vectors kNN: IVF102 nprobe={params['nprobe']} (tuning recall {tried}) in "
            in caplog.text)
    assert (f"text vectors: ivf-flat kNN of 4000 rows, k=10: recall@10 "
            f"{graph.recall_at_k:.4f} on 500 queries, search " in caplog.text)
    for line in ("text vectors kNN tuning sample: 1000/1000 rows",   # the progress lines
                 f"text vectors kNN tuning nprobe={params['nprobe']}: 1000/1000 rows",
                 "text vectors kNN: 4000/4000 rows", "text vectors recall sample: 500/500 rows"):
        assert line in caplog.text
    assert graph.method == "ivf-flat"
    assert graph.index_params["nprobe"] < graph.index_params["nlist"]  # not a disguised scan
    assert graph.neighbours.shape == (4000, 10) and graph.neighbours.dtype == np.int32
    assert not (graph.neighbours == np.arange(4000)[:, None]).any()
    assert (np.diff(graph.scores, axis=1) <= 0).all()
    assert graph.recall_at_k >= 0.95
    # the sampled recall agrees with the recall over every row, computed by brute force
    _, ref_scores = brute_force(unit_rows(x, 10), 10)
    full = recall_at_k(unit_rows(x, 10), graph.neighbours, np.arange(4000),
                       ref_scores.astype(np.float32))
    assert full < 1.0                                   # approximate indeed
    assert abs(full - graph.recall_at_k) < 0.02
    np.testing.assert_allclose(
        graph.scores, np.einsum("nd,nkd->nk", unit_rows(x, 10), unit_rows(x, 10)[
            graph.neighbours]), atol=1e-5)


def test_rows_the_index_cannot_fill_are_searched_exactly(monkeypatch, caplog):
    # one probed list of about 39 rows (nlist = N / 39) and k = 60: most rows are unfilled
    monkeypatch.setattr(knn_graph, "NPROBES", (1,))
    monkeypatch.setattr(knn_graph, "TUNE_RECALL", 0.0)
    monkeypatch.setattr(knn_graph, "TUNE_QUERIES", 997)
    x = clustered_unit_vectors(2000, 16, topics=200, size_sigma=2.0, seed=7)
    # the device asked for is the one used, the unfilled rows' exact search included
    monkeypatch.setattr(knn_graph, "default_device", lambda: pytest.fail("default device"))
    with caplog.at_level("INFO", logger="item_embeddings"):
        graph = build_knn_graph(x, 60, exact_max_items=100, recall_queries=100,
                                device=torch.device("cpu"))
    assert graph.index_params["nprobe"] == 1
    # the tuning recall is logged to 4 decimals (997 queries x 60: not exact at 4)
    [(nprobe, recall)] = graph.index_params["tune_recall_by_nprobe"].items()
    assert round(recall, 4) != round(recall, 5)
    assert (f"vectors kNN: IVF{graph.index_params['nlist']} nprobe=1 (tuning recall "
            f"{{1: {round(recall, 4)}}}) in ") in caplog.text
    assert graph.index_params["exact_rows"] > 0
    assert (graph.neighbours >= 0).all()
    assert not (graph.neighbours == np.arange(2000)[:, None]).any()


@pytest.mark.parametrize("vectors,k,message", [
    (np.ones((5, 4), np.float32), 5, "k=5 needs at least 6 items"),
    (np.ones((5, 4), np.float32), 0, "k must be a positive integer"),
    (np.zeros((0, 4), np.float32), 1, "empty"),
    (np.ones(4, np.float32), 1, "2-D"),
    (np.ones((5, 4), np.float64), 1, "float32"),
])
def test_bad_inputs_are_refused(vectors, k, message):
    with pytest.raises(KnnInputError, match=message):
        build_knn_graph(vectors, k, exact_max_items=100)


def test_nan_inf_and_zero_rows_are_named():
    x = clustered_unit_vectors(50, 8, seed=8)
    x[[3, 11]] = np.nan
    x[20, 2] = np.inf
    x[40] = 0
    with pytest.raises(KnnInputError) as err:
        build_knn_graph(x, 5, exact_max_items=100, what="text vectors",
                        labels=[f"item-{i}" for i in range(50)])
    text = str(err.value)
    assert "text vectors: 3 rows with NaN or Inf values: 'item-3' (row 3), 'item-11' (row 11), " \
           "'item-20' (row 20)" in text
    assert "1 rows with all zeros (no direction): 'item-40' (row 40)" in text
    with pytest.raises(KnnInputError, match="recall_queries"):
        build_knn_graph(clustered_unit_vectors(50, 8), 5, exact_max_items=100, recall_queries=0)


def test_bad_rows_are_named_by_row_without_labels_and_counted_past_five():
    x = clustered_unit_vectors(50, 8, seed=8)
    x[[2, 4, 6, 8, 10, 12, 14]] = np.nan
    with pytest.raises(KnnInputError) as err:
        build_knn_graph(x, 5, exact_max_items=100)
    assert str(err.value) == ("vectors: 7 rows with NaN or Inf values: row 2, row 4, row 6, "
                              "row 8, row 10 and 2 more")
    x[[12, 14]] = 1.0                                     # exactly five: no "and ... more"
    with pytest.raises(KnnInputError) as err:
        check_vectors(x, 5)
    assert str(err.value) == ("vectors: 5 rows with NaN or Inf values: row 2, row 4, row 6, "
                              "row 8, row 10")
    x[30] = 0                     # both kinds in one message; no warning about the zero row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KnnInputError) as err:
            unit_rows(x, 5)
    assert str(err.value) == ("vectors: 5 rows with NaN or Inf values: row 2, row 4, row 6, "
                              "row 8, row 10; 1 rows with all zeros (no direction): row 30")


def test_bad_rows_past_the_first_block_are_named_by_their_own_row():
    x = np.ones((CHECK_ROWS + 10, 2), np.float32)
    x[CHECK_ROWS + 3] = np.inf
    x[CHECK_ROWS + 5] = 0
    with pytest.raises(KnnInputError) as err:
        check_vectors(x, 5)
    assert str(err.value) == (f"vectors: 1 rows with NaN or Inf values: row {CHECK_ROWS + 3}; "
                              f"1 rows with all zeros (no direction): row {CHECK_ROWS + 5}")


@pytest.mark.parametrize("vectors,k,message", [
    ([[1.0, 0.0], [0.0, 1.0]], 1, "vectors: expected a 2-D [N, d] array, got shape list"),
    (np.ones(4, np.float32), 1, "vectors: expected a 2-D [N, d] array, got shape (4,)"),
    (np.ones((5, 4), np.float64), 1, "vectors: expected float32 rows, got float64"),
    (np.ones((5, 0), np.float32), 1, "vectors: the set is empty (shape (5, 0))"),
    (np.ones((5, 4), np.float32), True, "k must be a positive integer, got True"),
    (np.ones((5, 4), np.float32), 2.0, "k must be a positive integer, got 2.0"),
    (np.ones((5, 4), np.float32), 5, "vectors: k=5 needs at least 6 items (self is excluded), "
                                     "got 5"),
])
def test_refusals_word_for_word(vectors, k, message):
    for check in (check_vectors, unit_rows):
        with pytest.raises(KnnInputError) as err:
            check(vectors, k)
        assert str(err.value) == message


def test_one_dimension_and_a_numpy_k_are_accepted():
    x = np.array([[1.0], [-2.0], [3.0], [-0.5]], np.float32)
    graph = build_knn_graph(x, np.int64(1), exact_max_items=100)
    np.testing.assert_array_equal(graph.neighbours[:, 0], [2, 3, 0, 1])
    np.testing.assert_array_equal(graph.scores[:, 0], [1.0, 1.0, 1.0, 1.0])


def test_unit_rows_go_to_a_file_in_scratch_only_when_asked(tmp_path):
    x = clustered_unit_vectors(300, 8, seed=3) * 7
    in_memory = unit_rows(x, 5)
    assert not isinstance(in_memory, np.memmap) and in_memory.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(in_memory, axis=1), 1.0, rtol=1e-6)
    on_disk = unit_rows(x, 5, scratch=tmp_path)
    assert isinstance(on_disk, np.memmap) and on_disk.dtype == np.float32
    [written] = tmp_path.iterdir()
    assert written.name.startswith("unit-rows-") and written.suffix == ".npy"
    assert Path(on_disk.filename) == written
    np.testing.assert_array_equal(np.load(written), in_memory)


def test_checking_a_memory_mapped_array_reads_no_copy_of_it(tmp_path):
    """The check reads blocks of CHECK_ROWS rows: at 4.6 blocks its peak stays near one block's
    temporaries, well below the array's size (a normalised copy would be the array's size)."""
    rows = np.random.default_rng(4).standard_normal((300_000, 8)).astype(np.float32)  # 9.6 MB
    np.save(tmp_path / "x.npy", rows)
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        check_vectors(x, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * x.nbytes


def _write_inputs(text_dir, fused_dir, n, *, fused_ids=None):
    ids = [f"item-{i:05d}" for i in range(n)]
    text_dir.mkdir(parents=True, exist_ok=True)
    fused_dir.mkdir(parents=True, exist_ok=True)
    np.save(text_dir / TXT_ARRAY, clustered_unit_vectors(n, 48, topics=20, seed=9))
    write_parquet_atomic(text_dir / TXT_ITEMS, pa.table({"id": ids}))
    (text_dir / TXT_META).write_text(json.dumps({"run_id": "text-run"}))
    np.save(fused_dir / FUSED_ARRAY, clustered_unit_vectors(n, 16, topics=20, seed=10))
    write_parquet_atomic(fused_dir / FUSED_ITEMS, pa.table(
        {"id": fused_ids or ids, "has_image": [True] * n}))
    return ids


@pytest.mark.parametrize("exact_max_items,method", [(100_000, "exact"), (1000, "ivf-flat")])
def test_step_writes_graphs_meta_and_run(tmp_path, exact_max_items, method, caplog):
    _write_inputs(tmp_path / "text", tmp_path / "fused", 2500)
    (tmp_path / "fused" / FUSION_CONFIG).write_text(json.dumps(
        {"run_id": "fusion-run", "weights_sha256": "ab" * 32}))
    tracker = LocalTracker(tmp_path / "runs", "exp")
    params = PipelineParams(knn_k=12, knn_exact_max_items=exact_max_items,
                            knn_recall_queries=300, seed=5)
    with caplog.at_level("INFO", logger="item_embeddings"):
        meta = build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out", params,
                                run_id="r1", tracker=tracker)
    for space in ("text", "fused"):     # the graph's own log line names its space
        assert f"{space} vectors: {method} kNN of 2500 rows, k=12: recall@12 " in caplog.text
    out = tmp_path / "out"
    for ids_file, scores_file in ((KNN_TEXT, KNN_TEXT_SCORES), (KNN_FUSED, KNN_FUSED_SCORES)):
        ids = np.load(out / ids_file)
        scores = np.load(out / scores_file)
        assert ids.shape == scores.shape == (2500, 12)
        assert ids.dtype == np.int32 and scores.dtype == np.float32
        assert ((ids >= 0) & (ids < 2500)).all()
        assert (np.diff(scores, axis=1) <= 0).all()
    written = json.loads((out / KNN_META).read_text())
    assert written == json.loads(json.dumps(meta))
    assert (written["k"], written["count"], written["run_id"]) == (12, 2500, "r1")
    assert {key: written[key] for key in (
        "text_run_id", "fusion_run_id", "fusion_weights_sha256", "text_dir", "fused_dir",
        "exact_max_items", "seed", "reserve", "previous_uri")} == {
        "text_run_id": "text-run", "fusion_run_id": "fusion-run",
        "fusion_weights_sha256": "ab" * 32,
        "text_dir": str(tmp_path / "text"), "fused_dir": str(tmp_path / "fused"),
        "exact_max_items": exact_max_items, "seed": 5, "reserve": RESERVE, "previous_uri": ""}
    for space, dim in (("text", 48), ("fused", 16)):
        info = written["spaces"][space]
        assert info["dim"] == dim and info["method"] == method
        assert info["recall_queries"] == 300 and info["recall_at_k"] >= 0.95
        assert set(info["recall_at"]) == {"1", "5", "10"}               # prefixes below k=12
        assert min(info["recall_at"].values()) >= 0.9
        assert {"build_time_sec", "query_time_sec", "index_params"} <= set(info)
    assert {"wall_time_sec", "versions"} <= set(written)
    [run] = list_local_runs(tmp_path / "runs")
    assert run["run_name"] == "knn-graph-r1" and run["status"] == "COMPLETE"
    assert run["params"]["k"] == 12
    assert run["metrics"]["text_recall_at_k"] == written["spaces"]["text"]["recall_at_k"]
    assert run["metrics"]["fused_recall_at_k"] == written["spaces"]["fused"]["recall_at_k"]
    assert run["metrics"]["count"] == 2500
    assert run["metrics"]["fused_recall_at_10"] == written["spaces"]["fused"]["recall_at"]["10"]


def test_a_catalogue_smaller_than_k_plus_one_gets_k_lowered(tmp_path, caplog):
    """knn_k=40 over 40 items (k neighbours need k + 1 items): the step lowers k to 39, says
    so and records both in knn_meta.json (the step refused before, after every other step)."""
    _write_inputs(tmp_path / "text", tmp_path / "fused", 40)
    with caplog.at_level("WARNING", logger="item_embeddings"):
        meta = build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                                PipelineParams(knn_k=40))
    assert "knn_k lowered to 39 for 40 items" in caplog.text
    assert (meta["k"], meta["k_requested"], meta["count"]) == (39, 40, 40)
    assert meta["fusion_run_id"] is None and meta["fusion_weights_sha256"] is None  # no config
    assert np.load(tmp_path / "out" / KNN_TEXT).shape == (40, 39)
    assert (np.sort(np.load(tmp_path / "out" / KNN_FUSED), axis=1) ==
            [[j for j in range(40) if j != i] for i in range(40)]).all()  # all the others


def test_fused_items_without_has_image_count_as_items_without_a_photo(tmp_path):
    _write_inputs(tmp_path / "text", tmp_path / "fused", 40)
    write_parquet_atomic(tmp_path / "fused" / FUSED_ITEMS,
                         pa.table({"id": [f"item-{i:05d}" for i in range(40)]}))
    meta = build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                            PipelineParams(knn_k=5))
    mix = meta["modality_mix"]
    assert (mix["items"], mix["items_with_photo"], mix["items_without_photo"]) == (40, 0, 40)
    assert mix["photo_share"]["fused"] == {"with_photo": None, "without_photo": 0.0}


def test_step_refuses_inconsistent_inputs_before_the_run(tmp_path):
    ids = _write_inputs(tmp_path / "text", tmp_path / "fused", 40,
                        fused_ids=[f"item-{i:05d}" for i in reversed(range(40))])
    tracker = LocalTracker(tmp_path / "runs", "exp")
    with pytest.raises(KnnInputError, match="same order"):
        build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                         tracker=tracker)
    _write_inputs(tmp_path / "text", tmp_path / "fused", 40)
    np.save(tmp_path / "fused" / FUSED_ARRAY, np.ones((39, 16), np.float32))
    with pytest.raises(KnnInputError, match="shape \\(39, 16\\) but .* lists 40 ids"):
        build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                         tracker=tracker)
    _write_inputs(tmp_path / "text", tmp_path / "fused", 1)  # a kNN graph needs 2 items
    with pytest.raises(KnnInputError, match="k=1 needs at least 2 items"):
        build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                         PipelineParams(knn_k=40), tracker=tracker)
    _write_inputs(tmp_path / "text", tmp_path / "fused", 40)
    fused = np.load(tmp_path / "fused" / FUSED_ARRAY)
    fused[7] = np.nan
    np.save(tmp_path / "fused" / FUSED_ARRAY, fused)
    with pytest.raises(KnnInputError, match=f"fused vectors: 1 rows with NaN .*'{ids[7]}'"):
        build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                         tracker=tracker)
    (tmp_path / "text" / TXT_ITEMS).unlink()
    with pytest.raises(KnnInputError, match="txt_items.parquet not found"):
        build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                         tracker=tracker)
    assert list_local_runs(tmp_path / "runs") == []       # no run was started
    assert not (tmp_path / "out").exists()


def test_step_records_the_modality_mix_of_both_graphs(tmp_path, caplog):
    """knn_meta.json, the experiment run and the log carry the photo share of each graph's
    neighbours for items with and without a photo, computed over every row of the graphs."""
    n = 600
    ids = [f"item-{i:05d}" for i in range(n)]
    has_image = np.arange(n) % 3 == 0
    text = clustered_unit_vectors(n, 32, topics=12, seed=3)
    # a fused space split by photo: one extra direction, large for items with a photo
    fused = np.hstack([text, 3.0 * has_image[:, None].astype(np.float32)])
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    for folder, array, name in ((tmp_path / "text", text, TXT_ARRAY),
                                (tmp_path / "fused", fused.astype(np.float32), FUSED_ARRAY)):
        folder.mkdir()
        np.save(folder / name, array)
    write_parquet_atomic(tmp_path / "text" / TXT_ITEMS, pa.table({"id": ids}))
    write_parquet_atomic(tmp_path / "fused" / FUSED_ITEMS,
                         pa.table({"id": ids, "has_image": has_image}))
    tracker = LocalTracker(tmp_path / "runs", "exp")
    with caplog.at_level("WARNING"):
        meta = build_knn_graphs(tmp_path / "text", tmp_path / "fused", tmp_path / "out",
                                PipelineParams(knn_k=10), run_id="r1", tracker=tracker)
    mix = meta["modality_mix"]
    assert (mix["items"], mix["k"], mix["items_with_photo"]) == (n, 10, int(has_image.sum()))
    assert mix["base_rate"] == pytest.approx(has_image.mean())
    for space, graph_file in (("text", KNN_TEXT), ("fused", KNN_FUSED)):
        share = has_image[np.load(tmp_path / "out" / graph_file)].mean(axis=1)
        assert mix["photo_share"][space] == pytest.approx(
            {"with_photo": share[has_image].mean(), "without_photo": share[~has_image].mean()})
    assert mix["photo_share"]["fused"]["with_photo"] > 0.9
    assert mix["departure"] > 0.10
    [warning] = [r.getMessage() for r in caplog.records if "sorts items" in r.getMessage()]
    assert warning.startswith("kNN graphs: the fused space sorts items by whether they have a "
                              "photo: ")
    [run] = list_local_runs(tmp_path / "runs")
    assert run["metrics"]["photo_share_fused_with_photo"] == pytest.approx(
        mix["photo_share"]["fused"]["with_photo"])
    assert run["metrics"]["photo_share_departure"] == pytest.approx(mix["departure"])
