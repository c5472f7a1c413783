"""Guarded, polite, concurrent image downloads with aiohttp.

:class:`Downloader` fetches one URL per call to :meth:`Downloader.fetch` and never raises for a
bad item: every outcome is a :class:`FetchResult`, either a body or a failure reason (see
:data:`FAILURE_REASONS`). Many calls run at once on one event loop; a semaphore bounds the
requests in flight, and each host has its own connections, request rate and circuit breaker
(:mod:`.hosts`), so a dead or busy host costs its own URLs, not the run's.

Politeness: an honest User-Agent (:data:`.download_config.DEFAULT_USER_AGENT`),
``X-Robots-Tag`` ``noai`` / ``noimageai`` honoured (``respect_opt_out``) and, when asked
(``respect_robots_txt``), robots.txt (RFC 9309, :mod:`.robots`), fetched once per host through
the same guard.

Safety (an SSRF guard): only http/https URLs are fetched, redirects are followed by hand (at most
``max_redirects``) so every hop is checked, and unless ``allow_private_hosts`` is set no
connection is made to a private, loopback, link-local, multicast, reserved or cloud-metadata
address. Host names are checked by :class:`GuardedResolver` when the connector resolves them (at
connect time, so a DNS answer cannot be swapped after a check); IP literals, which aiohttp does
not resolve, are checked before each request.

Example::

    async with Downloader(DownloadConfig(concurrency=64)) as downloader:
        results = await asyncio.gather(*(downloader.fetch(url) for url in urls))
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from .download_config import DownloadConfig
from .guard import (
    BLOCKED_ADDRESS,
    INVALID_URL,
    UNSUPPORTED_SCHEME,
    BlockedAddressError,
    GuardedResolver,
    check_url,
)
from .hosts import Hosts, host_key
from .robots import ALLOW_ALL, DISALLOW_ALL, ROBOTS_MAX_BYTES, RobotsRules, opt_out, product_token

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024

# Every reason a download can fail with (the guard's three from .guard; decoding adds its own).
DNS_ERROR = "dns_error"
CONNECTION_ERROR = "connection_error"
TIMEOUT = "timeout"
HTTP_ERROR = "http_error"
REDIRECT_LOOP = "redirect_loop"
TOO_MANY_REDIRECTS = "too_many_redirects"
TOO_LARGE = "too_large"
NOT_AN_IMAGE = "not_an_image"
HOST_UNAVAILABLE = "host_unavailable"    # the host's circuit breaker is open: no request sent
ROBOTS_DISALLOWED = "robots_disallowed"  # the host's robots.txt disallows it: no request sent
OPTED_OUT = "opted_out"                  # X-Robots-Tag noai / noimageai: the body is not read
FAILURE_REASONS = (UNSUPPORTED_SCHEME, INVALID_URL, BLOCKED_ADDRESS, DNS_ERROR, CONNECTION_ERROR,
                   TIMEOUT, HTTP_ERROR, REDIRECT_LOOP, TOO_MANY_REDIRECTS, TOO_LARGE, NOT_AN_IMAGE,
                   HOST_UNAVAILABLE, ROBOTS_DISALLOWED, OPTED_OUT)

# Content types that may hold an image although they do not say so; anything else that is not
# image/* (text/html error pages, JSON) is rejected before the body is read.
_BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream",
                           "application/binary", ""})


@dataclass
class FetchResult:
    """One URL's outcome: ``body`` set on success, else ``reason`` (and ``detail``) set."""

    url: str
    body: bytes | None = None
    reason: str | None = None
    detail: str = ""
    status: int | None = None       # last HTTP status seen (None if no response)
    attempts: int = 0
    content_type: str = ""
    final_url: str = ""
    elapsed_s: float = 0.0
    etag: str | None = None         # validators of a 200 answer, for a later revalidation
    last_modified: str | None = None
    not_modified: bool = False      # a conditional request answered 304: the image is unchanged

    @property
    def ok(self) -> bool:
        return self.body is not None


