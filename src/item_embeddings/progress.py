"""Progress for long loops: a tqdm bar on a terminal, periodic log lines elsewhere (Cloud
Logging)."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("item_embeddings")
# One line per record; `run-local` finds a task's records (progress included) by this shape.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """One readable line per event; idempotent (components call it at start)."""
    root = logging.getLogger("item_embeddings")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)


class Progress:
    """Counts finished items of a known total.

    On a terminal it draws a tqdm bar (items/s, ETA); otherwise it logs one line every
    ``log_every_s`` seconds with the same numbers, which is what an operator reads in Cloud Logging.
    """

    def __init__(self, total: int, desc: str, unit: str = "item", log_every_s: float = 30.0,
                 use_bar: bool | None = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.started = time.perf_counter()
        self._last_log = self.started
        self._log_every_s = log_every_s
        if use_bar is None:
            use_bar = sys.stderr.isatty()
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            logger.info("%s", self.status_line())

    def status_line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.1f}%), "
                f"{rate:.1f} {self.unit}s/s, ETA {eta:.0f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        logger.info("%s (done)", self.status_line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
