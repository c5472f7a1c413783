"""What `verify` sees of a kNN graph beyond hashes and shapes (issue #22.3): the recall it
records, and whether it lists the nearest rows (a seeded sample searched exactly). Each damage
is done consistently (real rows, true cosines, sorted, hashes rewritten), so only the new check
can tell; the sets are made by the real kNN and report steps on generated vectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import exact_knn, make_output_set, refused, reseal, verify_cli, write_report
from item_embeddings.config import PipelineParams
from item_embeddings.knn import build_knn_graphs
from item_embeddings.outputs import (
    FUSED_ARRAY,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    QA_REPORT,
    REPORT_META,
    TXT_ARRAY,
)

N = 60
K = 5


def _with_knn(root: Path, **params) -> Path:
    """The real kNN step's graphs of the set in ``root``, then its QA report again (made from
    them)."""
    build_knn_graphs(root, root, root, PipelineParams(seed=0, **params), run_id="run-1",
                     device=torch.device("cpu"))
    return write_report(root)


@pytest.fixture(scope="module")
def exact_set(tmp_path_factory) -> Path:
    return _with_knn(make_output_set(tmp_path_factory.mktemp("exact") / "set", n=N), knn_k=K)


@pytest.fixture
def damaged(exact_set, tmp_path) -> Path:
    """A private copy of the exact set to damage."""
    return Path(shutil.copytree(exact_set, tmp_path / "set"))


def _edit_space(root: Path, space: str, **changes) -> None:
    meta = json.loads((root / KNN_META).read_text())
    meta["spaces"][space].update(changes)
    (root / KNN_META).write_text(json.dumps(meta))


def _save_graph(root: Path, space: str, idx: np.ndarray, scores: np.ndarray) -> None:
    """Replace a space's graph, hashes rewritten: as if the kNN step had written it."""
    names = {"text": (KNN_TEXT, KNN_TEXT_SCORES), "fused": (KNN_FUSED, KNN_FUSED_SCORES)}[space]
    np.save(root / names[0], idx.astype(np.int32))
    np.save(root / names[1], scores.astype(np.float32))
    reseal(root)


# ----------------------------------------------------------------------------- clean sets

def test_real_exact_graphs_and_report_pass(exact_set, capsys):
    rc, out = verify_cli(exact_set, capsys)
    assert rc == 0, out
    for space, name in (("text", KNN_TEXT), ("fused", KNN_FUSED)):
        assert (f"{name}: {N} of {N} rows (seeded sample) searched exactly: recall@{K} 1.0000 "
                f"(recorded 1.0000, method exact)") in out, space
    assert "report_meta.json: count=60, fusion_run_id=run-1" in out
    meta = json.loads((exact_set / KNN_META).read_text())
    assert meta["spaces"]["text"]["recall_at"] == {"1": 1.0}  # what the value checks read


@pytest.fixture(scope="module")
def ivf_set(tmp_path_factory) -> Path:
    """1,500 items: the kNN step's approximate path (IVF), its recall measured on 300 rows."""
    root = make_output_set(tmp_path_factory.mktemp("ivf") / "set", n=1500)
    return _with_knn(root, knn_k=10, knn_exact_max_items=100, knn_recall_queries=300)


def test_real_ivf_graph_passes_and_a_far_worse_one_is_refused(ivf_set, tmp_path, capsys):
    rc, out = verify_cli(ivf_set, capsys)
    assert rc == 0, out
    meta = json.loads((ivf_set / KNN_META).read_text())["spaces"]["fused"]
    assert meta["method"] == "ivf-flat" and meta["recall_at_k"] < 1
    assert "knn_fused.npy: 256 of 1500 rows (seeded sample) searched exactly: recall@10 " in out
    assert f"(recorded {meta['recall_at_k']:.4f}, method ivf-flat)" in out
    # Real rows with their true cosines, sorted, resealed: the 11th..20th nearest of each row.
    damaged = Path(shutil.copytree(ivf_set, tmp_path / "set"))
    idx, scores = exact_knn(np.load(damaged / FUSED_ARRAY), 20)
    _save_graph(damaged, "fused", idx[:, 10:], scores[:, 10:])
    violations = refused(damaged, capsys, "knn_fused.npy: recall@10 0.0000 on 256 sampled rows "
                                          "searched exactly, but knn_meta.json records "
                                          f"{meta['recall_at_k']:.4f} (ivf-flat; sampling noise "
                                          "explains ", "the graph does not list the nearest "
                                          "fused.npy rows (e.g. row ")
    assert len(violations.splitlines()) == 1, violations


# ----------------------------------------------------------------------------- recorded recall

