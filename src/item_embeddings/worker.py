"""What a fan-out worker sets up once for all the shards it runs.

A worker runs its shards one after another in one process (:mod:`.fanout`). Loading the encoder,
opening and indexing the previous output set and validating the items table cost the same for a
shard of 100 rows as for the whole catalogue, so the steps take them from a :class:`WorkerSetup`
that makes each once and hands it to every later shard: the first shard still validates before
any model loads, and the last one closes what was opened.

Example::

    with WorkerSetup(verified=verified) as setup:
        for shard in shards:
            embed_items_text(items_uri, out_dir(shard), params, rows=shard.rows, setup=setup)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Any

from .incremental import PreviousGroup, VerifiedSet, open_previous


class WorkerSetup(contextlib.AbstractContextManager):
    """Encoders, opened previous groups and validated tables, each made once (a step called
    without one makes its own, for one shard)."""

    def __init__(self, verified: VerifiedSet | None = None):
        self.verified = verified
        self._stack = contextlib.ExitStack()
        self._made: dict[Hashable, Any] = {}

    def once(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for, the same object afterwards."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def previous(self, uri: str, group: str) -> PreviousGroup | None:
        """The ``group`` of the previous set at ``uri``, opened (and verified, or checked
        against what the run verified) once, kept open until the worker ends."""
        return self.once(("previous", uri, group), lambda: self._stack.enter_context(
            open_previous(uri, group, verified=self.verified)))

    def __exit__(self, *exc_info) -> bool | None:
        self._made.clear()
        return self._stack.__exit__(*exc_info)
