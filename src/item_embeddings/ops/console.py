"""What a local run shows: a few lines per step on the console, everything in the run log.

kfp.local (2.17) writes all of its output through Python objects, none straight to file
descriptors: its log records go to a ``logging`` handler on ``sys.stdout`` (created anew around
each message, so it finds whatever ``sys.stdout`` is then), and records outside those blocks
(cache hits, skipped tasks) go to the root logger; each task runs in a subprocess whose stdout
and stderr share one pipe, whose lines the parent ``print``s, indented by four spaces, to
``sys.stdout``; its warnings go to ``sys.stderr``. While :meth:`RunConsole.capture` is active,
both streams are line splitters and the root logger has a handler of its own: every line goes to
the run log and through a small parser, which puts on the console

* each task's start, end (with its wall time), failure, cache hit, skip or retry;
* what the task logged through the ``item_embeddings`` logger (progress lines included);
* kfp.local's own warnings and errors;
* on a failure, the last lines the failed task printed, and where the full log is.

Everything else (executor input/output JSON, library chatter, tracebacks) is in the log only.

The shard workers of a ``ParallelFor`` run two at a time, each in a thread of kfp.local that logs
the task's start and prints its subprocess's lines; so a line belongs to the task its thread
started, and partial writes are joined per thread. Workers share a task name: the second
``embed-text`` is shown as ``embed-text#2``, and the summary gives each name one row.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import re
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..outputs import GROUPS, META_FILES, QA_REPORT

TAIL_LINES = 20    # lines of a failed task's output shown on the console
_INDENT = "    "   # kfp.local's indent of a task's streamed lines

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's records ("12:00:01.234 - INFO - message"); ours of the root logger look the same.
_KFP_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} - ([A-Z]+) - (.*)$")
_KFP_FORMAT = logging.Formatter("%(asctime)s.%(msecs)03d - %(levelname)s - %(message)s",
                                datefmt="%H:%M:%S")
# A line of the item_embeddings logger inside a task (item_embeddings.progress.LOG_FORMAT).
_STEP_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) "
                          r"item_embeddings(?:\.[\w.]+)?: (.*)$")
_CARETS = re.compile(r"^\s*[\^~]+\s*$")  # a traceback's markers under the failing expression
_TRACEBACK = "Traceback (most recent call last):"
# What a task process prints while it shuts down after its error: asyncio tasks and aiohttp
# sessions it left behind, and exceptions Python could not raise ("Exception ignored in:", each
# with a traceback of its own). It would push the task's own error out of the shown tail.
_SHUTDOWN_NOISE = re.compile(r"^(Task was destroyed but it is pending!|Exception ignored in: |"
                             r"Unclosed client session|Unclosed connector|"
                             r"Future exception was never retrieved|"
                             r"(task|client_session|connector|connections|future): [<\[])")
# kfp.local's message for a failed pipeline names the task through its enclosing DAGs
_INNER_TASK = re.compile(r"Inner task failed: '([^']+)'")
_QUALIFIED = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )")  # an exception's module
_FAILED_TASK = re.compile(r"^Task '([^']+)' finished with status FAILURE")
_EXECUTING = re.compile(r"^Executing task '([^']+)'$")
_FINISHED = re.compile(r"^Task '([^']+)' finished with status (\w+)")
_CACHE_HIT = re.compile(r"^Task (\S+) cache hit\b")
_RETRY = re.compile(r"^Task (\S+) failed \(attempt .*")
_SKIPPED = re.compile(r"^Skipping (?:conditional )?task (\S+?):? (.*)$")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (kfp.local colours task names and statuses)."""
    return _ANSI.sub("", text)


