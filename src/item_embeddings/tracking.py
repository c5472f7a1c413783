"""Experiment tracking: one small interface, two real backends.

* :class:`VertexTracker` logs to Vertex AI Experiments (``aiplatform.init`` + ``start_run``). It is
  called from inside the step, so runs started by schedules and UI reruns are logged too.
* :class:`LocalTracker` keeps one JSON file per run under ``<root>/<experiment>/`` — what local
  runs use and what ``item-embeddings runs`` lists.

Example::

    tracker = make_tracker("local", experiment="recsys-dev", tracking_dir="out/runs")
    with tracked_run(tracker, "embed-text-1234") as run:
        run.log_params({"model_name": "all-MiniLM-L6-v2"})
        run.log_metrics({"count": 2000})
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from .config import ConfigError
from .storage import write_json_atomic

logger = logging.getLogger(__name__)

_UNRESOLVED = "{{$."  # a KFP placeholder that the local runner does not resolve
_LOOP_ITERATION = re.compile(r"for-loop-\d+-iteration-\d+")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# Vertex AI Experiments keeps a run as the resource ``<experiment>-<run name>`` of at most 121
# characters (128 less the "-tb-run" suffix of its TensorBoard run; the SDK refuses longer ones).
EXPERIMENT_RUN_MAX = 121
_HASH_CHARS = 8      # what keeps two shortened names apart
_TAIL_CHARS = 12     # the end of a shortened name kept readable: "-shard-00003"


def run_name(step: str, run_id: str, experiment: str = "") -> str:
    """``embed-text-<run id>`` in the form Vertex accepts: lowercase, digits, hyphens, and with
    ``experiment`` within Vertex's 121 characters. A longer name (a long pipeline job id) keeps
    its start and its last characters (the shard) around a hash of the whole name, so it stays
    the same on every retry of the task and differs between steps and shards."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{step}-{run_id}".lower()).strip("-")
    limit = min(128, EXPERIMENT_RUN_MAX - (len(experiment) + 1 if experiment else 0))
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    tail = name[-_TAIL_CHARS:].strip("-")
    head = name[:max(1, limit - len(digest) - len(tail) - 2)].rstrip("-")
    return f"{head}-{digest}-{tail}"


def run_id_from_output_uri(uri: str) -> str:
    """The pipeline run an output artifact belongs to, read from its path.

    KFP lays outputs out as ``<root>/<pipeline job>/<task>/<output>`` locally and
    ``<root>/<project number>/<pipeline job>/<task>_<id>/<output>`` on Vertex, so the run is the
    directory two levels above the output; kfp.local nests the tasks of a loop in
    ``for-loop-N-iteration-I`` folders, which are skipped. Components use this instead of a
    run-id input, which would change every run and defeat caching.
    """
    parts = [p for p in uri.rstrip("/").split("/")
             if p and not _LOOP_ITERATION.fullmatch(p)]
    return parts[-3] if len(parts) >= 3 else ""


class ExperimentTracker(Protocol):
    def start_run(self, name: str) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float]) -> None: ...
    def log_artifact(self, name: str, uri: str) -> None: ...
    def end_run(self, status: str = "COMPLETE") -> None: ...


class NullTracker:
    """Tracking switched off (``tracking_backend='none'``)."""

    def start_run(self, name: str) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float]) -> None: ...
    def log_artifact(self, name: str, uri: str) -> None: ...
    def end_run(self, status: str = "COMPLETE") -> None: ...


class LocalTracker:
    """One JSON file per run: ``<root>/<experiment>/<run>.json``, rewritten atomically on change."""

    def __init__(self, root: str | Path, experiment: str):
        self.root = Path(root)
        self.experiment = experiment
        self._record: dict[str, Any] | None = None
        self._path: Path | None = None

    def start_run(self, name: str) -> None:
        self._path = self.root / self.experiment / f"{name}.json"
        self._record = {"experiment": self.experiment, "run_name": name, "status": "RUNNING",
                        "start_time": _now(), "end_time": None, "params": {}, "metrics": {},
                        "artifacts": {}}
        self._flush()

    def _flush(self) -> None:
        assert self._record is not None and self._path is not None, "start_run() first"
        write_json_atomic(self._path, self._record)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._record["params"].update(params)
        self._flush()

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._record["metrics"].update({k: float(v) for k, v in metrics.items()})
        self._flush()

    def log_artifact(self, name: str, uri: str) -> None:
        self._record["artifacts"][name] = uri
        self._flush()

    def end_run(self, status: str = "COMPLETE") -> None:
        self._record.update(status=status, end_time=_now())
        self._flush()


