"""An asyncio event loop in a background thread, for synchronous code that drives async I/O.

The image step's downloads, the demo's sample image host and the tests' image host all run their
aiohttp code on such a loop while the calling thread does other work.

Example::

    with LoopThread("download-loop") as loop:
        future = loop.submit(fetch(url))      # a concurrent.futures.Future
        result = future.result()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class LoopThread:
    """A daemon thread running one event loop until :meth:`stop` (or the ``with`` block ends)."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future:
        """Schedule ``coro`` on the loop; its result arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = 30) -> _T:
        """Run ``coro`` on the loop and wait for its result."""
        return self.submit(coro).result(timeout=timeout)

    def stop(self, timeout: float = 30) -> None:
        """Stop the loop, join the thread and close the loop."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout)
        self.loop.close()

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