@dataclass
class _Attempt:
    """One attempt's outcome, with what the retry loop needs to know."""

    result: FetchResult
    retryable: bool = False
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _host_down(exc: BaseException) -> bool:
    """Whether an exception of a request says its host is down (for the circuit breaker): a
    timeout, a refused or reset connection, a failed lookup; not a refused address or URL."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return not isinstance(exc.os_error, BlockedAddressError)
    if isinstance(exc, aiohttp.InvalidURL):
        return False
    return isinstance(exc, (asyncio.TimeoutError, aiohttp.ClientError, OSError))


@dataclass(frozen=True)
class _RobotsVerdict:
    """A host's robots.txt as this run applies it: ``rules``, and why when they are not the
    file's (``unreachable``), or the failure that stops its URLs (``refusal``)."""

    rules: RobotsRules = ALLOW_ALL
    unreachable: str = ""
    refusal: tuple[str, str] | None = None


class Downloader:
    """A shared aiohttp session with the guard, limits and retry policy of :class:`DownloadConfig`.

    Use as ``async with Downloader(config) as d: await d.fetch(url)``. ``resolver`` replaces the
    system DNS resolver (wrapped by the guard either way); tests inject a fixed map.
    ``hosts`` holds the per-host state (:mod:`.hosts`).
    """

    def __init__(self, config: DownloadConfig = DownloadConfig(),
                 resolver: AbstractResolver | None = None, seed: int | None = None):
        self.config = config
        self._guard = config.guard()
        self._inner_resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._random = random.Random(seed)
        self.hosts = Hosts(config.host_policy(), _host_down)
        self._token = product_token(config.user_agent)
        self._robots: dict[str, asyncio.Future] = {}   # origin -> its _RobotsVerdict

    async def __aenter__(self) -> Downloader:
        connector = aiohttp.TCPConnector(
            limit=self.config.concurrency, limit_per_host=self.config.per_host_limit,
            resolver=GuardedResolver(self._guard, self._inner_resolver),
            use_dns_cache=True, ttl_dns_cache=self.config.dns_cache_ttl_s)
        # The per-attempt deadline is enforced with asyncio.wait_for() around each request.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None),
            headers={"User-Agent": self.config.user_agent, "Accept": "image/*,*/*;q=0.5"},
            trust_env=False, auto_decompress=True)
        self._slots = asyncio.Semaphore(self.config.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str, etag: str | None = None,
                    last_modified: str | None = None) -> FetchResult:
        """Download ``url`` with retries; never raises for a bad URL or server.

        With ``etag`` / ``last_modified`` (validators recorded by an earlier fetch) the request
        is conditional (``If-None-Match`` / ``If-Modified-Since``): a ``304`` answer gives a
        result with ``not_modified`` set and no body.
        """
        assert self._session is not None and self._slots is not None, "use 'async with'"
        conditional = {k: v for k, v in (("If-None-Match", etag),
                                         ("If-Modified-Since", last_modified)) if v}
        read = functools.partial(self._read, conditional=bool(conditional))
        return await self._fetch(url, conditional, read, robots=True)

    async def _fetch(self, url: str, headers: dict[str, str], read, robots: bool) -> FetchResult:
        """``url`` with retries: each attempt follows redirects and ends with ``read``."""
        started = time.perf_counter()
        attempts = 0
        previous: FetchResult | None = None
        while True:
            attempts += 1
            attempt = await self._attempt(url, headers, read, robots)
            result = attempt.result
            if previous is not None and result.reason == HOST_UNAVAILABLE:
                # a retry the breaker refused: the item keeps its last real failure
                result, attempts = previous, attempts - 1
                result.detail += f"; not retried: {attempt.result.detail}"
            result.attempts = attempts
            if (result is previous or result.ok or not attempt.retryable
                    or attempts > self.config.retries):
                result.elapsed_s = time.perf_counter() - started
                return result
            previous = result
            await asyncio.sleep(self._delay(attempts, attempt.retry_after_s))

    def _delay(self, attempts: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.config.retry_after_cap_s)
        # Exponential backoff with jitter, so retries of one burst do not arrive together.
        return self.config.backoff_base_s * (2 ** (attempts - 1)) * self._random.uniform(0.5, 1.5)

    async def _attempt(self, url: str, headers: dict[str, str], read, robots: bool) -> _Attempt:
        try:
            parsed = URL(url)
        except (ValueError, TypeError) as exc:
            return _Attempt(FetchResult(url, reason=INVALID_URL, detail=str(exc)))
        hops: list[str] = []  # URLs requested in this attempt; the last one is where it ended

        def failed(reason: str, detail: str, retryable: bool = False) -> _Attempt:
            return _Attempt(FetchResult(url, reason=reason, detail=detail,
                                        final_url=hops[-1] if hops else url), retryable=retryable)

        try:
            return await self._follow(url, parsed, hops, headers, read, robots)
        except asyncio.TimeoutError:
            return failed(TIMEOUT, f"no complete response in {self.config.timeout_s}s", True)
        except aiohttp.InvalidURL as exc:  # the client refused the URL: final, not retried
            return failed(INVALID_URL, f"{type(exc).__name__}: {exc}")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddressError):
                return failed(BLOCKED_ADDRESS, str(exc.os_error))
            if isinstance(exc, aiohttp.ClientConnectorDNSError):
                return failed(DNS_ERROR, str(exc))
            return failed(CONNECTION_ERROR, str(exc), True)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # Reset connections, malformed responses, bad chunked encoding, invalid Location.
            return failed(CONNECTION_ERROR, f"{type(exc).__name__}: {exc}", True)

    async def _follow(self, url: str, current: URL, hops: list[str], headers: dict[str, str],
                      read, robots: bool) -> _Attempt:
        """One attempt: request, following redirects by hand so that every hop is checked.

        Each hop takes a turn on its host (breaker, connections, rate) and a global slot; the
        attempt's ``timeout_s`` counts the requests themselves, not those waits.
        """
        seen = {str(current)}
        redirects = 0
        budget = self.config.timeout_s
        while True:
            hops.append(str(current))
            refused = check_url(current, self._guard)
            if refused is None and robots and self.config.respect_robots_txt:
                refused = await self._robots_refusal(current)
            if refused:
                return _Attempt(FetchResult(url, reason=refused[0], detail=refused[1],
                                            final_url=str(current)))
            async with self.hosts.turn(host_key(current)) as turn:
                if not turn.refused:
                    async with self._slots:
                        await turn.host.space(turn)
                        if not turn.refused:
                            sent = time.monotonic()
                            try:
                                step = await asyncio.wait_for(
                                    self._hop(url, current, headers, read, turn), budget)
                            finally:
                                budget -= time.monotonic() - sent
            if turn.refused:
                return _Attempt(FetchResult(url, reason=HOST_UNAVAILABLE, detail=turn.refused,
                                            final_url=str(current)))
            if isinstance(step, _Attempt):
                return step
            target = step
            if str(target) in seen:
                return _Attempt(FetchResult(url, reason=REDIRECT_LOOP, status=turn.status,
                                            detail=f"{target} visited before",
                                            final_url=str(current)))
            redirects += 1
            if redirects > self.config.max_redirects:
                return _Attempt(FetchResult(url, reason=TOO_MANY_REDIRECTS, status=turn.status,
                                            detail=f"more than {self.config.max_redirects}",
                                            final_url=str(current)))
            seen.add(str(target))
            current = target

    async def _hop(self, url: str, current: URL, headers: dict[str, str], read,
                   turn) -> _Attempt | URL:
        """One request: the redirect's target, or what ``read`` makes of the answer."""
        async with self._session.get(current, allow_redirects=False, headers=headers) as resp:
            turn.status = resp.status
            if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                return current.join(URL(resp.headers["Location"]))
            attempt = await read(url, current, resp)
            if resp.status == 429 or resp.status == 503 and "Retry-After" in resp.headers:
                turn.host.slow_down(turn, attempt.retry_after_s)
            return attempt

    async def _robots_refusal(self, url: URL) -> tuple[str, str] | None:
        """(reason, detail) when the host's robots.txt (fetched once per origin) disallows
        ``url`` for our product token; else None."""
        origin = str(url.origin())
        verdict_task = self._robots.get(origin)
        if verdict_task is None:
            verdict_task = self._robots[origin] = asyncio.ensure_future(
                self._load_robots(url.origin()))
        verdict: _RobotsVerdict = await asyncio.shield(verdict_task)
        if verdict.refusal:
            self._robots.pop(origin, None)  # not a verdict: asked again once the host answers
            return verdict.refusal
        path = url.raw_path_qs
        if verdict.rules.allows(path):
            return None
        why = verdict.unreachable or f"rule '{verdict.rules.deciding_rule(path)}'"
        return ROBOTS_DISALLOWED, (f"{origin}/robots.txt disallows {path} for "
                                   f"'{self._token or '*'}' ({why})")

    async def _load_robots(self, origin: URL) -> _RobotsVerdict:
        """Fetch and read a host's robots.txt; RFC 9309 2.3.1: a 4xx means no rules, a host
        that does not answer (5xx, 429, timeout, connection error) means everything is
        disallowed; more than ``max_redirects`` redirects count as no rules."""
        result = await self._fetch(str(origin.with_path("/robots.txt")),
                                   {"Accept": "text/plain,*/*;q=0.5"}, self._read_robots,
                                   robots=False)
        if result.ok:
            return _RobotsVerdict(RobotsRules.parse(result.body.decode("utf-8", "replace"),
                                                    self._token))
        if result.reason == HOST_UNAVAILABLE:
            return _RobotsVerdict(refusal=(HOST_UNAVAILABLE, result.detail))
        status = result.status or 0
        if result.reason in (TIMEOUT, CONNECTION_ERROR) or status >= 500 or status == 429:
            what = f"HTTP {status}" if result.reason == HTTP_ERROR else result.reason
            return _RobotsVerdict(DISALLOW_ALL, unreachable=(
                f"robots.txt unreachable ({what}): RFC 9309 says assume complete disallow"))
        return _RobotsVerdict(ALLOW_ALL)

    async def _read_robots(self, url: str, current: URL, resp: aiohttp.ClientResponse
                           ) -> _Attempt:
        base = dict(url=url, status=resp.status, final_url=str(current))
        if resp.status == 429 or resp.status >= 500:
            return _Attempt(FetchResult(**base, reason=HTTP_ERROR), retryable=True,
                            retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
        if not 200 <= resp.status < 300:
            return _Attempt(FetchResult(**base, reason=HTTP_ERROR))
        body, _ = await _read_body(resp, ROBOTS_MAX_BYTES)  # the first 500 KiB are parsed
        return _Attempt(FetchResult(**base, body=body[:ROBOTS_MAX_BYTES]))

    async def _read(self, url: str, current: URL, resp: aiohttp.ClientResponse, *,
                    conditional: bool) -> _Attempt:
        status = resp.status
        base = dict(url=url, status=status, final_url=str(current))
        if status == 429 or status >= 500:
            return _Attempt(FetchResult(**base, reason=HTTP_ERROR, detail=resp.reason or ""),
                            retryable=True,
                            retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
        # unasked for, a 304 is an error like any other
        if status != 200 and not (status == 304 and conditional):
            return _Attempt(FetchResult(**base, reason=HTTP_ERROR, detail=resp.reason or ""))
        if self.config.respect_opt_out:
            directive = opt_out(resp.headers.getall("X-Robots-Tag", ()), self._token)
            if directive:
                return _Attempt(FetchResult(**base, reason=OPTED_OUT,
                                            detail=f"X-Robots-Tag: {directive}"))
        if status == 304:
            return _Attempt(FetchResult(**base, not_modified=True))
        content_type = resp.content_type.lower() if "Content-Type" in resp.headers else ""
        if not content_type.startswith("image/") and content_type not in _BINARY_TYPES:
            return _Attempt(FetchResult(**base, reason=NOT_AN_IMAGE, content_type=content_type,
                                        detail=f"content type {content_type!r}"))
        limit = self.config.max_bytes
        if resp.content_length is not None and resp.content_length > limit:
            return _Attempt(FetchResult(**base, reason=TOO_LARGE, content_type=content_type,
                                        detail=f"Content-Length {resp.content_length} > {limit}"))
        body, exceeded = await _read_body(resp, limit)
        if exceeded:  # enforced while streaming: a lying or absent length is caught
            return _Attempt(FetchResult(**base, reason=TOO_LARGE, content_type=content_type,
                                        detail=f"body exceeds {limit} bytes"))
        return _Attempt(FetchResult(**base, body=body, content_type=content_type,
                                    etag=resp.headers.get("ETag"),
                                    last_modified=resp.headers.get("Last-Modified")))


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body in chunks, stopping as soon as it exceeds ``limit``: (bytes read, exceeded)."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            return bytes(body), True
    return bytes(body), False


async def fetch_all(urls: Iterable[str], config: DownloadConfig = DownloadConfig(),
                    resolver: AbstractResolver | None = None) -> list[FetchResult]:
    """Fetch every URL concurrently (bounded by ``config.concurrency``); results in input order."""
    async with Downloader(config, resolver=resolver) as downloader:
        return list(await asyncio.gather(*(downloader.fetch(u) for u in urls)))
