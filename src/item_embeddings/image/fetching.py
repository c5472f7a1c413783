"""Fetching: download each URL and decode its body, off the caller's thread.

Downloads run on an asyncio loop in a background thread (:class:`~.download.Downloader`);
decoding runs in a thread pool. The caller submits URLs and gets one
``concurrent.futures.Future`` of an :class:`Outcome` per URL, so it can keep a bounded window of
them in flight (back-pressure) and consume results in input order.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from ..loop_thread import LoopThread
from .decoding import ImageDecoder
from .download import Downloader, FetchResult
from .download_config import DownloadConfig

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "internal_error"  # an unforeseen exception for one item (logged with traceback)


@dataclass
class Outcome:
    """One item after download and decode: ``pixels`` on success, ``not_modified`` when a
    conditional request was answered 304, else a failure ``reason``."""

    pixels: np.ndarray | None
    reason: str | None
    detail: str
    status: int | None
    attempts: int
    etag: str | None = None           # validators of the answer, kept for a later revalidation
    last_modified: str | None = None
    not_modified: bool = False


class FetchDecodePool:
    """Downloads (asyncio loop in a background thread) and decodes (thread pool) URLs.

    :meth:`submit` returns a ``concurrent.futures.Future`` of an :class:`Outcome`. Use as a
    context manager: the downloader's session opens on entry and closes on exit.
    ``download_wall_s`` and ``decode_cpu_s`` say where the time went (docs/images.md).
    """

    def __init__(self, config: DownloadConfig, decoder: ImageDecoder,
                 decode_workers: int | None = None, resolver=None):
        self._config = config
        self._decoder = decoder
        self._resolver = resolver
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=decode_workers or min(8, os.cpu_count() or 1),
            thread_name_prefix="decode")
        self._loop_thread = LoopThread("download-loop")
        self._downloader: Downloader | None = None
        self.download_time = 0.0
        self.downloaded_bytes = 0
        # Where the time goes (updated on the loop thread only): seconds with at least one
        # download in flight, and the decode threads' CPU seconds (time.thread_time).
        self.download_wall_s = 0.0
        self.decode_cpu_s = 0.0
        self._downloading = 0
        self._downloads_since = 0.0

    def __enter__(self) -> FetchDecodePool:
        self._loop_thread.start()
        try:
            self._downloader = self._loop_thread.run(self._open_downloader(), timeout=None)
        except BaseException:
            self._stop_threads()  # __exit__ does not run when __enter__ fails
            raise
        return self

    async def _open_downloader(self) -> Downloader:
        return await Downloader(self._config, resolver=self._resolver).__aenter__()

    def __exit__(self, *exc) -> None:
        try:
            self._loop_thread.run(self._close_downloader())
        finally:
            self._stop_threads()

    async def _close_downloader(self) -> None:
        for host, counts in self._downloader.hosts.summary().items():
            logger.info("image host %s: %s", host, ", ".join(f"{k} {v}" for k, v in counts.items()))
        await self._downloader.__aexit__(None, None, None)

    def _stop_threads(self) -> None:
        self._loop_thread.stop()
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, url: str, etag: str | None = None,
               last_modified: str | None = None) -> concurrent.futures.Future:
        """Fetch and decode ``url``; with validators, only if it changed (see Downloader)."""
        return self._loop_thread.submit(self._process(url, etag, last_modified))

    async def _process(self, url: str, etag: str | None, last_modified: str | None) -> Outcome:
        try:
            return await self._fetch_decode(url, etag, last_modified)
        except Exception as exc:
            logger.exception("unexpected error for %s", url)
            return Outcome(None, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", None, 0)

    async def _fetch_decode(self, url: str, etag: str | None,
                            last_modified: str | None) -> Outcome:
        if not self._downloading:
            self._downloads_since = time.perf_counter()
        self._downloading += 1
        try:
            result: FetchResult = await self._downloader.fetch(url, etag, last_modified)
        finally:
            self._downloading -= 1
            if not self._downloading:
                self.download_wall_s += time.perf_counter() - self._downloads_since
        self.download_time += result.elapsed_s
        if result.not_modified:
            return Outcome(None, None, "", result.status, result.attempts, etag=etag,
                           last_modified=last_modified, not_modified=True)
        if not result.ok:
            return Outcome(None, result.reason, result.detail, result.status, result.attempts)
        self.downloaded_bytes += len(result.body)
        pixels, error, cpu_s = await self._loop_thread.loop.run_in_executor(
            self._decode_pool, self._decoder.timed, result.body)
        self.decode_cpu_s += cpu_s
        if error is not None:
            return Outcome(None, error.reason, error.detail, result.status, result.attempts)
        return Outcome(pixels, None, "", result.status, result.attempts, etag=result.etag,
                       last_modified=result.last_modified)