@pytest.mark.parametrize("space,changes,message", [
    ("text", {"recall_at_k": 1.5}, "spaces.text.recall_at_k = 1.5 is not a number in [0, 1]"),
    ("fused", {"recall_at_k": -0.01}, "spaces.fused.recall_at_k = -0.01 is not a number in"),
    ("text", {"recall_at_k": "0.99"}, "spaces.text.recall_at_k = '0.99' is not a number"),
    ("text", {"recall_at_k": True}, "spaces.text.recall_at_k = True is not a number"),
    ("text", {"recall_at_k": float("nan")}, "spaces.text.recall_at_k = nan is not a number"),
    ("fused", {"recall_at_k": None}, "spaces.fused.recall_at_k = None is not a number"),
    ("fused", {"recall_at": {"1": 1.2}}, "spaces.fused.recall_at['1'] = 1.2 is not a number in "
                                         "[0, 1]"),
    ("text", {"recall_at": {"1": "high"}}, "spaces.text.recall_at['1'] = 'high' is not a number"),
    ("text", {"recall_at": {"1": 1.0, "5": 1.0}},
     "spaces.text.recall_at: '5' is not a column count in [1, 5)"),
    ("text", {"recall_at": [1.0]}, "spaces.text.recall_at = [1.0] is not a mapping"),
    ("fused", {"recall_queries": -3}, "spaces.fused.recall_queries = -3 is not a row count"),
])
def test_recorded_recall_must_be_a_fraction(damaged, capsys, space, changes, message):
    _edit_space(damaged, space, **changes)
    violations = refused(damaged, capsys, f"knn_meta.json: {message}")
    assert len(violations.splitlines()) == 1, violations


# ----------------------------------------------------------------------------- not the nearest

def test_exact_graph_listing_the_2nd_to_6th_nearest_is_refused(damaged, capsys):
    idx, scores = exact_knn(np.load(damaged / FUSED_ARRAY), K + 1)
    _save_graph(damaged, "fused", idx[:, 1:], scores[:, 1:])
    violations = refused(damaged, capsys, f"knn_fused.npy: {N} row(s) (rows [0, 1, 2, 3, 4]) of "
                                          f"{N} sampled do not list their nearest fused.npy "
                                          "rows, though knn_meta.json says the graph is exact "
                                          f"(e.g. row 0 lists row {idx[0, K]} (cosine "
                                          f"{scores[0, K]:.4f}) but not row {idx[0, 0]} (cosine "
                                          f"{scores[0, 0]:.4f}))")
    assert len(violations.splitlines()) == 1, violations  # every older check passes it


def test_one_row_that_skips_its_nearest_is_named(damaged, capsys):
    idx, scores = exact_knn(np.load(damaged / TXT_ARRAY), K + 1)
    graph, graph_scores = np.load(damaged / KNN_TEXT), np.load(damaged / KNN_TEXT_SCORES)
    graph[7], graph_scores[7] = idx[7, 1:], scores[7, 1:]
    _save_graph(damaged, "text", graph, graph_scores)
    refused(damaged, capsys, f"knn_text.npy: 1 row(s) (rows [7]) of {N} sampled do not list")


def test_another_choice_among_equal_scores_is_no_miss(damaged, capsys):
    """Rows 0-5 are one vector: each has five others at cosine 1 for four places. The graph
    may list any four of them (the kNN step keeps the smaller rows); exact search must not call
    the other choice a miss, within float rounding of the two computations."""
    fused = np.load(damaged / FUSED_ARRAY)
    fused[1:6] = fused[0]
    np.save(damaged / FUSED_ARRAY, fused)
    idx, scores = exact_knn(fused, K - 1)  # k=4: ties straddle the 4th place
    assert list(idx[0]) == [1, 2, 3, 4]
    idx[0] = [1, 2, 3, 5]                  # the other choice, same scores
    meta = json.loads((damaged / KNN_META).read_text())
    meta["k"] = K - 1
    for space in meta["spaces"].values():
        space["recall_at"] = {"1": 1.0}
    (damaged / KNN_META).write_text(json.dumps(meta))
    text_idx, text_scores = exact_knn(np.load(damaged / TXT_ARRAY), K - 1)
    _save_graph(damaged, "text", text_idx, text_scores)
    _save_graph(damaged, "fused", idx, scores)
    write_report(damaged)  # the report of the rewritten set
    rc, out = verify_cli(damaged, capsys)
    assert rc == 0, out
    assert f"knn_fused.npy: {N} of {N} rows (seeded sample) searched exactly: recall@4 1.0000" \
        in out


@pytest.mark.parametrize("recorded,passes", [(0.8, True), (0.99, False)])
def test_approximate_graph_may_miss_what_its_recall_says(damaged, capsys, recorded, passes):
    """Every row lists its 2nd..6th nearest (recall@5 0.8): as an IVF graph that records 0.8
    (measured on 1,000 rows) it passes; recording 0.99 it is refused."""
    idx, scores = exact_knn(np.load(damaged / FUSED_ARRAY), K + 1)
    _save_graph(damaged, "fused", idx[:, 1:], scores[:, 1:])
    _edit_space(damaged, "fused", method="ivf-flat", recall_at_k=recorded, recall_queries=1000)
    if passes:
        rc, out = verify_cli(damaged, capsys)
        assert rc == 0, out
        assert "recall@5 0.8000 (recorded 0.8000, method ivf-flat)" in out
    else:
        refused(damaged, capsys, "knn_fused.npy: recall@5 0.8000 on 60 sampled rows searched "
                                 "exactly, but knn_meta.json records 0.9900 (ivf-flat; sampling "
                                 "noise explains 0.0")


def test_report_made_before_the_graphs_is_refused(damaged, tmp_path, capsys):
    """The set's report must be made from its kNN graphs too (the report shows their recall)."""
    before = make_output_set(tmp_path / "before", n=N)  # run-1's groups, no graphs yet
    for name in (QA_REPORT, REPORT_META):
        shutil.copyfile(before / name, damaged / name)
    violations = refused(damaged, capsys, "report_meta.json: knn_run_id = None but "
                                          "knn_meta.json has run_id 'run-1': groups of "
                                          "different runs")
    assert len(violations.splitlines()) == 1, violations
