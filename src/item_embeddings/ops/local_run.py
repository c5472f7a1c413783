"""Run the whole pipeline on this machine with ``kfp.local`` and gather its final files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

from .. import runtime
from ..config import ConfigError, PipelineParams, check_machines
from ..errors import ItemEmbeddingsError
from ..incremental import check_previous_set
from ..items import ItemColumns, validate_items
from ..outputs import META_FILES
from ..storage import place_files
from .console import RunConsole

logger = logging.getLogger(__name__)

KFP_ROOT = ".kfp"      # kfp.local's pipeline root inside the output directory
RUNS_DIR = "runs"      # the local experiment store inside the output directory
RUN_LOG = "run.log"    # the full output of the last run (kfp.local's and its tasks')


class LocalPipelineError(ItemEmbeddingsError, RuntimeError):
    """A task of the local run failed; the console showed its last lines, the run log has all."""


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


def check_params(params: PipelineParams) -> None:
    """What a run's parameters ask for that no value check alone can refuse, before anything
    runs: machines Vertex would not pair (the same file configures local and Vertex runs) and a
    ``previous_uri`` that is not an output set."""
    check_machines(params)
    check_previous_set(params.previous_uri,
                       ("text", "image", "fusion") if params.fusion_mode == "apply"
                       else ("text", "image"))


def needs_model_hub(params: PipelineParams) -> bool:
    """Whether a step downloads weights from the model hub: ``text_model`` is a hub id (not a
    directory, nor the packaged all-MiniLM-L6-v2), or ``image_pretrained`` is an open_clip
    pretrained tag (tags are plain words; a name with '/' or '.' is a file). Decided without
    importing open_clip, which takes seconds."""
    from ..text.models import is_hub_id

    tag = params.image_pretrained.strip()
    image_tag = tag.lower() not in ("", "none") and not any(c in tag for c in "/.\\")
    return image_tag or is_hub_id(params.text_model)


def probe_hub(console: RunConsole) -> bool:
    """One short connection attempt to the model hub; says so when it fails."""
    online = runtime.hub_reachable()
    if not online:
        console.say(f"model hub {runtime.hub_endpoint()} did not answer one "
                    f"{runtime.HUB_PROBE_TIMEOUT_S:.0f} s connection attempt: this run uses hub "
                    "offline mode (model weights from the local cache only)")
    return online


def run_local(params: PipelineParams, output_dir: str | os.PathLike,
              image: str | None = None, enable_caching: bool = True, *,
              console: RunConsole | None = None, hub_online: bool | None = None
              ) -> dict[str, Path]:
    """Run the pipeline with kfp.local (SubprocessRunner, no venv); place its files in
    ``output_dir``.

    The output directory and the items table are checked first, so a bad one fails in seconds
    with a clear message.
    Experiment runs go to ``<output_dir>/runs`` unless ``tracking_dir`` says otherwise. With
    caching, a task whose inputs match a finished task of an earlier run in the same
    ``output_dir`` reuses that task's outputs: its parameters, and the contents of the items
    table and of the previous set (hashed by the never-cached fingerprint task). So a failed run,
    rerun into the same folder, resumes at the task that failed.
    The console shows each task's start, end and progress lines and a closing summary; the full
    output goes to ``<output_dir>/run.log`` (see :mod:`.console`).

    Args:
        console: The run's console, if the caller opened it (the demo says things first);
            else one is opened on ``<output_dir>/run.log``.
        hub_online: Whether the model hub answered (the demo has asked); None: ask it once if
            the run needs it. When it did not, the run uses hub offline mode, so no task spends
            a minute on download retries.

    Returns:
        File name -> path of every final file placed flat in ``output_dir``.
    """
    from kfp import local

    from ..components import DEFAULT_IMAGE
    from ..pipeline import build_pipeline

    check_params(params)
    out = check_output_dir(output_dir)
    validate_items(params.items_uri, ItemColumns.from_params(params), need_image_url=True)
    if params.tracking_backend in ("auto", "local") and not params.tracking_dir:
        params = dataclasses.replace(params, tracking_backend="local",
                                     tracking_dir=str(out / RUNS_DIR))
    with contextlib.ExitStack() as stack:
        if console is None:
            console = stack.enter_context(RunConsole(out / RUN_LOG))
        console.log("parameters: " + json.dumps(dataclasses.asdict(params), sort_keys=True))
        if hub_online is None and needs_model_hub(params):
            hub_online = probe_hub(console)
        if hub_online is False:
            stack.enter_context(runtime.hub_offline())
        try:
            with console.capture():
                local.init(runner=local.SubprocessRunner(use_venv=False),
                           pipeline_root=str(out / KFP_ROOT), raise_on_error=True,
                           enable_caching=enable_caching)
                task = build_pipeline("local", image or DEFAULT_IMAGE)(
                    **dataclasses.asdict(params))
        except RuntimeError as exc:  # kfp.local: "Task 'x' finished with status FAILURE" etc.
            raise LocalPipelineError(
                f"local pipeline run failed: {console.failure(str(exc))} (full log: "
                f"{console.log_path}; the tasks' files are under {out / KFP_ROOT})") from exc
        placed: dict[str, Path] = {}
        for artifact in task.outputs.values():
            files = sorted(p for p in Path(artifact.path).iterdir() if p.is_file())
            # copies: a placed file edited in place must not edit the cached artifact
            placed.update(place_files(files, out, META_FILES))
        console.summary(out, placed, _where_else(params, out))
    return placed


def _where_else(params: PipelineParams, out: Path) -> dict[str, str]:
    """The summary's lines for the experiment runs and kfp.local's own files."""
    where = {}
    if params.tracking_backend == "local":
        runs = Path(params.tracking_dir)
        hint = (f" (list them: item-embeddings runs --output-dir {out})"
                if runs.resolve() == out / RUNS_DIR else "")
        where["experiment runs"] = f"{runs}{hint}"
    where["kfp.local artifacts"] = str(out / KFP_ROOT)
    return where