@dataclass
class TaskRecord:
    """One execution of a task as the console saw it."""

    name: str
    label: str = ""                    # name, or name#k for its k-th execution (shard workers)
    status: str = "running"            # running, done, failed, cached, skipped
    started: float | None = None       # the console's clock
    ended: float | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    error: str = ""                    # the exception line of its last traceback
    traceback: list[str] = field(default_factory=list)  # that traceback, as printed
    _reading: str = ""                 # "", "traceback", "ignored" (an unraisable's lines)

    @property
    def seconds(self) -> float | None:
        """Wall time, start to end (the task process's start included)."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    def add(self, line: str) -> None:
        """One line of the task's output: the tail keeps the last lines but the shutdown noise;
        the task's own traceback (not those of "Exception ignored in:") is kept whole."""
        if not line.strip() or _CARETS.match(line):
            return
        if _SHUTDOWN_NOISE.match(line):
            if line.startswith("Exception ignored in: "):
                self._reading = "ignored"  # its traceback and exception line follow
            return
        indented = line.startswith((" ", "\t"))
        if self._reading == "ignored":
            if not indented and not line.startswith(_TRACEBACK):
                self._reading = ""  # the ignored exception's own line: the block's last
            return
        if line.startswith(_TRACEBACK):
            self._reading, self.traceback = "traceback", [line]
        elif self._reading == "traceback":
            self.traceback.append(line)
            if not indented:  # frames are indented; the exception line is not
                # "pkg.module.SomeError: ..." reads as "SomeError: ..." on the console
                self.error, self._reading = _QUALIFIED.sub("", line, count=1), ""
        else:
            self.tail.append(line)

    def shown(self) -> list[str]:
        """What the console shows of a failed task: the end of its traceback (the error
        last), else the last lines it printed."""
        return self.traceback[-TAIL_LINES:] if self.traceback else list(self.tail)


