"""Run the whole pipeline on this machine with ``kfp.local`` and gather its final files."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from ..config import ConfigError, PipelineParams
from ..items import ItemColumns, validate_items
from ..outputs import META_FILES
from ..storage import place_files

logger = logging.getLogger(__name__)

KFP_ROOT = ".kfp"      # kfp.local's pipeline root inside the output directory
RUNS_DIR = "runs"      # the local experiment store inside the output directory


class LocalPipelineError(RuntimeError):
    """A task of the local run failed; its log (printed above by kfp.local) says why."""


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """``output_dir``, absolute and created; a one-line :class:`ConfigError` (exit status 2)
    when it is an existing file or cannot be written, before anything runs."""
    out = Path(output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is an existing file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # permissions, read-only mounts, full disks
            pass
    except OSError as exc:
        raise ConfigError(f"output directory {out} cannot be written: "
                          f"{exc.strerror or exc}") from None
    return out


def run_local(params: PipelineParams, output_dir: str | os.PathLike,
              image: str | None = None, enable_caching: bool = True) -> dict[str, Path]:
    """Run the pipeline with kfp.local (SubprocessRunner, no venv) and place its files in ``output_dir``.

    The output directory and the items table are checked first, so a bad one fails in seconds
    with a clear message.
    Experiment runs go to ``<output_dir>/runs`` unless ``tracking_dir`` says otherwise. With
    caching, a task whose inputs (parameters and the items URI — not the file's contents) match
    an earlier run in the same ``output_dir`` reuses that run's outputs.

    Returns:
        File name -> path of every final file placed flat in ``output_dir``.
    """
    from kfp import local

    from ..components import DEFAULT_IMAGE
    from ..pipeline import build_pipeline

    out = check_output_dir(output_dir)
    validate_items(params.items_uri, ItemColumns.from_params(params), need_image_url=True)
    if params.tracking_backend in ("auto", "local") and not params.tracking_dir:
        params = dataclasses.replace(params, tracking_backend="local",
                                     tracking_dir=str(out / RUNS_DIR))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / KFP_ROOT),
               raise_on_error=True, enable_caching=enable_caching)
    pipeline = build_pipeline("local", image or DEFAULT_IMAGE)
    try:
        task = pipeline(**dataclasses.asdict(params))
    except RuntimeError as exc:  # kfp.local: "Task 'x' finished with status FAILURE" etc.
        raise LocalPipelineError(f"local pipeline run failed: {exc} (the task's log is above; "
                                 f"its files are under {out / KFP_ROOT})") from exc
    placed: dict[str, Path] = {}
    for artifact in task.outputs.values():
        files = sorted(p for p in Path(artifact.path).iterdir() if p.is_file())
        placed.update(place_files(files, out, META_FILES, link=True))
    return placed
