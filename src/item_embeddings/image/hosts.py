"""Per-host state of the image downloader: a circuit breaker, a request rate, connections.

Every request to a host takes a *turn* (:meth:`Hosts.turn`), which

1. is refused at once while the host's **circuit breaker** is open: after
   ``failure_limit`` consecutive failures that say the host is down (connection errors, DNS
   failures, timeouts, 5xx) its remaining URLs fail without a request. After a cool-down
   one request is let through as a probe: an answer closes the breaker, another failure opens
   it again for twice as long (up to ``max_cooldown_s``). Answers that show a live host (any
   status below 500: 404s, HTML pages, images that later fail to decode) reset the count.
2. waits for one of the host's ``connections`` and for its **rate**: requests to one host are
   spaced ``1 / rate`` seconds apart. These waits hold none of the downloader's global slots,
   so a slow or paced host does not hold up the others.
3. is slowed when the host asks: a ``429``, or a ``503`` with ``Retry-After``, pauses that host
   (only) for the Retry-After delay and halves its rate for the rest of the run (an unlimited
   host gets :data:`SLOWED_START_RATE`, halved); one burst of such answers halves it once.

The host of a URL is its authority (:func:`host_key`): ``127.0.0.1:8080`` and ``127.0.0.2:8080``
are two hosts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from yarl import URL

logger = logging.getLogger(__name__)

SLOWED_START_RATE = 10.0   # requests/s an unlimited host gets when it first asks to slow down
MIN_RATE = 0.1             # a host is never slowed below one request every 10 s
UP, DOWN = "up", "down"


def host_key(url: URL) -> str:
    """The host a URL's requests count against: its host name, with the port if not default."""
    host = (url.raw_host or "").lower()
    if not host:
        return ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


def host_of(url: str) -> str:
    """:func:`host_key` of a URL string; ``''`` when it cannot be parsed."""
    try:
        return host_key(URL(url))
    except (ValueError, TypeError):
        return ""


@dataclass(frozen=True)
class HostPolicy:
    """Per-host limits (see the module doc); ``failure_limit`` 0 turns the breaker off,
    ``rate`` 0 means no rate limit."""

    failure_limit: int = 20
    rate: float = 0.0
    connections: int = 32
    cooldown_s: float = 30.0
    max_cooldown_s: float = 600.0
    max_pause_s: float = 10.0


@dataclass
class Turn:
    """One request's turn on a host: ``refused`` says why no request may be sent."""

    host: HostState
    refused: str = ""
    probe: bool = False
    status: int | None = None       # the answer's status, set by the downloader
    sent_at: float = -math.inf


class HostState:
    """One host: its breaker, pacing and counts. Runs on one event loop (no locks needed)."""

    def __init__(self, key: str, policy: HostPolicy, clock: Callable[[], float]):
        self.key = key
        self.policy = policy
        self._clock = clock
        self.slots = asyncio.Semaphore(policy.connections)
        self.interval = 1.0 / policy.rate if policy.rate > 0 else 0.0
        self._next_turn = -math.inf     # pacing of waiting requests (no global slot held)
        self._last_send = -math.inf     # pacing of the requests actually sent
        self.paused_until = -math.inf
        self._slowed_at = -math.inf
        self.failures = 0               # consecutive failures that say the host is down
        self.open = False
        self._reopen_at = 0.0
        self._cooldown = policy.cooldown_s
        self._probing = False
        self.last_failure = ""
        self.requests = self.refused = self.opened = self.slowed = 0

    # -- the breaker
    def admit(self, turn: Turn) -> None:
        """Refuse ``turn`` while the breaker is open, or let it through as the probe."""
        if not self.open:
            return
        if not self._probing and self._clock() >= self._reopen_at:
            self._probing = turn.probe = True
            return
        self.refused += 1
        turn.refused = (f"host {self.key} is not answering ({self.failures} failures in a row, "
                        f"last: {self.last_failure}): circuit breaker open, no request sent")

    def finish(self, turn: Turn, outcome: str | None, why: str = "") -> None:
        """Record a turn's outcome: :data:`UP`, :data:`DOWN` (``why``), or None (no answer
        either way: the request was cancelled or never sent)."""
        if turn.probe:
            self._probing = False
        if outcome == UP:
            if self.open:
                self.open = False
                self._cooldown = self.policy.cooldown_s
                logger.info("image host %s answers again: circuit breaker closed", self.key)
            self.failures = 0
        elif outcome == DOWN:
            self.failures += 1
            self.last_failure = why
            limit = self.policy.failure_limit
            if turn.probe:
                self._cooldown = min(2 * self._cooldown, self.policy.max_cooldown_s)
                self._trip(f"the probe failed too ({why})")
            elif not self.open and limit and self.failures >= limit:
                self._trip(f"{self.failures} failures in a row (last: {why})")

    def _trip(self, cause: str) -> None:
        self.open = True
        self.opened += 1
        self._reopen_at = self._clock() + self._cooldown
        logger.warning("image host %s is not answering: %s; its URLs fail at once as "
                       "host_unavailable for %.0f s, then one probe request", self.key, cause,
                       self._cooldown)

    # -- the rate
    async def pace(self) -> None:
        """Wait for this request's place in the host's schedule (before a global slot)."""
        now = self._clock()
        at = max(now, self._next_turn, self.paused_until)
        self._next_turn = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)

    async def space(self, turn: Turn) -> None:
        """Just before the request (holding a global slot): refuse the turn if the breaker
        opened while it waited, else keep sent requests ``1 / rate`` apart (a short wait, since
        :meth:`pace` spread them already)."""
        if not turn.probe:
            self.admit(turn)
        if turn.refused:
            return
        now = self._clock()
        at = max(now, self._last_send + self.interval, self.paused_until)
        self._last_send = at
        if at > now:
            await asyncio.sleep(at - now)
        turn.sent_at = self._clock()
        self.requests += 1

    def slow_down(self, turn: Turn, delay_s: float | None) -> None:
        """The host asked to slow down (429, or 503 with Retry-After): pause it for ``delay_s``
        (capped) and halve its rate, once per burst (answers to requests sent before the last
        slow-down do not halve it again)."""
        now = self._clock()
        if delay_s:
            self.paused_until = max(self.paused_until, now + min(delay_s, self.policy.max_pause_s))
        if turn.sent_at <= self._slowed_at:
            return
        rate = 1.0 / self.interval if self.interval else 2 * SLOWED_START_RATE
        self.interval = 1.0 / max(rate / 2, MIN_RATE)
        self._slowed_at = now
        self.slowed += 1
        logger.info("image host %s asked to slow down (HTTP %s%s): %.2g requests/s from now on",
                    self.key, turn.status, f", Retry-After {delay_s:g} s" if delay_s else "",
                    1.0 / self.interval)

    def summary(self) -> dict[str, object]:
        return {"requests": self.requests, "breaker_opened": self.opened,
                "refused": self.refused, "last_failure": self.last_failure,
                "slowed": self.slowed,
                "rate": round(1.0 / self.interval, 3) if self.interval else 0.0}