class VertexTracker:
    """Vertex AI Experiments through ``google.cloud.aiplatform``."""

    def __init__(self, project: str, location: str, experiment: str):
        self.project = project
        self.location = location
        self.experiment = experiment
        self._run = None

    def start_run(self, name: str) -> None:
        from google.api_core.exceptions import AlreadyExists
        from google.cloud import aiplatform

        # No backing TensorBoard: without experiment_tensorboard=False the SDK creates a
        # project-default TensorBoard (and its resources) and assigns it to the experiment.
        init = dict(project=self.project, location=self.location, experiment=self.experiment,
                    experiment_tensorboard=False)
        try:
            aiplatform.init(**init)
        except AlreadyExists:
            # The steps start together: another one created the experiment between this
            # one's lookup and its create. It exists now, so a second lookup finds it.
            logger.info("experiment %s was created concurrently; using it", self.experiment)
            aiplatform.init(**init)
        try:
            self._run = aiplatform.start_run(name, resume=False)
        except RuntimeError as exc:
            # A retried task (Spot preemption) has the same run name: continue that run.
            if "already exists" not in str(exc):
                raise
            logger.info("experiment run %s exists (a retried task): resuming it", name)
            self._run = aiplatform.start_run(name, resume=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from google.cloud import aiplatform

        # Experiments accept str/int/float params only.
        aiplatform.log_params({k: v if isinstance(v, (int, float, str)) else str(v)
                               for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        from google.cloud import aiplatform

        aiplatform.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifact(self, name: str, uri: str) -> None:
        from google.cloud import aiplatform

        aiplatform.log_params({f"artifact_{name}": uri})

    def end_run(self, status: str = "COMPLETE") -> None:
        from google.cloud import aiplatform
        from google.cloud.aiplatform.compat.types import execution

        aiplatform.end_run(state=getattr(execution.Execution.State, status))


def _known(value: str) -> bool:
    return bool(value) and _UNRESOLVED not in value


def make_tracker(backend: str, *, experiment: str, project: str = "", location: str = "",
                 tracking_dir: str = "") -> ExperimentTracker:
    """Pick the backend. ``auto``: Vertex when a project is known, else local if
    ``tracking_dir``."""
    if backend == "auto":
        backend = "vertex" if _known(project) else ("local" if tracking_dir else "none")
    if backend == "vertex":
        if not (_known(project) and _known(location)):
            raise ConfigError("tracking_backend 'vertex' needs a Google Cloud project and location")
        return VertexTracker(project, location, experiment)
    if backend == "local":
        if not tracking_dir:
            raise ConfigError("tracking_backend 'local' needs tracking_dir")
        return LocalTracker(tracking_dir, experiment)
    if backend == "none":
        return NullTracker()
    raise ConfigError(f"unknown tracking_backend {backend!r} (vertex, local, none or auto)")


@contextlib.contextmanager
def tracked_run(tracker: ExperimentTracker, name: str) -> Iterator[ExperimentTracker]:
    """Start a run; end it COMPLETE on success and FAILED (then re-raise) on error."""
    tracker.start_run(name)
    try:
        yield tracker
    except BaseException:
        tracker.end_run("FAILED")
        raise
    tracker.end_run("COMPLETE")


def write_metrics_artifact(metrics, prefix: str, values: Mapping[str, float]) -> None:
    """Log ``values`` on a KFP ``Metrics`` output as ``<prefix>_<key>`` and write them to its file.

    The prefix keeps steps apart in the one experiment row Vertex merges them into. The file
    matters too: kfp.local's cache treats an output artifact without a file as missing, so a
    step whose Metrics had no file could never be served from the cache.
    """
    for key, value in values.items():
        metrics.log_metric(f"{prefix}_{key}", float(value))
    os.makedirs(os.path.dirname(metrics.path) or ".", exist_ok=True)
    write_json_atomic(metrics.path, metrics.metadata)


def list_local_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run in a local store, oldest first."""
    runs = []
    for path in sorted(Path(root).glob("*/*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("skipping unreadable run file %s", path)
            continue
        record["path"] = str(path)
        runs.append(record)
    runs.sort(key=lambda r: (r.get("start_time") or "", r.get("run_name") or ""))
    return runs
