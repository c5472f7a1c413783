"""Per-host behaviour of the downloader: circuit breaker, request rate, slow-down on 429,
X-Robots-Tag opt-outs and robots.txt — the state machine on a fake clock, then real loopback
hosts (127.0.0.1 and 127.0.0.2 are two hosts) that count and time every request they get."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from image_server import DeadServer, ImageServer
from item_embeddings import image as im
from item_embeddings.config import PipelineParams
from item_embeddings.image import download as dl
from item_embeddings.image.download import Downloader
from item_embeddings.image.download_config import DEFAULT_USER_AGENT, DownloadConfig
from item_embeddings.image.guard import StaticResolver
from item_embeddings.image.hosts import (
    MIN_RATE,
    SLOWED_START_RATE,
    HostPolicy,
    Hosts,
    Turn,
    failures_by_host,
    host_of,
    unavailable_hosts,
)
from item_embeddings.outputs import IMG_FAILURES, IMG_META

FAST = dict(timeout_s=1.0, retries=0, backoff_base_s=0.01, allow_private_hosts=True,
            rate_per_host=0.0)
BOTH = ("127.0.0.1", "127.0.0.2")


# ----------------------------------------------------------------------------- the state machine

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Down(ConnectionError):
    pass


def _run_turn(hosts: Hosts, key: str, status: int | None = None, raise_down: bool = False):
    """One turn on ``key``: refused (returns its reason), or answered ``status`` / failed."""
    async def go():
        async with hosts.turn(key) as turn:
            if turn.refused:
                return turn.refused
            await turn.host.space(turn)
            if raise_down:
                raise Down("no answer")
            turn.status = status
            return ""

    try:
        return asyncio.run(go())
    except Down:
        return "failed"


def test_breaker_opens_after_consecutive_failures_and_probes_after_cooldown():
    clock = Clock()
    hosts = Hosts(HostPolicy(failure_limit=3, cooldown_s=10, max_cooldown_s=25),
                  is_down=lambda exc: isinstance(exc, Down), clock=clock)
    for _ in range(2):
        assert _run_turn(hosts, "h", raise_down=True) == "failed"
    assert _run_turn(hosts, "h", status=404) == ""          # an answer resets the count
    assert _run_turn(hosts, "h", status=500) == ""          # a 5xx is a failure
    assert _run_turn(hosts, "h", raise_down=True) == "failed"
    assert not hosts["h"].open
    assert _run_turn(hosts, "h", status=503) == ""          # the third in a row: open
    assert hosts["h"].open and hosts["h"].opened == 1
    assert "not answering" in _run_turn(hosts, "h", status=200)   # refused, nothing sent
    assert hosts["h"].requests == 6 and hosts["h"].refused == 1
    assert _run_turn(hosts, "other", status=200) == ""      # another host is not affected
    clock.now += 10                                          # the cool-down has passed: a probe
    assert _run_turn(hosts, "h", raise_down=True) == "failed"
    assert hosts["h"].open and hosts["h"].opened == 2
    clock.now += 10                                          # the cool-down doubled to 20 s
    assert "not answering" in _run_turn(hosts, "h", status=200)
    clock.now += 10
    assert _run_turn(hosts, "h", status=200) == ""           # the probe is answered: closed
    assert not hosts["h"].open and hosts["h"].failures == 0
    assert hosts.summary()["h"]["breaker_opened"] == 2 and "other" not in hosts.summary()


def test_one_probe_at_a_time_and_a_cancelled_probe_frees_the_next():
    clock = Clock()
    hosts = Hosts(HostPolicy(failure_limit=1, cooldown_s=5), is_down=lambda exc: True,
                  clock=clock)
    assert _run_turn(hosts, "h", raise_down=True) == "failed"
    clock.now += 5

    async def probe_and_another():
        async with hosts.turn("h") as probe:
            assert probe.probe and not probe.refused
            async with hosts.turn("h") as other:       # while the probe is out: refused
                assert other.refused and not other.probe
        # the probe ended without an answer (cancelled): the next turn may probe
        async with hosts.turn("h") as again:
            assert again.probe
            again.status = 200

    asyncio.run(probe_and_another())
    assert not hosts["h"].open


def test_breaker_off_never_opens():
    hosts = Hosts(HostPolicy(failure_limit=0), is_down=lambda exc: True, clock=Clock())
    for _ in range(50):
        assert _run_turn(hosts, "h", raise_down=True) == "failed"
    assert not hosts["h"].open and hosts["h"].requests == 50


def test_slow_down_halves_the_rate_once_per_burst():
    clock = Clock()
    hosts = Hosts(HostPolicy(rate=0.0, max_pause_s=10), is_down=lambda exc: True, clock=clock)
    host = hosts["h"]

    async def burst(n: int, delay: float | None):
        turns = []
        for _ in range(n):  # n requests sent before any answer arrives
            async with hosts.turn("h") as turn:
                await host.space(turn)
                turns.append(turn)
        for turn in turns:
            turn.status = 429
            host.slow_down(turn, delay)

    asyncio.run(burst(5, 30.0))
    assert host.interval == pytest.approx(1 / SLOWED_START_RATE) and host.slowed == 1
    assert host.paused_until == pytest.approx(clock.now + 10)   # Retry-After 30, capped at 10
    clock.now += 11
    asyncio.run(burst(3, None))                                  # a later burst: halved again
    assert host.interval == pytest.approx(2 / SLOWED_START_RATE) and host.slowed == 2
    for _ in range(20):
        clock.now += 11  # past the pause and the spacing: no real sleep on the fake clock
        asyncio.run(burst(1, None))
    assert host.interval == pytest.approx(1 / MIN_RATE)          # never below the floor


def test_hosts_of_failures():
    urls = ["http://a.test/1", "http://a.test:8080/2", "https://A.test/3", "http://a.test:80/4",
            "not a url", "http://b.test/5"]
    reasons = ["timeout", "host_unavailable", "host_unavailable", "host_unavailable", "x",
               "host_unavailable"]
    assert host_of("http://[::1]:81/x") == "[::1]:81"
    assert unavailable_hosts(urls, reasons, "host_unavailable") == {
        "a.test": 2, "a.test:8080": 1, "b.test": 1}
    assert failures_by_host(urls, reasons, top=2) == [
        ("a.test", 3, {"host_unavailable": 2, "timeout": 1}), ("", 1, {"x": 1})]


# ----------------------------------------------------------------------------- real hosts

def fetch_each(urls, resolver=None, **config):
    """Fetch ``urls`` concurrently with one Downloader; (results, seconds, host summary)."""
    async def run():
        async with Downloader(DownloadConfig(**{**FAST, **config}), resolver=resolver,
                              seed=0) as downloader:
            results = await asyncio.gather(*(downloader.fetch(u) for u in urls))
            return results, downloader.hosts.summary()

    started = time.monotonic()
    results, summary = asyncio.run(run())
    return results, time.monotonic() - started, summary


@pytest.fixture()
def two_hosts():
    with ImageServer(addresses=BOTH, slow_s=1.0) as srv:
        yield srv


def test_a_host_that_never_answers_costs_seconds_not_its_urls(two_hosts):
    limit, connections, timeout = 5, 4, 0.3
    with DeadServer("127.0.0.2") as dead:
        urls = []
        for i in range(60):  # the good host's images among the dead host's URLs
            urls.append(dead.url(f"img/{i}.jpg"))
            if i % 6 == 0:
                urls.append(two_hosts.url("img/rgb.jpg"))
        results, seconds, summary = fetch_each(
            urls, timeout_s=timeout, retries=2, host_failure_limit=limit,
            per_host_limit=connections, breaker_cooldown_s=60)
        requests = dead.requests
    good = [r for r in results if "127.0.0.1" in r.url]
    bad = [r for r in results if "127.0.0.2" in r.url]
    assert len(good) == 10 and all(r.ok for r in good)
    assert two_hosts.hits["/img/rgb.jpg"] == 10
    # Counted by the dead host: the failures that opened the breaker, plus the requests in flight
    # then and their retries; not 60 URLs x 3 attempts.
    assert requests <= limit + 2 * connections, requests
    reasons = [r.reason for r in bad]
    assert set(reasons) <= {dl.TIMEOUT, dl.HOST_UNAVAILABLE}
    assert reasons.count(dl.HOST_UNAVAILABLE) >= 60 - requests
    refused = [r for r in bad if r.reason == dl.HOST_UNAVAILABLE]
    assert all(r.status is None and r.attempts == 1 and "no request sent" in r.detail
               and f"127.0.0.2:{dead.port}" in r.detail for r in refused)
    # a URL that timed out and whose retry the open breaker refused keeps its real reason
    retried = [r for r in bad if r.reason == dl.TIMEOUT and "not retried" in r.detail]
    assert retried and all(r.attempts >= 1 for r in retried)
    assert summary[f"127.0.0.2:{dead.port}"]["breaker_opened"] == 1
    assert seconds < 8  # a few timeouts, not 60 URLs x 3 attempts x 0.3 s / 4 connections


def test_without_the_breaker_every_url_costs_its_attempts():
    with DeadServer("127.0.0.2") as dead:
        results, _, _ = fetch_each([dead.url(f"x/{i}") for i in range(8)], timeout_s=0.2,
                                   retries=1, host_failure_limit=0, per_host_limit=8)
        assert dead.requests == 16
    assert [(r.reason, r.attempts) for r in results] == [(dl.TIMEOUT, 2)] * 8


def test_breaker_counts_5xx_not_404_html_or_bad_images_and_reopens_after_a_probe(two_hosts):
    config = DownloadConfig(**{**FAST, "host_failure_limit": 3, "breaker_cooldown_s": 0.3})

    async def run():
        async with Downloader(config) as d:
            harmless = ["status/404", "html", "img/truncated.jpg", "img/notimage.jpg"] * 3
            out = [await d.fetch(two_hosts.url(p)) for p in harmless]
            out += [await d.fetch(two_hosts.url("status/500")) for _ in range(2)]
            out.append(await d.fetch(two_hosts.url("img/rgb.jpg")))    # resets
            out += [await d.fetch(two_hosts.url("status/503")) for _ in range(3)]  # opens
            refused = await d.fetch(two_hosts.url("img/photo.webp"))
            other_host = await d.fetch(two_hosts.url("img/photo.webp", host="127.0.0.2"))
            await asyncio.sleep(0.35)
            probe = await d.fetch(two_hosts.url("img/photo.webp"))
            after = await d.fetch(two_hosts.url("img/grey.jpg"))
            return out, refused, other_host, probe, after

    out, refused, other_host, probe, after = asyncio.run(run())
    assert [r.reason for r in out[-3:]] == [dl.HTTP_ERROR] * 3
    assert refused.reason == dl.HOST_UNAVAILABLE and refused.status is None
    assert other_host.ok and probe.ok and after.ok
    assert two_hosts.hits["/img/photo.webp"] == 2  # the other host's and the probe; not refused
    assert two_hosts.host_hits("127.0.0.2") == 1


def _max_per_second(times: list[float]) -> int:
    return max(sum(1 for u in times if t <= u < t + 1.0) for t in times)


def _spaced(times: list[float], rate: float) -> bool:
    """Whether arrivals are ``1 / rate`` apart, as a loaded server sees them: every two gaps
    together span at least 80% of two intervals (one arrival noticed late shortens one gap)."""
    return all(b - a >= 1.6 / rate for a, b in zip(times, times[2:]))


def test_rate_per_host_is_measured_by_the_hosts(two_hosts):
    rate, n = 5.0, 11
    urls = [two_hosts.url("img/rgb.jpg", host=h) for _ in range(n) for h in BOTH]
    results, _, _ = fetch_each(urls, rate_per_host=rate)
    assert all(r.ok for r in results)
    spans = []
    for host in BOTH:
        times = sorted(two_hosts.host_times[f"{host}:{two_hosts.port}"])
        assert len(times) == n
        assert _spaced(times, rate), times             # spaced by the rate
        assert _max_per_second(times) <= rate + 1
        spans.append((times[0], times[-1]))
    # the two hosts were paced side by side, not one after the other
    assert spans[1][0] < spans[0][1] and spans[0][0] < spans[1][1]


def test_no_rate_limit_sends_at_once(two_hosts):
    results, _, _ = fetch_each([two_hosts.url("img/rgb.jpg")] * 80, rate_per_host=0.0)
    times = sorted(two_hosts.host_times[f"127.0.0.1:{two_hosts.port}"])
    assert all(r.ok for r in results)
    assert _max_per_second(times) > PipelineParams().download_rate_per_host  # above the default


@pytest.mark.parametrize("status", [429, 503])
def test_429_with_retry_after_slows_that_host_alone(two_hosts, status):
    config = DownloadConfig(**{**FAST, "retries": 1})

    async def run():
        async with Downloader(config, seed=0) as d:
            limited = asyncio.ensure_future(d.fetch(
                two_hosts.url(f"status/{status}?retry_after=1", host="127.0.0.2")))
            await asyncio.sleep(0.2)  # the 429 has arrived: 127.0.0.2 is paused for 1 s
            others = await asyncio.gather(
                *(d.fetch(two_hosts.url("img/rgb.jpg", host=h)) for h in BOTH for _ in range(6)))
            return await limited, others, d.hosts.summary()

    limited, others, summary = asyncio.run(run())
    assert limited.reason == dl.HTTP_ERROR and limited.status == status and limited.attempts == 2
    assert all(r.ok for r in others)
    first_429, retry = two_hosts.times[f"/status/{status}"]
    assert retry - first_429 >= 0.95
    fast = two_hosts.host_times[f"127.0.0.1:{two_hosts.port}"]
    slowed = sorted(t for t in two_hosts.host_times[f"127.0.0.2:{two_hosts.port}"]
                    if t > first_429 + 0.01)
    assert max(fast) - first_429 < 0.9              # the other host was not held up
    assert min(slowed) - first_429 >= 0.95          # this one waited out the Retry-After
    assert _spaced(slowed, SLOWED_START_RATE)       # and was slowed to 10 requests/s
    # the retry, sent after the first slow-down, was answered 429 again: halved once more
    assert summary[f"127.0.0.2:{two_hosts.port}"]["rate"] == SLOWED_START_RATE / 2
    assert summary[f"127.0.0.2:{two_hosts.port}"]["slowed"] == 2
    assert f"127.0.0.1:{two_hosts.port}" not in summary


# ----------------------------------------------------------------------------- opt-out, robots

def test_x_robots_tag_opt_out(two_hosts):
    paths = ["img/rgb.jpg?xrt=noai", "img/rgb.jpg?xrt=noindex&xrt=noimageai",
             "img/rgb.jpg?xrt=otherbot:%20noai", "img/rgb.jpg?xrt=item-embeddings:%20noai",
             "img/rgb.jpg?xrt=noindex"]
    urls = [two_hosts.url(p) for p in paths]
    results, _, _ = fetch_each(urls)
    assert [r.reason for r in results] == [dl.OPTED_OUT, dl.OPTED_OUT, None, dl.OPTED_OUT, None]
    assert results[0].detail == "X-Robots-Tag: noai" and results[0].body is None
    assert results[3].detail == "X-Robots-Tag: item-embeddings: noai"
    ignored, _, _ = fetch_each(urls, respect_opt_out=False)
    assert all(r.ok for r in ignored)
    # another User-Agent: its own product token is the one agent-specific directives name
    [acme] = fetch_each([two_hosts.url("img/rgb.jpg?xrt=acme-bot:%20noai")],
                        user_agent="acme-bot/1.0 (+mailto:ops@acme.example)")[0]
    assert acme.reason == dl.OPTED_OUT


ROBOTS = """\
User-agent: *
Disallow: /

