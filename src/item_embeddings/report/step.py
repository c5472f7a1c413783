"""The QA report of a run: ``write_qa_report`` reads, samples, draws and writes the page."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..config import PipelineParams
from ..outputs import REPORT_META
from ..storage import atomic_path, file_record, write_json_atomic
from .analysis import analyse_run
from .inputs import load_run_inputs
from .page import SECTIONS, render_page

logger = logging.getLogger(__name__)


def write_qa_report(items_uri: str, text_dir: str | os.PathLike, image_dir: str | os.PathLike,
                    fused_dir: str | os.PathLike, knn_dir: str | os.PathLike | None,
                    output_path: str | os.PathLike, params: PipelineParams = PipelineParams(),
                    *, run_id: str = "") -> dict[str, Any]:
    """Write the QA report of a finished run as one self-contained HTML file, then its record
    ``report_meta.json`` beside it (the page's size and sha256 and the run ids of the groups it
    was made from: ``verify`` proves with it that the page is this set's).

    Args:
        items_uri: The items table the run embedded (parquet file or folder, local or gs://).
        text_dir: The text step's output directory.
        image_dir: The image step's output directory.
        fused_dir: The fusion step's output directory.
        knn_dir: The kNN step's output directory; None, empty or without ``knn_meta.json``:
            no recall figures, and the neighbour table uses exact neighbours (brute force).
        output_path: Where ``qa_report.html`` is written (atomically; ``report_meta.json``
            beside it, last).
        params: Pipeline parameters; the report reads ``id_column``, ``title_column``,
            ``category_column`` and ``seed`` (sampling), and lists them all.
        run_id: The pipeline run shown in the title (default: the fusion step's).

    Returns:
        ``path``, ``size_bytes``, ``sections`` (ids of the page's sections), ``neighbours``
        ('graph' or 'exact'), ``has_categories``, ``render_time_sec`` and ``drift`` (per kNN
        space, the night-over-night drift of knn_meta.json; empty without a previous set).

    Raises:
        ReportInputError: a step output is missing or does not line up with the others.
        ItemsError: the items table cannot be read or lacks the id or title column.
    """
    started = time.perf_counter()
    findings = analyse_run(load_run_inputs(text_dir, image_dir, fused_dir, knn_dir), items_uri,
                           params)
    inputs = findings.inputs
    run_id = run_id or inputs.fusion_meta.get("run_id", "")
    page = render_page(findings, params, run_id=run_id, items_uri=items_uri, started=started)
    with atomic_path(output_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    size = Path(output_path).stat().st_size
    elapsed = time.perf_counter() - started
    logger.info("QA report of %d items: %s (%.2f MB) in %.1fs", findings.inputs.count,
                output_path, size / 1e6, elapsed)
    drift = inputs.knn.drift if inputs.knn is not None else {}
    summary = {"sections": [k for k, _ in SECTIONS], "neighbours": findings.neighbours.source,
               "has_categories": findings.items.categories is not None,
               "render_time_sec": elapsed, "drift": drift}
    write_json_atomic(Path(output_path).with_name(REPORT_META), {
        "run_id": run_id, "count": inputs.count, **summary,
        "text_run_id": inputs.text_meta.get("run_id"),
        "image_run_id": inputs.image_meta.get("run_id"),
        "fusion_run_id": inputs.fusion_meta.get("run_id"),
        "knn_run_id": inputs.knn.meta.get("run_id") if inputs.knn is not None else None,
        "files": {Path(output_path).name: file_record(output_path)}})
    return {"path": str(output_path), "size_bytes": size, **summary}
