"""What every step shares: a run id, an experiment run, timing, the meta file written last.

A step states once what it is (:class:`StepKind`: its run's name, its output, its meta file,
which of its settings are the run's parameters, which meta keys are its metrics), and its
function then reads as its own work::

    TEXT_STEP = StepKind("embed-text", artifact="text_embeddings", meta_file=TXT_META,
                         metric_keys=("count", ...), versions=("torch", ...),
                         logged_params={"model_name": "encoder_name", ...})

    def embed_items_text(...):
        ...                                 # validate the inputs before any model loads
        with TEXT_STEP.run(output_dir, settings, run_id=run_id, tracker=tracker) as run:
            ...                             # write the step's files into run.out
            return run.finish_step(meta)    # meta file last, then the metrics it holds

The experiment run is named ``<step>-<run id>``; it ends FAILED (and the error propagates) when
the block raises, COMPLETE otherwise. The meta file records, under ``files``, the size and sha256
of every file the step wrote into its directory, so ``verify`` can prove that no array row or id
was moved, and no file swapped for another run's, after the step finished. The metrics are
taken from the meta file as written, by :meth:`StepKind.metrics`, which is also what the step's
component reports on its ``Metrics`` artifact: the experiment run and the pipeline's metrics
hold the same values.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runtime import package_versions
from .storage import file_record, write_json_atomic
from .tracking import ExperimentTracker, NullTracker, run_name, tracked_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepKind:
    """What a kind of step is, stated once for the step, its merge and its component."""

    name: str                   # e.g. "embed-text": the experiment run is "<name>-<run id>"
    artifact: str               # the output's name in the experiment run
    meta_file: str              # written last: its presence means the step's files are whole
    metric_keys: tuple[str, ...]  # the meta keys that are the step's metrics
    # the experiment run's parameters: logged name -> the key of the step's settings (the
    # names its meta file records them under)
    logged_params: Mapping[str, str] = field(default_factory=dict)
    versions: tuple[str, ...] = ()  # packages whose versions the meta file records
    # metrics made from nested meta fields (the kNN spaces, the text quality gate)
    nested_metrics: Callable[[Mapping[str, Any]], Mapping[str, float]] | None = None

    def metrics(self, meta: Mapping[str, Any]) -> dict[str, float]:
        """The step's metrics, from its meta: the keys a mode does not produce (a loss when
        the fusion model is applied, not trained) are left out."""
        values = {key: meta[key] for key in self.metric_keys if meta.get(key) is not None}
        if self.nested_metrics is not None:
            values.update(self.nested_metrics(meta))
        return values

    def params(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The experiment run's parameters, taken from the step's ``settings``."""
        return {name: settings[key] for name, key in self.logged_params.items()}

    @contextlib.contextmanager
    def run(self, output_dir: str | Path, settings: Mapping[str, Any], *, run_id: str = "",
            tracker: ExperimentTracker | None = None, artifact_uri: str = "",
            **more_params: Any) -> Iterator[StepRun]:
        """:func:`step_run` for this kind of step, logging the parameters of its ``settings``
        (and ``more_params``); finish it with :meth:`StepRun.finish_step`."""
        with step_run(self.name, output_dir, params={**self.params(settings), **more_params},
                      artifact=self.artifact, run_id=run_id, tracker=tracker,
                      artifact_uri=artifact_uri) as run:
            run.kind = self
            yield run


@dataclass
class StepRun:
    """One running step: where it writes, what it logs to, and since when it runs."""

    name: str                   # e.g. "embed-text": the experiment run is "<name>-<run_id>"
    run_id: str                 # the pipeline run this step belongs to
    out: Path                   # the directory the step writes its files into
    tracker: ExperimentTracker
    artifact: str               # the output's name in the experiment run
    artifact_uri: str           # the output's URI in the experiment run (default: ``out``)
    started: float = field(default_factory=time.perf_counter)
    # The directory's files when the step began: what differs at the end is what the step wrote.
    before: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    kind: StepKind | None = None  # set when started by StepKind.run

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish_step(self, meta: Mapping[str, Any], *, versions: Sequence[str] | None = None
                    ) -> dict[str, Any]:
        """:meth:`finish` as the step's kind says: its meta file, the metrics its meta holds
        (wall time included), its packages' versions (or ``versions``)."""
        kind = self.kind
        return self.finish(kind.meta_file, meta, metrics=kind.metrics,
                           versions=kind.versions if versions is None else versions)

    def finish(self, meta_file: str, meta: Mapping[str, Any], *,
               metrics: Mapping[str, float] | Callable[[Mapping[str, Any]], Mapping[str, float]],
               versions: Sequence[str] = ()) -> dict[str, Any]:
        """Write ``meta`` (plus the written files' sizes and hashes, run id, wall time and package
        versions) as the step's meta file, last, then log ``metrics`` (or those it makes of the
        meta as written) and the output artifact. Returns what was written."""
        hashing = time.perf_counter()
        written_now = [name for name, sig in sorted(_file_signatures(self.out).items())
                       if name != meta_file and self.before.get(name) != sig]
        files = {name: file_record(self.out / name) for name in written_now}
        logger.info("%s: hashed %d file(s), %s bytes, in %.1f s", self.name, len(files),
                    f"{sum(f['size'] for f in files.values()):,d}", time.perf_counter() - hashing)
        written = {**meta, "files": files, "run_id": self.run_id, "wall_time_sec": self.elapsed,
                   "versions": package_versions(*versions)}
        write_json_atomic(self.out / meta_file, written)
        self.tracker.log_metrics(metrics(written) if callable(metrics) else metrics)
        self.tracker.log_artifact(self.artifact, self.artifact_uri or str(self.out))
        return written


@contextlib.contextmanager
def step_run(name: str, output_dir: str | Path, *, params: Mapping[str, Any], artifact: str,
             run_id: str = "", tracker: ExperimentTracker | None = None,
             artifact_uri: str = "") -> Iterator[StepRun]:
    """Create ``output_dir``, start the experiment run ``<name>-<run id>`` and log ``params``.

    Args:
        name: The step's name (``embed-text``, ``embed-image``, ``fuse-modal``).
        output_dir: Directory for the step's files (created).
        params: What the experiment run records as the step's parameters.
        artifact: Name under which the output is logged.
        run_id: Pipeline run id; a fresh one when empty.
        tracker: Experiment tracker; none logs nothing.
        artifact_uri: The output's durable URI (a ``gs://`` artifact on Vertex), if not
            ``output_dir`` itself.
    """
    run = StepRun(name=name, run_id=run_id or uuid.uuid4().hex[:12], out=Path(output_dir),
                  tracker=tracker or NullTracker(), artifact=artifact,
                  artifact_uri=artifact_uri)
    run.out.mkdir(parents=True, exist_ok=True)
    run.before = _file_signatures(run.out)
    experiment = getattr(run.tracker, "experiment", "")  # Vertex counts both in one limit
    with tracked_run(run.tracker, run_name(name, run.run_id, experiment)):
        run.tracker.log_params(params)
        yield run


def _file_signatures(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Name -> (inode, mtime, size) of the plain files of ``directory``; hidden files are the
    temporaries of atomic writes, sub-folders (the image step's shards) are not outputs."""
    signatures = {}
    for path in directory.iterdir():
        if not path.name.startswith(".") and path.is_file():
            st = path.stat()
            signatures[path.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return signatures
