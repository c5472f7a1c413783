"""The image step's loop (:func:`run_shards`): every selected item fetched, decoded and encoded,
shard by shard.

A window of items is in flight at a time (each fetched, revalidated, or taken from the previous
set without a request); outcomes are consumed in input order, so the rows of a shard and the
encoder's batches do not depend on download timing. Each item's outcome becomes a row of its
shard (:class:`_ShardWork`), its pixels are encoded in batches of ``image_batch_size``, and a
finished shard is saved to the :class:`~.shards.ShardStore`; shards an earlier attempt
finished are skipped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..incremental import content_keys
from ..progress import Progress
from .encoder import ImageEncoder
from .fetching import FetchDecodePool, Outcome
from .reuse import Carried, PreviousImages
from .shards import (
    ENCODED,
    FAILED,
    FAILURE_REUSED,
    REUSED,
    REVALIDATED,
    ShardStore,
    content_hash,
    shard_table,
)

logger = logging.getLogger(__name__)


@dataclass
class _ShardWork:
    """A shard being filled: its items and, in input order, their outcomes."""

    index: int
    content_sha256: str
    ids: list[Any]
    urls: list[str]
    keys: pa.Array
    carried: list[Carried | None]        # per item: what the previous set gives it
    columns: dict[str, list] = field(default_factory=lambda: collections.defaultdict(list))
    vectors: list[np.ndarray | None] = field(default_factory=list)
    pending: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (position, pixels)

    def add(self, outcome: Outcome) -> None:
        """Record the next item's outcome (items arrive in input order)."""
        position = len(self.vectors)
        carried = self.carried[position]
        row = {"id": self.ids[position], "url": self.urls[position],
               "key": self.keys[position].as_py(), "reason": outcome.reason,
               "detail": outcome.detail, "http_status": outcome.status,
               "attempts": outcome.attempts, "etag": outcome.etag,
               "last_modified": outcome.last_modified}
        vector = None
        if carried is not None and carried.failure is not None:
            row.update({k: carried.failure[k] for k in ("reason", "detail", "http_status",
                                                        "attempts")},
                       source=FAILURE_REUSED)
        elif carried is not None and (outcome.not_modified or outcome.status is None
                                      and outcome.reason is None):
            vector = carried.vector
            row["source"] = REVALIDATED if outcome.not_modified else REUSED
            row["etag"], row["last_modified"] = carried.etag, carried.last_modified
        elif outcome.pixels is not None:
            self.pending.append((position, outcome.pixels))
            row["source"] = ENCODED
        else:
            row["source"] = FAILED
        for name, value in row.items():
            self.columns[name].append(value)
        self.vectors.append(vector)

    def table(self, id_type: pa.DataType, dim: int) -> pa.Table:
        return shard_table(self.columns, self.vectors, id_type, dim)


@dataclass
class EmbedStats:
    """What the loop did: vectors per finished shard, items encoded and the time it took, shards
    resumed from an earlier attempt and shards computed."""

    embedded_per_shard: dict[int, int] = field(default_factory=dict)
    encoded: int = 0
    encode_time: float = 0.0
    resumed_shards: int = 0
    computed_shards: int = 0


def _encode_pending(work: _ShardWork, encoder: ImageEncoder, stats: EmbedStats) -> None:
    if not work.pending:
        return
    t0 = time.perf_counter()
    vectors = encoder.encode(np.stack([pixels for _, pixels in work.pending]))
    stats.encode_time += time.perf_counter() - t0
    stats.encoded += len(work.pending)
    for (position, _), vector in zip(work.pending, vectors):
        work.vectors[position] = vector
    work.pending.clear()


_NO_REQUEST = Outcome(None, None, "", None, 0)  # an item served from the previous set


def _start(work: _ShardWork, position: int, pool: FetchDecodePool,
           previous: PreviousImages | None) -> concurrent.futures.Future:
    """Fetch the item, revalidate it, or (no request) take it from the previous set."""
    carried = work.carried[position]
    url = work.urls[position]
    if carried is None:
        return pool.submit(url)
    if (carried.failure is None and previous.revalidate
            and (carried.etag or carried.last_modified)):
        return pool.submit(url, carried.etag, carried.last_modified)
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(_NO_REQUEST)
    return done


def run_shards(shards: Iterator[tuple[int, list[Any], list[str]]], store: ShardStore,
                pool: FetchDecodePool, encoder: ImageEncoder, *, batch_size: int,
                window: int, id_type: pa.DataType, progress: Progress, stats: EmbedStats,
                keys_fp: str, previous: PreviousImages | None) -> int:
    """Compute every unfinished shard; returns the number of shards."""
    in_flight: collections.deque = collections.deque()  # (work, position, future), input order
    work_iter = _pending_items(shards, store, progress, stats, keys_fp, previous)

    def refill() -> None:
        while len(in_flight) < window:
            nxt = next(work_iter, None)
            if nxt is None:
                return
            work, position = nxt
            in_flight.append((work, position, _start(work, position, pool, previous)))

    refill()
    while in_flight:
        work, position, future = in_flight.popleft()
        outcome: Outcome = future.result()
        refill()
        work.add(outcome)
        if len(work.pending) == batch_size:
            _encode_pending(work, encoder, stats)
        progress.update(1)
        if position == len(work.ids) - 1:  # last item of the shard: finish and store it
            _encode_pending(work, encoder, stats)
            store.save(work.index, work.content_sha256, work.table(id_type, encoder.dim))
            stats.embedded_per_shard[work.index] = sum(v is not None for v in work.vectors)
            stats.computed_shards += 1
    return stats.computed_shards + stats.resumed_shards


def _pending_items(shards, store: ShardStore, progress: Progress, stats: EmbedStats, keys_fp: str,
                   previous: PreviousImages | None) -> Iterator[tuple[_ShardWork, int]]:
    """(shard, position) of every item of the shards not finished by an earlier attempt."""
    for index, ids, urls in shards:
        digest = content_hash(index, ids, urls)
        done = store.load(index, digest, len(ids))
        if done is not None:
            stats.embedded_per_shard[index] = done.column("reason").null_count
            stats.resumed_shards += 1
            progress.update(len(ids))
            logger.info("shard %d (%d items) already done; skipped", index, len(ids))
            continue
        keys = content_keys(keys_fp, urls)
        carried = previous.carried(keys) if previous else [None] * len(ids)
        work = _ShardWork(index, digest, ids, urls, keys, carried)
        for position in range(len(ids)):
            yield work, position