class Hosts:
    """The state of every host one downloader has talked to.

    ``is_down(exc)`` says whether an exception raised during a request means the host is down
    (timeouts, connection errors) rather than something about the URL; ``clock`` is
    ``time.monotonic`` (tests pass a fake one).
    """

    def __init__(self, policy: HostPolicy, is_down: Callable[[BaseException], bool],
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._is_down = is_down
        self._clock = clock
        self._hosts: dict[str, HostState] = {}

    def __getitem__(self, key: str) -> HostState:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = HostState(key, self.policy, self._clock)
        return host

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[Turn]:
        """A turn on host ``key`` (see the module doc). The caller sends no request when
        ``turn.refused`` is set; otherwise it takes a global slot, awaits
        ``turn.host.space(turn)`` (which may refuse the turn too), sends, and sets
        ``turn.status`` from the answer. The outcome is recorded on exit: an exception that
        ``is_down`` or a 5xx status is a failure."""
        host = self[key]
        turn = Turn(host)
        host.admit(turn)
        if turn.refused:
            yield turn
            return
        outcome, why = None, ""
        try:
            async with host.slots:
                await host.pace()
                try:
                    yield turn
                except Exception as exc:
                    if self._is_down(exc):
                        outcome, why = DOWN, _describe(exc)
                    raise
                if turn.status is not None:
                    outcome = DOWN if turn.status >= 500 else UP
                    why = f"HTTP {turn.status}"
        finally:
            host.finish(turn, outcome, why)

    def summary(self) -> dict[str, dict[str, object]]:
        """Hosts whose breaker opened or that were slowed: their counts (for logs and meta)."""
        return {key: host.summary() for key, host in sorted(self._hosts.items())
                if host.opened or host.slowed}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return type(exc).__name__


def unavailable_hosts(urls: Iterable[str], reasons: Iterable[str | None],
                      reason: str) -> dict[str, int]:
    """Items per host that failed with ``reason`` (img_meta.json's ``unavailable_hosts``)."""
    counts = collections.Counter(host_of(u) for u, r in zip(urls, reasons) if r == reason)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def failures_by_host(urls: Iterable[str], reasons: Iterable[str], top: int = 10
                     ) -> list[tuple[str, int, dict[str, int]]]:
    """The ``top`` hosts with the most failed items: (host, failures, {reason: count}),
    most failures first (the QA report's table)."""
    by_host: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for url, reason in zip(urls, reasons):
        by_host[host_of(url or "")][str(reason)] += 1
    ranked = sorted(by_host.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:top]
    return [(host, sum(counts.values()), dict(counts.most_common())) for host, counts in ranked]
