"""Checks that a previous output set's groups agree with each other, on a seeded sample of rows.

Sizes and sha256 prove that a file is the one its step recorded, not that a row belongs to its
item: rows swapped in ``txt.npy`` with the recorded hash and size rewritten pass every record.
What a swap cannot keep true (each check reads only the sampled rows):

* a kNN graph lists, for row *i*, neighbours *j* with their scores: the scores must be the
  cosines of rows *i* and *j* of the vectors the graph was built on (``txt.npy``, ``fused.npy``);
* the fused code of an item is the fusion model's output for its text and image vectors: row *i*
  of ``fused.npy`` must be the model applied to row *i* of ``txt.npy`` and the item's row of
  ``img.npy`` (found by id), and the id files must name the same item.

:func:`check_contents` runs once per run, in the first task
(:func:`.incremental.verify_previous_set`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from .outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_WEIGHTS,
    IMG_ARRAY,
    IMG_ITEMS,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    TXT_ARRAY,
    TXT_ITEMS,
)
from .ranged import npy_layout, npy_rows, open_pinned, parquet_table

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 64         # rows checked per check (all of them in a smaller set)
SCORE_TOLERANCE = 1e-3   # a listed score against the cosine of the two rows
CODE_TOLERANCE = 1e-3    # a fused code against the model's output (float32, other batches)
MAX_NAMED = 3            # rows named in a problem


def check_contents(verified) -> list[str]:
    """What contradicts itself in the verified set ``verified`` (a
    :class:`.incremental.VerifiedSet`): one message per failed check, empty when all agree.
    Checks only what the set holds (no graphs: no graph check)."""
    files = verified.files
    root = verified.root

    def rows(name: str, index: np.ndarray) -> np.ndarray:
        return npy_rows(f"{root}/{name}", index, verified.version(name))

    if TXT_ARRAY not in files:
        return []
    n = npy_layout(f"{root}/{TXT_ARRAY}", verified.version(TXT_ARRAY)).shape[0]
    sample = _sample(n, files[TXT_ARRAY]["sha256"])
    problems = []
    for graph, scores, vectors in ((KNN_TEXT, KNN_TEXT_SCORES, TXT_ARRAY),
                                   (KNN_FUSED, KNN_FUSED_SCORES, FUSED_ARRAY)):
        if {graph, scores, vectors} <= set(files):
            problems += _graph_scores(rows, sample, graph, scores, vectors)
    if {FUSED_ARRAY, FUSED_ITEMS, FUSION_WEIGHTS, TXT_ITEMS, IMG_ARRAY, IMG_ITEMS} <= set(files):
        problems += _fused_codes(verified, rows, sample)
    logger.info("previous set %s: %d rows checked across its groups, %d problem(s)", root,
                len(sample), len(problems))
    return problems


def _sample(n: int, seed_hex: str) -> np.ndarray:
    """A sample of row numbers, the same for the same set (seeded by its text array's hash)."""
    rng = np.random.default_rng(int(seed_hex[:16], 16))
    return np.sort(rng.choice(n, size=min(n, SAMPLE_ROWS), replace=False)).astype(np.int64)


def _graph_scores(rows: Callable, sample: np.ndarray, graph: str, scores: str,
                  vectors: str) -> list[str]:
    """The sampled rows' listed scores against the cosines of the rows they link."""
    neighbours, listed = rows(graph, sample), rows(scores, sample)
    valid = neighbours >= 0
    if not valid.any():
        return []
    linked = rows(vectors, neighbours[valid])
    own = np.repeat(rows(vectors, sample), valid.sum(axis=1), axis=0)
    cosines = np.einsum("ij,ij->i", own.astype(np.float64), linked.astype(np.float64))
    off = np.abs(cosines - listed[valid]) > SCORE_TOLERANCE
    if not off.any():
        return []
    where = np.argwhere(valid)[off][:MAX_NAMED]
    named = ", ".join(f"row {sample[i]} lists row {neighbours[i, j]} with score "
                      f"{listed[i, j]:.4f} but their cosine is {c:.4f}"
                      for (i, j), c in zip(where, cosines[off][:MAX_NAMED]))
    return [f"{graph} does not match {vectors} ({int(off.sum())} of {int(valid.sum())} sampled "
            f"scores: {named})"]


def _fused_codes(verified, rows: Callable, sample: np.ndarray) -> list[str]:
    """The sampled fused codes against the fusion model applied to the rows' vectors."""
    import tempfile

    from .fusion.model import load_fusion_model

    def table(name: str, columns: list[str]):
        return parquet_table(f"{verified.root}/{name}", columns, verified.version(name))

    text_ids = table(TXT_ITEMS, ["id"]).column("id").to_pylist()
    fused = table(FUSED_ITEMS, ["id", "has_image"])
    fused_ids = fused.column("id").to_pylist()
    if len(fused_ids) != len(text_ids):
        return [f"{FUSED_ITEMS} has {len(fused_ids)} rows, {TXT_ITEMS} {len(text_ids)}"]
    moved = [int(i) for i in sample if fused_ids[i] != text_ids[i]]
    if moved:
        return [f"{FUSED_ITEMS} and {TXT_ITEMS} name other items at rows {moved[:MAX_NAMED]}"]
    images = table(IMG_ITEMS, ["id", "row"])
    image_row = dict(zip(images.column("id").to_pylist(), images.column("row").to_pylist()))
    has = np.array(fused.column("has_image").to_pylist(), dtype=bool)[sample]
    wanted = [image_row.get(text_ids[i], -1) for i in sample]
    has &= np.array([r >= 0 for r in wanted])
    image = np.zeros((len(sample), npy_layout(f"{verified.root}/{IMG_ARRAY}",
                                              verified.version(IMG_ARRAY)).shape[1]), np.float32)
    if has.any():
        image[has] = rows(IMG_ARRAY, np.array(wanted)[has])
    with tempfile.TemporaryDirectory(prefix="item-embeddings-check-") as tmp, \
            open_pinned(f"{verified.root}/{FUSION_WEIGHTS}",
                        verified.version(FUSION_WEIGHTS)) as src:
        weights = f"{tmp}/{FUSION_WEIGHTS}"
        with open(weights, "wb") as dst:
            dst.write(src.read())
        try:
            model = load_fusion_model(weights)
        except Exception as exc:  # whatever the loader raises, the set is damaged
            return [f"{FUSION_WEIGHTS} cannot be read as a fusion model: {exc}"]
        expected = model.fuse(rows(TXT_ARRAY, sample), image, has)
    off = np.abs(expected - rows(FUSED_ARRAY, sample)).max(axis=1) > CODE_TOLERANCE
    if not off.any():
        return []
    named = [int(i) for i in sample[off][:MAX_NAMED]]
    return [f"{FUSED_ARRAY} does not match the fusion model applied to {TXT_ARRAY} and "
            f"{IMG_ARRAY} at {int(off.sum())} of {len(sample)} sampled rows (e.g. rows {named}, "
            f"items {[text_ids[i] for i in named]})"]