User-agent: item-embeddings
Disallow: /img/
Allow: /img/rgb.jpg$
"""


def test_robots_txt_is_fetched_once_per_host_and_obeyed(two_hosts):
    two_hosts.robots_txt = ROBOTS
    urls = [two_hosts.url(p, host=h) for h in BOTH for p in
            ["img/rgb.jpg", "img/photo.webp", "img/rgb.jpg?v=2", "img/grey.jpg"] * 3]
    results, _, _ = fetch_each(urls, respect_robots_txt=True)
    assert [r.reason for r in results[:4]] == [None, dl.ROBOTS_DISALLOWED, dl.ROBOTS_DISALLOWED,
                                               dl.ROBOTS_DISALLOWED]
    assert "rule 'Disallow: /img/'" in results[1].detail and "item-embeddings" in results[1].detail
    assert two_hosts.hits["/robots.txt"] == 2          # once per host, for 12 URLs each
    assert two_hosts.hits["/img/photo.webp"] == 0 and two_hosts.hits["/img/grey.jpg"] == 0
    assert two_hosts.hits["/img/rgb.jpg"] == 6
    # the '*' group is for other robots: another User-Agent gets 'Disallow: /'
    other, _, _ = fetch_each(urls[:1], respect_robots_txt=True, user_agent="otherbot/1")
    assert other[0].reason == dl.ROBOTS_DISALLOWED
    two_hosts.hits.clear()
    off, _, _ = fetch_each(urls[:4], respect_robots_txt=False)
    assert all(r.ok for r in off) and two_hosts.hits["/robots.txt"] == 0


@pytest.mark.parametrize("status,reason", [(404, None), (503, dl.ROBOTS_DISALLOWED),
                                           (429, dl.ROBOTS_DISALLOWED)])
def test_robots_txt_missing_allows_unreachable_disallows(two_hosts, status, reason):
    two_hosts.robots_txt, two_hosts.robots_status = "User-agent: *\nDisallow: /\n", status
    results, _, _ = fetch_each([two_hosts.url("img/rgb.jpg")] * 3, respect_robots_txt=True,
                               retries=1)
    assert [r.reason for r in results] == [reason] * 3
    if reason:
        assert f"robots.txt unreachable (HTTP {status})" in results[0].detail
    assert two_hosts.hits["/robots.txt"] == (1 if status == 404 else 2)  # with its retry


def test_robots_txt_of_a_dead_host_disallows_after_its_own_attempts():
    with DeadServer("127.0.0.2") as dead:
        results, _, _ = fetch_each([dead.url(f"img/{i}.jpg") for i in range(5)],
                                   respect_robots_txt=True, timeout_s=0.2, retries=1)
        assert dead.requests == 2  # robots.txt and its retry; no image request
    assert {r.reason for r in results} == {dl.ROBOTS_DISALLOWED}
    assert "robots.txt unreachable (timeout)" in results[0].detail


def test_robots_txt_goes_through_the_address_guard(two_hosts):
    """The robots.txt of a refused host is never fetched (the URL's own reason wins), and a
    robots.txt that redirects to a private name is refused at that hop, before connecting."""
    resolver = StaticResolver({"public.test": "127.0.0.1", "internal.test": "10.20.30.40"})
    guard_on = dict(allow_private_hosts=False, exempt_networks=("127.0.0.1/32",),
                    respect_robots_txt=True)
    two_hosts.robots_location = f"http://internal.test:{two_hosts.port}/robots.txt"
    results, _, _ = fetch_each([f"http://10.1.2.3:{two_hosts.port}/img/rgb.jpg",
                                f"http://internal.test:{two_hosts.port}/img/rgb.jpg",
                                f"http://public.test:{two_hosts.port}/img/rgb.jpg"],
                               resolver=resolver, **guard_on)
    assert [r.reason for r in results] == [dl.BLOCKED_ADDRESS, dl.BLOCKED_ADDRESS, None]
    assert "10.20.30.40" in results[1].detail
    # public.test's robots.txt redirected to the refused name: no rules (RFC 9309: unavailable)
    assert two_hosts.hits["/robots.txt"] == 1 and two_hosts.hits["/img/rgb.jpg"] == 1


# ----------------------------------------------------------------------------- the user's path

def _items(path, urls):
    pq.write_table(pa.table({"asin": [f"item-{i:03d}" for i in range(len(urls))],
                             "image_url": pa.array(urls, pa.string())}), path)
    return path


def _component(tiny_model, items, out, **parameters) -> dict:
    """The image component's Python function, called as the pipeline calls it."""
    from kfp.dsl import Dataset

    from item_embeddings.components.embed_images import embed_images

    config, checkpoint, _ = tiny_model
    embed_images(items=Dataset(name="items", uri=str(items)),
                 image_shards=Dataset(name="image_shards", uri=str(out)),
                 image_model=str(config), image_pretrained=str(checkpoint),
                 allow_private_hosts=True, tracking_backend="none", **parameters)
    return json.loads((out / "shard-00000" / IMG_META).read_text())


def test_component_breaker_and_opt_out_parameters(tiny_model, tmp_path, caplog):
    with ImageServer() as good, DeadServer("127.0.0.2") as dead:
        urls = ([good.url("img/rgb.jpg"), good.url("img/photo.webp?xrt=noai")]
                + [dead.url(f"img/{i}.jpg") for i in range(40)] + [good.url("img/grey.jpg")])
        meta = _component(tiny_model, _items(tmp_path / "items.parquet", urls),
                          tmp_path / "task", host_failure_limit=3, download_concurrency=4,
                          download_timeout_s=0.3, download_retries=0)
        requests = dead.requests
        failures = pq.read_table(tmp_path / "task" / "shard-00000" / IMG_FAILURES)
    dead_host = f"127.0.0.2:{dead.port}"
    assert requests <= 3 + 4  # the failures that opened it and those in flight then
    by_reason = meta["failures_by_reason"]
    assert by_reason[dl.HOST_UNAVAILABLE] == 40 - requests
    assert by_reason == {dl.TIMEOUT: requests, dl.HOST_UNAVAILABLE: 40 - requests,
                         dl.OPTED_OUT: 1}
    assert meta["unavailable_hosts"] == {dead_host: 40 - requests}
    assert (meta["count"], meta["host_failure_limit"], meta["respect_opt_out"]) == (2, 3, True)
    assert meta["user_agent"] == DEFAULT_USER_AGENT
    assert good.user_agents == {DEFAULT_USER_AGENT}
    opted = failures.filter(pc.equal(failures.column("reason"), dl.OPTED_OUT)).to_pylist()
    assert opted[0]["id"] == "item-001" and opted[0]["detail"] == "X-Robots-Tag: noai"
    # the log names the host: when its breaker opened, and its counts at the end
    logged = caplog.text
    assert f"image host {dead_host} is not answering: 3 failures in a row" in logged
    assert re.search(rf"image host {re.escape(dead_host)}: requests \d+, breaker_opened 1, "
                     rf"refused \d+, last_failure timeout", logged)


def test_component_rate_and_robots_parameters(tiny_model, tmp_path):
    rate = 5.0
    with ImageServer() as srv:
        srv.robots_txt = "User-agent: item-embeddings\nDisallow: /img/grey.jpg\n"
        urls = [srv.url(f"img/rgb.jpg?i={i}") for i in range(6)] + [
            srv.url("img/grey.jpg"), srv.url("img/photo.webp?xrt=noai")]
        meta = _component(tiny_model, _items(tmp_path / "items.parquet", urls),
                          tmp_path / "task", download_rate_per_host=rate,
                          respect_robots_txt=True, respect_opt_out=False)
        times = sorted(srv.host_times[f"127.0.0.1:{srv.port}"])
        hits = dict(srv.hits)
    assert meta["failures_by_reason"] == {dl.ROBOTS_DISALLOWED: 1} and meta["count"] == 7
    assert (meta["download_rate_per_host"], meta["respect_robots_txt"]) == (rate, True)
    assert hits["/robots.txt"] == 1 and "/img/grey.jpg" not in hits
    assert len(times) == 8  # robots.txt and 7 images, spaced by the rate
    assert _spaced(times, rate)


@pytest.mark.parametrize("name,value,message", [
    ("download_rate_per_host", -1.0, "'download_rate_per_host' must be >= 0"),
    ("host_failure_limit", -2, "'host_failure_limit' must be >= 0"),
    ("image_user_agent", "bot/1\r\nX-Injected: 1", "printable ASCII on one line"),
])
def test_component_refuses_bad_values_before_any_work(tiny_model, tmp_path, name, value, message):
    from item_embeddings.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _component(tiny_model, _items(tmp_path / "items.parquet", [None]), tmp_path / "task",
                   **{name: value})
    assert not (tmp_path / "task").exists()


def test_images_of_an_unavailable_host_are_retried_by_the_next_run(tiny_model, tmp_path, caplog):
    config, checkpoint, _ = tiny_model
    encoder = im.load_image_encoder(str(config), str(checkpoint))
    params = PipelineParams(image_model=str(config), image_pretrained=str(checkpoint),
                            allow_private_hosts=True, host_failure_limit=3, download_retries=0,
                            download_concurrency=1, download_rate_per_host=0.0)
    with ImageServer(addresses=BOTH) as srv:
        urls = [srv.url("img/rgb.jpg")] + [srv.url(f"img/grey.jpg?i={i}", host="127.0.0.2")
                                           for i in range(12)]
        items = _items(tmp_path / "items.parquet", urls)
        srv.down.add("127.0.0.2")
        with caplog.at_level(logging.WARNING, logger="item_embeddings.image.step"):
            first = im.embed_items_images(str(items), tmp_path / "A", params, encoder=encoder)
        assert caplog.messages[-1] == (
            "image host(s) not answering, their remaining images skipped by the circuit breaker "
            f"(reason host_unavailable; retried by the next run): 127.0.0.2:{srv.port} (9 images)")
        assert srv.host_hits("127.0.0.2") == 3 and first["count"] == 1
        assert first["failures_by_reason"] == {dl.HTTP_ERROR: 3, dl.HOST_UNAVAILABLE: 9}
        assert first["unavailable_hosts"] == {f"127.0.0.2:{srv.port}": 9}
        srv.down.clear()
        again = im.embed_items_images(
            str(items), tmp_path / "B",
            dataclasses.replace(params, previous_uri=str(tmp_path / "A")),
            encoder=encoder)
        assert srv.host_hits("127.0.0.2") == 3 + 12 and srv.hits["/img/rgb.jpg"] == 1
    assert (again["count"], again["failed_count"], again["reused_count"]) == (13, 0, 1)
    assert again["unavailable_hosts"] == {}


# ------------------------------------------------------------------------ what an operator reads

def _fail_timeout(hosts: Hosts, key: str) -> None:
    """One turn on ``key`` that ends in a timeout (the downloader's asyncio.TimeoutError)."""
    async def go():
        async with hosts.turn(key) as turn:
            await turn.host.space(turn)
            raise asyncio.TimeoutError

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(go())


def test_default_policy_trips_after_20_failures_for_30_s_and_logs_each_change(caplog):
    caplog.set_level(logging.INFO, logger="item_embeddings.image.hosts")
    clock = Clock()
    hosts = Hosts(HostPolicy(), is_down=lambda exc: True, clock=clock)
    for _ in range(19):
        assert _run_turn(hosts, "h", raise_down=True) == "failed"
    assert not hosts["h"].open and hosts.summary() == {}
    _fail_timeout(hosts, "h")                                 # the 20th in a row
    assert caplog.messages[-1] == (
        "image host h is not answering: 20 failures in a row (last: timeout); its URLs fail at "
        "once as host_unavailable for 30 s, then one probe request")
    refusal = ("host h is not answering (20 failures in a row, last: timeout): circuit breaker "
               "open, no request sent")
    assert _run_turn(hosts, "h", status=200) == refusal
    clock.now += 29.9
    assert _run_turn(hosts, "h", status=200) == refusal
    clock.now += 0.1                                          # 30 s: the probe, which fails
    assert _run_turn(hosts, "h", raise_down=True) == "failed"
    assert caplog.messages[-1] == (
        "image host h is not answering: the probe failed too (Down); its URLs fail at once as "
        "host_unavailable for 60 s, then one probe request")
    clock.now += 60                                           # the next probe is answered
    assert _run_turn(hosts, "h", status=404) == ""
    assert caplog.messages[-1] == "image host h answers again: circuit breaker closed"
    assert hosts.summary() == {"h": {"requests": 22, "breaker_opened": 2, "refused": 2,
                                     "last_failure": "Down", "slowed": 0, "rate": 0.0}}
    for _ in range(20):                                       # closed: the cool-down is 30 s again
        _run_turn(hosts, "h", raise_down=True)
    assert caplog.messages[-1].endswith("for 30 s, then one probe request")


def test_default_cooldown_cap_is_ten_minutes(caplog):
    caplog.set_level(logging.INFO, logger="item_embeddings.image.hosts")
    clock = Clock()
    hosts = Hosts(HostPolicy(failure_limit=1, cooldown_s=400), is_down=lambda exc: True,
                  clock=clock)
    assert _run_turn(hosts, "h", raise_down=True) == "failed"
    clock.now += 400
    assert _run_turn(hosts, "h", raise_down=True) == "failed"   # the probe: 800 s, capped
    assert caplog.messages[-1].endswith("for 600 s, then one probe request")
    clock.now += 599.9
    assert "circuit breaker open" in _run_turn(hosts, "h", status=200)
    clock.now += 0.1
    assert _run_turn(hosts, "h", status=200) == "" and not hosts["h"].open


def test_exceptions_that_are_not_the_hosts_fault_do_not_count():
    hosts = Hosts(HostPolicy(failure_limit=2), is_down=lambda exc: False, clock=Clock())
    for _ in range(5):
        assert _run_turn(hosts, "h", raise_down=True) == "failed"
    assert not hosts["h"].open and hosts["h"].failures == 0
    assert hosts["h"].summary()["last_failure"] == ""


def test_default_policy_holds_32_connections_per_host():
    hosts = Hosts(HostPolicy(), is_down=lambda exc: True, clock=Clock())

    async def hold() -> tuple[int, int]:
        inside = {"a": 0, "b": 0}
        release = asyncio.Event()

        async def one(key):
            async with hosts.turn(key) as turn:
                await turn.host.space(turn)
                inside[key] += 1
                await release.wait()
                turn.status = 200

        tasks = [asyncio.ensure_future(one(k)) for k in ("a", "b") for _ in range(40)]
        for _ in range(20):
            await asyncio.sleep(0)
        counts = (inside["a"], inside["b"])
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return counts

    assert asyncio.run(hold()) == (32, 32)          # per host: the other host is not held up
    assert hosts["a"].requests == 40 and hosts.summary() == {}


def test_default_pause_cap_and_the_slow_down_log_line(caplog):
    caplog.set_level(logging.INFO, logger="item_embeddings.image.hosts")
    clock = Clock()
    hosts = Hosts(HostPolicy(), is_down=lambda exc: True, clock=clock)
    host = hosts["h"]

    async def answered(status: int, delay: float | None) -> None:
        async with hosts.turn("h") as turn:
            await host.space(turn)
            turn.status = status
            host.slow_down(turn, delay)

    asyncio.run(answered(429, 30.0))
    assert host.paused_until == pytest.approx(clock.now + 10)
    assert caplog.messages[-1] == ("image host h asked to slow down (HTTP 429, Retry-After 30 s): "
                                   "10 requests/s from now on")
    assert hosts.summary() == {"h": {"requests": 1, "breaker_opened": 0, "refused": 0,
                                     "last_failure": "", "slowed": 1, "rate": 10.0}}
    clock.now += 20
    asyncio.run(answered(503, 0.5))
    assert host.paused_until == pytest.approx(clock.now + 0.5)
    assert caplog.messages[-1] == ("image host h asked to slow down (HTTP 503, Retry-After 0.5 s): "
                                   "5 requests/s from now on")
    clock.now += 20
    asyncio.run(answered(429, None))
    assert caplog.messages[-1] == ("image host h asked to slow down (HTTP 429): "
                                   "2.5 requests/s from now on")
    assert hosts.summary()["h"]["rate"] == 2.5


def test_a_rate_limited_host_is_paced_on_its_clock(monkeypatch):
    clock = Clock()
    hosts = Hosts(HostPolicy(rate=4.0), is_down=lambda exc: True, clock=clock)
    host = hosts["h"]
    waits = []
    real_sleep = asyncio.sleep

    async def sleep(seconds):       # the fake clock moves by what the host waits
        waits.append(round(seconds, 6))
        clock.now += seconds
        await real_sleep(0)

    async def paced():
        for _ in range(3):
            async with hosts.turn("h") as turn:
                await host.space(turn)
                turn.status = 200

    monkeypatch.setattr(asyncio, "sleep", sleep)
    asyncio.run(paced())
    assert waits == [0.25, 0.25] and host.requests == 3
    assert host.summary()["rate"] == 4.0


def test_requests_that_get_their_slot_late_are_still_sent_1_over_rate_apart(monkeypatch):
    """Two requests paced 0.25 s apart both wait for a global slot that frees a second later:
    the second is still sent 0.25 s after the first (the spacing of sent requests), and its
    wait for its place came before it asked for a slot."""
    clock = Clock()
    hosts = Hosts(HostPolicy(rate=4.0), is_down=lambda exc: True, clock=clock)
    host = hosts["h"]
    waits, sent = [], []
    real_sleep = asyncio.sleep

    async def sleep(seconds):       # the fake clock moves by what the host waits
        waits.append(round(seconds, 6))
        clock.now += seconds
        await real_sleep(0)

    async def one(slot_free: asyncio.Event):
        async with hosts.turn("h") as turn:
            await slot_free.wait()  # the downloader's global slot, busy with other hosts
            await host.space(turn)
            sent.append(turn.sent_at)
            turn.status = 200

    async def main():
        slot_free = asyncio.Event()
        tasks = [asyncio.ensure_future(one(slot_free)) for _ in range(2)]
        for _ in range(5):
            await real_sleep(0)
        clock.now += 1.0
        slot_free.set()
        await asyncio.gather(*tasks)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    asyncio.run(main())
    assert sent == [101.25, 101.5] and waits == [0.25, 0.25]
    assert host.requests == 2


def test_a_request_waiting_for_a_slot_when_its_host_asks_for_a_pause_waits_it_out(monkeypatch):
    """A request already past its pacing (waiting for a global slot) when an answer of the same
    host says 429 with Retry-After 5 s is not sent before those 5 s are over."""
    clock = Clock()
    hosts = Hosts(HostPolicy(), is_down=lambda exc: True, clock=clock)
    host = hosts["h"]
    waits = []
    real_sleep = asyncio.sleep

    async def sleep(seconds):
        waits.append(round(seconds, 6))
        clock.now += seconds
        await real_sleep(0)

    async def main():
        async with hosts.turn("h") as first:
            await host.space(first)
            async with hosts.turn("h") as second:   # paced; its global slot not yet free
                first.status = 429
                host.slow_down(first, 5.0)          # the first answer: 429, Retry-After 5 s
                await host.space(second)
                second.status = 200
        return first.sent_at, second.sent_at

    monkeypatch.setattr(asyncio, "sleep", sleep)
    assert asyncio.run(main()) == (100.0, 105.0) and waits == [5.0]


@pytest.mark.parametrize("why,slow_requests,order", [
    ("rate", 4, ["slow", "fast", "slow", "slow", "slow"]),          # 20/s: 50 ms apart
    ("retry-after", 2, ["fast", "slow", "slow"]),                   # paused for 0.2 s
])
def test_a_paced_host_waits_for_its_turn_without_holding_a_global_slot(why, slow_requests,
                                                                         order):
    """With one global slot (the downloader's ``concurrency``), the requests a rate-limited or
    paused host must delay wait outside it: another host's request is sent before them, not
    after."""
    hosts = Hosts(HostPolicy(rate=20.0 if why == "rate" else 0.0), is_down=lambda exc: True)
    if why == "retry-after":  # a 429 with Retry-After 0.2 s (and 10 requests/s from then on)
        hosts["slow"].slow_down(Turn(hosts["slow"], status=429, sent_at=0.0), 0.2)
    sent = []

    async def one(key: str, slots: asyncio.Semaphore):
        async with hosts.turn(key) as turn:       # as Downloader: turn, global slot, space
            async with slots:
                await turn.host.space(turn)
                sent.append(key)
                turn.status = 200

    async def main():
        slots = asyncio.Semaphore(1)
        await asyncio.wait_for(asyncio.gather(*(one("slow", slots)
                                                for _ in range(slow_requests)),
                                              one("fast", slots)), 5)

    asyncio.run(main())  # at most 0.3 s
    assert sent == order


def test_urls_without_a_host_count_under_no_host_and_the_table_keeps_ten():
    for url in ("http://[::1", "http://a.test:99999/x", None, "", "/relative/x.jpg"):
        assert host_of(url) == ""
    urls = [f"http://h{i:02d}.test/x" for i in range(12) for _ in range(12 - i)] + [None]
    reasons = ["timeout"] * (len(urls) - 1) + [None]
    table = failures_by_host(urls, reasons)
    assert [row[:2] for row in table] == [(f"h{i:02d}.test", 12 - i) for i in range(10)]
    assert failures_by_host([None, "bad"], ["invalid_url", None]) == [
        ("", 2, {"invalid_url": 1, "None": 1})]
    # img_meta.json lists them most items first, then by name
    urls = ["http://c.test/1", "http://b.test/1", "http://a.test/2", "http://c.test/2",
            "http://d.test/1"]
    assert list(unavailable_hosts(urls, ["x", "x", "x", "x", "y"], "x").items()) == [
        ("c.test", 2), ("a.test", 1), ("b.test", 1)]


def test_summary_rounds_the_rate_to_three_decimals():
    clock = Clock()
    hosts = Hosts(HostPolicy(rate=0.375), is_down=lambda exc: True, clock=clock)
    turn = Turn(hosts["h"], status=429, sent_at=clock.now)
    hosts["h"].slow_down(turn, None)                 # 0.1875 requests/s
    assert hosts.summary()["h"]["rate"] == 0.188