class _LineSplitter(io.TextIOBase):
    """A text stream that hands each complete line to ``sink``, in the thread that wrote it
    (stands in for sys.stdout/err; a line's parts are joined per thread)."""

    def __init__(self, sink: Callable[[str], None]):
        super().__init__()
        self._sink = sink
        self._pending: dict[int, str] = {}
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._lock:
            lines = (self._pending.pop(thread, "") + text).split("\n")
            if lines[-1]:
                self._pending[thread] = lines[-1]
        for line in lines[:-1]:
            self._sink(line)
        return len(text)

    def finish(self) -> None:
        """Hand over the last lines that have no newline."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for line in pending:
            self._sink(line)


class RunConsole:
    """The console and the log file of one local run.

    Use as a context manager (it creates ``log_path``, replacing an earlier run's log, and says
    where it is), :meth:`say` for the command's own lines, and :meth:`capture` around kfp.local.
    Console lines go to ``sys.stdout`` (a failed task's last lines to ``sys.stderr``) as they are
    when the console is entered, before :meth:`capture` replaces them.

    Args:
        log_path: The run log (``<output dir>/run.log``).
        clock: Seconds for the tasks' wall times (tests pass a fake one).
    """

    def __init__(self, log_path: str | Path, clock: Callable[[], float] = time.monotonic):
        self.log_path = Path(log_path)
        self._out: TextIO = sys.stdout
        self._err: TextIO = sys.stderr
        self._clock = clock
        self._log: TextIO | None = None
        self._lock = threading.RLock()
        self._tasks: list[TaskRecord] = []
        self._running: dict[int, TaskRecord] = {}   # thread -> the task it runs
        self.started = clock()

    def __enter__(self) -> RunConsole:
        self._out, self._err = sys.stdout, sys.stderr
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # line-buffered: a run that is killed leaves its log up to the last line
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace", buffering=1)
        self.log(f"# item-embeddings local run, started {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
        self.started = self._clock()
        self.say(f"full log of this run: {self.log_path}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def tasks(self) -> list[TaskRecord]:
        """The task executions seen so far, in the order they started (or were cached or
        skipped)."""
        return list(self._tasks)

    def elapsed(self) -> float:
        """Seconds since the console was entered."""
        return self._clock() - self.started

    def say(self, text: str, error: bool = False) -> None:
        """Show ``text`` on the console (stderr when ``error``) and write it to the log."""
        with self._lock:
            stream = self._err if error else self._out
            stream.write(text + "\n")  # not print(), which kfp.local patches while tasks run
            stream.flush()
            self.log(text)

    def log(self, text: str) -> None:
        """Write ``text`` to the log only."""
        if self._log is not None:
            self._log.write(text + "\n")

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Route kfp.local's output (see the module docstring) through this console."""
        splitters = [_LineSplitter(self.feed), _LineSplitter(self.feed)]
        root = logging.getLogger()
        handler = logging.StreamHandler(splitters[0])
        handler.setFormatter(_KFP_FORMAT)
        saved_root = list(root.handlers), root.level
        saved_streams, saved_print = (sys.stdout, sys.stderr), builtins.print
        sys.stdout, sys.stderr = splitters
        root.addHandler(handler)
        root.setLevel(logging.INFO)  # kfp.local's cache hits and skips are INFO records
        try:
            yield
        finally:
            # kfp.local's threads swap the root handlers and builtins.print without a lock (shard
            # workers): what it leaves behind is put back as it was, not just ours removed
            root.handlers[:], level = saved_root
            root.setLevel(level)
            sys.stdout, sys.stderr = saved_streams
            builtins.print = saved_print
            for splitter in splitters:
                splitter.finish()

    def feed(self, raw: str) -> None:
        """One line of kfp.local's output, in the thread that wrote it: to the log, and what
        matters to the console."""
        with self._lock:
            line = strip_ansi(raw)  # kfp.local colours names and statuses, for terminals
            self.log(line)
            line = line.rstrip("\r")
            record = _KFP_RECORD.match(line)
            task = self._running.get(threading.get_ident())
            if record:
                self._kfp_record(record.group(1), record.group(2))
            elif task is not None:
                self._task_line(task, line[len(_INDENT):] if line.startswith(_INDENT) else line)

    def _stamp(self) -> str:
        return time.strftime("%H:%M:%S")

    def _new(self, name: str, status: str) -> TaskRecord:
        """A new execution of task ``name`` (labelled name#k from its second one on)."""
        k = 1 + sum(t.name == name for t in self._tasks)
        task = TaskRecord(name, name if k == 1 else f"{name}#{k}", status)
        self._tasks.append(task)
        return task

    def _kfp_record(self, level: str, message: str) -> None:
        if m := _EXECUTING.match(message):
            task = self._new(m.group(1), "running")
            task.started = self._clock()
            self._running[threading.get_ident()] = task
            self.say(f"{self._stamp()} {task.label}: started")
        elif m := _FINISHED.match(message):
            task = self._running.pop(threading.get_ident(), None)
            if task is None or task.name != m.group(1):  # not from the task's thread
                task = next((t for t in reversed(self._tasks)
                             if t.name == m.group(1) and t.status == "running"),
                            None) or self._new(m.group(1), "running")
            self._finished(task, m.group(2))
        elif m := _CACHE_HIT.match(message):
            task = self._new(m.group(1), "cached")
            self.say(f"{self._stamp()} {task.label}: reused from the cache of an earlier run")
        elif m := _SKIPPED.match(message):
            task = self._new(m.group(1), "skipped")
            self.say(f"{self._stamp()} {task.label}: skipped ({m.group(2).strip('()')})")
        elif _RETRY.match(message) or level in ("WARNING", "ERROR", "CRITICAL"):
            self.say(f"{self._stamp()} kfp.local {level}: {message}")

    def _finished(self, task: TaskRecord, status: str) -> None:
        task.ended = self._clock()
        took = f" in {task.seconds:.1f} s" if task.seconds is not None else ""
        if status == "SUCCESS":
            task.status = "done"
            self.say(f"{self._stamp()} {task.label}: done{took}")
            return
        task.status = "failed"
        shown = task.shown()
        self.say(f"{self._stamp()} {task.label}: FAILED{took}; the last {len(shown)} lines "
                 "of its output:", error=True)
        for line in shown:
            self.say(f"  | {line}", error=True)
        self.say(f"full log: {self.log_path}", error=True)

    def failure(self, kfp_message: str) -> str:
        """The failed run in one line: the failed task by its name and its exception, rather
        than kfp.local's "Inner task failed: 'x' inside 'for-loop-1-iteration-0' inside ...".
        """
        message = strip_ansi(kfp_message)
        named = _INNER_TASK.search(message) or _FAILED_TASK.search(message)
        failed = [t for t in self._tasks if t.status == "failed"]
        task = next((t for t in failed if named and t.name == named.group(1)),
                    failed[-1] if failed else None)
        if task is None:
            return message
        return f"task {task.name} failed: {task.error or 'see its output above'}"

    def _task_line(self, task: TaskRecord, line: str) -> None:
        task.add(line)
        step = _STEP_RECORD.match(line.strip())
        if step is None:
            return
        level, message = step.groups()
        shown = message if level == "INFO" else f"{level} {message}"
        self.say(f"{self._stamp()} {task.label} | {shown}")

    def summary(self, out: Path, placed: Mapping[str, Path], extra: Mapping[str, str]) -> None:
        """Say the closing summary (see :func:`summary_lines`)."""
        for line in summary_lines(self.tasks, out, placed, self.log_path, self.elapsed(), extra):
            self.say(line)


def meta_counts(meta: Mapping[str, Any]) -> list[str]:
    """The counts in a step's meta file, read generically: ``count`` (the step's rows), every
    ``*_count`` and every ``*_by_reason`` breakdown. (Wall times come from the tasks: a meta
    file assembled from shard workers records the merge's.)"""
    parts = [f"{meta['count']:,d} rows" if isinstance(meta.get("count"), int) else "rows: ?"]
    for key, value in meta.items():
        if key.endswith("_count") and isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{key[:-len('_count')].replace('_', ' ')} {value:,d}")
        elif key.endswith("_by_reason") and isinstance(value, Mapping) and value:
            reasons = ", ".join(f"{reason} {n:,d}" for reason, n in sorted(value.items()))
            parts.append(f"{key[:-len('_by_reason')].replace('_', ' ')} by reason: {reasons}")
    return parts


def unavailable_hosts_lines(meta: Mapping[str, Any], width: int, shown: int = 5) -> list[str]:
    """The image hosts whose circuit breaker opened (``unavailable_hosts`` of img_meta.json),
    named with the images they cost; [] when there are none."""
    hosts = meta.get("unavailable_hosts")
    if not isinstance(hosts, Mapping) or not hosts:
        return []
    parts = [f"{host} ({n:,d} images)" for host, n in list(hosts.items())[:shown]]
    if len(hosts) > shown:
        parts.append(f"and {len(hosts) - shown} more")
    head = ("image hosts not answering (circuit breaker opened; their other images were not "
            "requested, reason host_unavailable, and are retried by the next run): ")
    return _wrap(parts, width, head, "  ")


def _wrap(parts: list[str], width: int, first: str, indent: str) -> list[str]:
    """``parts`` joined by ", " into lines of at most ``width`` (a part is never split)."""
    lines, line = [], first
    for i, part in enumerate(parts):
        piece = part + ("," if i < len(parts) - 1 else "")
        if line not in (first, indent) and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = indent
        line += piece if line in (first, indent) else " " + piece
    return lines + [line]


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,d} bytes"
    value, unit = n / 1024, "KB"
    for larger in ("MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"


def _step_row(runs: list[TaskRecord]) -> tuple[str, str]:
    """A task's status and wall time in the summary; for a shard worker's several executions,
    their statuses counted and the time from the first start to the last end."""
    statuses = Counter(t.status for t in runs)
    status = ", ".join(f"{st} {n}" if len(runs) > 1 else st for st, n in statuses.items())
    timed = [t for t in runs if t.seconds is not None]
    if not timed:
        return status, ""
    span = max(t.ended for t in timed) - min(t.started for t in timed)
    return status, f"{span:7.1f} s"


def summary_lines(tasks: list[TaskRecord], out: Path, placed: Mapping[str, Path], log_path: Path,
                  seconds: float, extra: Mapping[str, str]) -> list[str]:
    """The closing summary of a finished run.

    Args:
        tasks: The tasks as the console saw them (status and wall time).
        out: The output directory.
        placed: The final files, name -> path (their meta files are read for the counts).
        log_path: The run log.
        seconds: The run's wall time.
        extra: More "label: where" lines (experiment runs, kfp.local's artifacts).
    """
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    lines = ["", f"local run finished in {seconds:.1f} s; outputs in {out}", "steps:"]
    by_name: dict[str, list[TaskRecord]] = {}
    for task in tasks:
        by_name.setdefault(task.name, []).append(task)
    rows = [(name, *_step_row(runs)) for name, runs in by_name.items()]
    name_width = max([len(name) for name, _, _ in rows] + [4])
    status_width = max([len(status) for _, status, _ in rows] + [7])
    for name, status, took in rows:
        lines.append(f"  {name:<{name_width}}  {status:<{status_width}}  {took}".rstrip())
    # the steps' meta files in the groups' order, then any others (kNN, later steps) by name
    order = {meta: i for i, (_, _, meta, _) in enumerate(GROUPS.values())}
    metas = sorted((name for name in placed if name in META_FILES),
                   key=lambda name: (order.get(name, len(order)), name))
    warnings: list[str] = []
    if metas:
        lines.append("counts (from the meta files):")
        meta_width = max(len(name) for name in metas)
        for name in metas:
            try:
                meta = json.loads(placed[name].read_text())
                counts = meta_counts(meta)
                warnings += unavailable_hosts_lines(meta, width)
            except (OSError, ValueError) as exc:
                counts = [f"unreadable: {exc}"]
            lines.extend(_wrap(counts, width, f"  {name:<{meta_width}}  ", " " * (meta_width + 4)))
    lines.extend(warnings)
    total = sum(path.stat().st_size for path in placed.values())
    lines.extend(_wrap(sorted(placed), width, f"files ({len(placed)}, {_size(total)}): ", "  "))
    if QA_REPORT in placed:
        lines.append(f"QA report: {placed[QA_REPORT]}")
    lines.extend(f"{label}: {where}" for label, where in extra.items())
    lines.append(f"full log: {log_path}")
    return lines
