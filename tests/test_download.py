"""The guarded downloader against a real aiohttp server on 127.0.0.1 (and no other address)."""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
import time

import pytest
from yarl import URL

from image_server import ImageServer, make_images
from item_embeddings.image import download as dl
from item_embeddings.image import guard as gd
from item_embeddings.image.download import fetch_all, parse_retry_after
from item_embeddings.image.download_config import DEFAULT_USER_AGENT, DownloadConfig
from item_embeddings.image.guard import (
    AddressGuard,
    GuardedResolver,
    StaticResolver,
    check_url,
    is_forbidden_address,
)

FAST = dict(timeout_s=1.0, retries=2, backoff_base_s=0.01, allow_private_hosts=True)


@pytest.fixture(scope="module")
def images():
    return make_images()


@pytest.fixture()
def server(images):
    with ImageServer(images, slow_s=1.5) as srv:
        yield srv


def fetch(urls, resolver=None, **config):
    return asyncio.run(fetch_all(urls, DownloadConfig(**{**FAST, **config}), resolver=resolver))


# ----------------------------------------------------------------------------- the address guard

@pytest.mark.parametrize("address", [
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "127.0.0.1", "127.8.9.10", "169.254.169.254",
    "224.0.0.1", "0.0.0.0", "100.64.0.1", "240.0.0.1", "255.255.255.255",
    "::1", "fe80::1", "fc00::1", "fd00:ec2::254", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "ff02::1", "::",
    "::2",                                      # reserved (::/8), though not private
])
def test_forbidden_addresses(address):
    assert is_forbidden_address(address)
    assert not AddressGuard().allows(address)
    assert AddressGuard(enabled=False).allows(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111",
                                     "::ffff:93.184.216.34",
                                     "64:ff9b::808:808"])  # NAT64 of 8.8.8.8: judged as it
def test_public_addresses_allowed(address):
    assert not is_forbidden_address(address)
    assert AddressGuard().allows(address)


def test_exempt_network_stays_reachable_with_guard_on():
    import ipaddress

    guard = AddressGuard(exempt=(ipaddress.ip_network("127.0.0.1/32"),))
    assert guard.allows("127.0.0.1")
    assert not guard.allows("127.0.0.2") and not guard.allows("10.0.0.1")


def test_guarded_resolver_refuses_a_name_with_any_private_answer():
    class TwoAnswers(StaticResolver):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            public = await super().resolve(host, port, family)
            return public + [{**public[0], "host": "10.9.8.7"}]

    async def run():
        ok = await GuardedResolver(AddressGuard(), StaticResolver({"cdn.test": "93.184.216.34"})
                                   ).resolve("cdn.test", 80)
        assert ok[0]["host"] == "93.184.216.34"
        with pytest.raises(gd.BlockedAddressError, match="10.0.0.5"):
            await GuardedResolver(AddressGuard(), StaticResolver({"in.test": "10.0.0.5"})
                                  ).resolve("in.test", 80)
        with pytest.raises(gd.BlockedAddressError, match="10.9.8.7"):
            await GuardedResolver(AddressGuard(), TwoAnswers({"mixed.test": "93.184.216.34"})
                                  ).resolve("mixed.test", 80)

    asyncio.run(run())


@pytest.mark.parametrize("url,reason", [
    ("ftp://example.com/a.jpg", dl.UNSUPPORTED_SCHEME),
    ("file:///etc/passwd", dl.UNSUPPORTED_SCHEME),
    ("http:///nohost.jpg", dl.INVALID_URL),
    ("http://169.254.169.254/latest/meta-data", dl.BLOCKED_ADDRESS),
    ("http://[::1]:8080/x.jpg", dl.BLOCKED_ADDRESS),
    ("http://10.1.2.3/x.jpg", dl.BLOCKED_ADDRESS),
])
def test_check_url_refuses_before_any_connection(url, reason):
    assert check_url(URL(url), AddressGuard())[0] == reason


def test_check_url_says_why():
    guard = AddressGuard()
    assert check_url(URL("http:///nohost.jpg"), guard) == (dl.INVALID_URL, "no host")
    assert check_url(URL("http://134744072/a.jpg"), guard) == (
        dl.INVALID_URL, "host '134744072' is a non-canonical numeric form of 8.8.8.8 (only "
                        "dotted-quad IPv4 hosts are fetched)")
    # an IPv6 literal with a zone id (even one holding '%') is judged by its address
    for zone in ("a%25b", "a%25b%25c"):
        assert check_url(URL(f"http://[fe80::1%25{zone}]/x.jpg"), guard)[0] == dl.BLOCKED_ADDRESS
    assert gd.parse_numeric_ipv4("١٢٧.0.0.1") is None  # digits, but not ASCII ones
    assert not gd.is_numeric_host("")


def test_guarded_resolver_asks_for_the_address_family_it_is_asked_for():
    asked = []

    class Recording(StaticResolver):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            asked.append((host, port, family))
            return await super().resolve(host, port, family)

    async def run():
        return await GuardedResolver(AddressGuard(), Recording({"v6.test": "2606:4700::1111"})
                                     ).resolve("v6.test", 443, socket.AF_INET6)

    [answer] = asyncio.run(run())
    assert asked == [("v6.test", 443, socket.AF_INET6)]
    assert (answer["host"], answer["port"], answer["family"]) == (
        "2606:4700::1111", 443, socket.AF_INET6)


def test_names_resolve_through_the_injected_resolver(server, images):
    """A host name reaches the loopback server only through the resolver given (the
    system's DNS is never asked); an unknown name is a DNS error naming the host."""
    url = f"http://images.test:{server.port}/img/rgb.jpg"
    [ok, unknown] = fetch([url, f"http://other.test:{server.port}/img/rgb.jpg"],
                          resolver=StaticResolver({"images.test": "127.0.0.1"}))
    assert ok.ok and ok.body == images["rgb.jpg"][0]
    assert unknown.reason == dl.DNS_ERROR and "other.test" in unknown.detail


def test_check_url_leaves_names_to_the_resolver():
    assert check_url(URL("https://images.example.com/a.jpg"), AddressGuard()) is None
    assert check_url(URL("https://1e2.example/a.jpg"), AddressGuard()) is None  # 'example': a name


# Legacy numeric IPv4 forms: what each denotes, and the reason with the guard on and off.
NUMERIC_HOSTS = [
    ("2130706433", "127.0.0.1"),        # decimal
    ("017700000001", "127.0.0.1"),      # octal
    ("0177.0.0.1", "127.0.0.1"),        # octal label
    ("127.1", "127.0.0.1"),             # short form
    ("0x7f.1", "127.0.0.1"),            # hex label, short form (aiohttp resolves it by name)
    ("0x7f000001", "127.0.0.1"),        # hex
    ("127.0.0.1.", "127.0.0.1"),        # trailing dot
    ("10.1", "10.0.0.1"),
    ("2852039166", "169.254.169.254"),  # the metadata server
    ("134744072", "8.8.8.8"),           # a public address, still not canonical
    ("10.1.2", "10.1.0.2"),             # three labels: the last fills two octets
    ("255.0x1", "255.0.0.1"),           # 255 is the largest label before the last
    ("0x7f.0x.0x.1", "127.0.0.1"),      # a bare '0x' is 0
    ("1.", "0.0.0.1"),                  # one label and a trailing dot
]


@pytest.mark.parametrize("host,address", NUMERIC_HOSTS)
def test_numeric_hosts_are_classified_up_front(host, address):
    url = URL(f"http://{host}:8080/a.jpg")
    assert gd.parse_numeric_ipv4(host) == ipaddress.ip_address(address)
    guarded = check_url(url, AddressGuard())
    expected = dl.BLOCKED_ADDRESS if is_forbidden_address(address) else dl.INVALID_URL
    assert guarded[0] == expected and address in guarded[1]
    assert check_url(url, AddressGuard(enabled=False))[0] == dl.INVALID_URL


@pytest.mark.parametrize("host", ["1.2.3.4.5", "999.1.1.1", "08.1.1.1", "4294967296",
                                  "1.16777216", "example.123", "1.2.3.4.0", "256.1", "1.256.1",
                                  "1_0.0.0.1",     # int() reads '1_0'; an address does not
                                  ])
def test_numeric_hosts_that_are_no_address_are_invalid(host):
    assert gd.parse_numeric_ipv4(host) is None
    for guard in (AddressGuard(), AddressGuard(enabled=False)):
        assert check_url(URL(f"http://{host}/a.jpg"), guard)[0] == dl.INVALID_URL


class CountingResolver(StaticResolver):
    """A fixed map that counts lookups (a refused URL must never be looked up)."""

    calls = 0

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.calls += 1
        return await super().resolve(host, port, family)


def test_numeric_hosts_never_reach_resolver_or_server(server):
    """Each form would reach the loopback server if it were resolved: every one is refused
    first, once (never retried), without a lookup or a connection."""
    hosts = [host for host, address in NUMERIC_HOSTS if address == "127.0.0.1"]
    resolver = CountingResolver({host: "127.0.0.1" for host in hosts})
    urls = [server.url("img/rgb.jpg", host=host) for host in hosts]
    redirect = server.url(f"to?location=http://0x7f.1:{server.port}/img/rgb.jpg")
    for config, reason in [(dict(allow_private_hosts=True), dl.INVALID_URL),
                           (dict(allow_private_hosts=False), dl.BLOCKED_ADDRESS)]:
        results = fetch(urls, resolver=resolver, **config)
        assert [(r.reason, r.attempts) for r in results] == [(reason, 1)] * len(hosts), \
            [r.detail for r in results]
        assert all("numeric" in r.detail for r in results)
    [hop] = fetch([redirect], resolver=resolver, allow_private_hosts=True)
    assert (hop.reason, hop.attempts) == (dl.INVALID_URL, 1)
    assert hop.final_url.startswith("http://0x7f.1:")  # refused at the redirect's hop
    assert resolver.calls == 0
    assert server.hits["/img/rgb.jpg"] == 0 and server.hits["/to"] == 1


def test_dns_failure_is_a_final_reason():
    resolver = CountingResolver({})  # knows no name: the lookup fails
    [result] = fetch(["http://images.unknown.test/a.jpg"], resolver=resolver, retries=2)
    assert (result.reason, result.attempts) == (dl.DNS_ERROR, 1)
    assert resolver.calls == 1 and "images.unknown.test" in result.detail


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0
    # as the downloader calls it, on the clock
    assert 28 <= parse_retry_after(email.utils.formatdate(time.time() + 30, usegmt=True)) <= 31


# ----------------------------------------------------------------------------- real downloads

def test_images_download_with_their_bytes(server, images):
    names = ["rgb.jpg", "palette.png", "photo.webp", "anim.gif", "octet.jpg"]
    results = fetch([server.url(f"img/{n}") for n in names], user_agent="test-agent/1.0")
    for name, result in zip(names, results):
        assert result.ok, (name, result.reason, result.detail)
        assert result.body == images[name][0]
        assert (result.status, result.attempts) == (200, 1)
    assert server.user_agents == {"test-agent/1.0"}


@pytest.mark.parametrize("path,reason,status,attempts,detail", [
    ("status/404", dl.HTTP_ERROR, 404, 1, "Not Found"),     # a 4xx is final
    ("status/503", dl.HTTP_ERROR, 503, 3, "Unavailable"),   # 5xx: retried, then given up
    ("slow", dl.TIMEOUT, None, 3, "no complete response"),  # slower than the timeout, each time
    ("stall", dl.TIMEOUT, None, 3, "no complete response"),  # the body stops half way
    ("big", dl.TOO_LARGE, 200, 1, "body exceeds"),          # no length; cut while streaming
    ("big-declared", dl.TOO_LARGE, 200, 1, "Content-Length 2097152 > 1048576"),  # body unread
    ("html", dl.NOT_AN_IMAGE, 200, 1, "text/html"),
    ("loop/a", dl.REDIRECT_LOOP, 302, 1, "visited before"),
    ("chain/6", dl.TOO_MANY_REDIRECTS, 302, 1, "more than 5"),
    ("to?location=file:///etc/passwd", dl.UNSUPPORTED_SCHEME, None, 1, "'file'"),
])
def test_faults_end_as_reasons(server, path, reason, status, attempts, detail):
    [result] = fetch([server.url(path)], max_bytes=1024 * 1024)
    assert not result.ok
    assert (result.reason, result.status, result.attempts) == (reason, status, attempts), \
        result.detail
    assert detail in result.detail
    path_only = "/" + path.split("?")[0]
    if reason == dl.TIMEOUT or path.startswith("status/503"):
        assert server.hits[path_only] == attempts  # every attempt really reached the server


def test_five_redirects_are_followed(server):
    [result] = fetch([server.url("chain/5")])
    assert result.ok and result.final_url.endswith("/chain/0")


def test_500_then_200_is_retried(server, images):
    [result] = fetch([server.url("flaky/k1")])
    assert result.ok and result.attempts == 2 and result.body == images["rgb.jpg"][0]


@pytest.fixture
def waits(monkeypatch):
    """The delays the downloader chose between attempts (asserted instead of wall-clock time)."""
    chosen = []
    real = dl.Downloader._delay

    def spy(self, attempts, retry_after_s):
        chosen.append(real(self, attempts, retry_after_s))
        return chosen[-1]

    monkeypatch.setattr(dl.Downloader, "_delay", spy)
    return chosen


def test_429_honours_retry_after(server, waits):
    [result] = fetch([server.url("ratelimited/k2")])
    assert result.ok and result.attempts == 2
    assert waits == [1.0]  # Retry-After: 1, although the backoff would be about 0.01 s
    first, second = server.times["/ratelimited/k2"]
    assert second - first >= 0.95  # and it was waited for (a lower bound: load cannot break it)


def test_retry_after_is_capped(server, waits):
    [result] = fetch([server.url("ratelimited/k3")], retry_after_cap_s=0.1)
    assert result.ok and waits == [0.1]


def test_backoff_doubles_with_jitter(server, waits):
    [result] = fetch([server.url("status/503")], retries=3, backoff_base_s=0.01)
    assert result.attempts == 4 and len(waits) == 3
    for attempt, wait in enumerate(waits):
        assert 0.5 * 0.01 * 2 ** attempt <= wait <= 1.5 * 0.01 * 2 ** attempt


def test_connection_refused_is_a_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the fetch: nothing listens there
    [result] = fetch([f"http://127.0.0.1:{port}/x.jpg"], retries=1)
    assert result.reason == dl.CONNECTION_ERROR and result.attempts == 2


def test_an_answer_that_is_not_http_is_a_connection_error_naming_what_was_wrong():
    """A host that answers garbage: a connection error, retried, whose detail names the
    exception and what aiohttp found (what img_failures.parquet shows an operator)."""
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):  # the attempt and its one retry
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")

        thread = threading.Thread(target=serve)
        thread.start()
        [result] = fetch([f"http://127.0.0.1:{port}/x.jpg"], retries=1)
        thread.join(10)
    assert (result.reason, result.attempts) == (dl.CONNECTION_ERROR, 2)
    assert result.detail.startswith("ClientResponseError: 400, message=") \
        and "NOT HTTP AT ALL" in result.detail, result.detail


def test_a_host_name_is_looked_up_again_only_after_dns_cache_ttl_s(server, monkeypatch):
    """One lookup per host name per dns_cache_ttl_s (300 s), on aiohttp's clock (not its own
    default of 10 s)."""
    import aiohttp.connector

    clock = [1000.0]
    monkeypatch.setattr(aiohttp.connector, "monotonic", lambda: clock[0])
    resolver = CountingResolver({"images.test": "127.0.0.1"})
    url = f"http://images.test:{server.port}/img/rgb.jpg"

    async def run() -> list[int]:
        calls = []
        async with dl.Downloader(DownloadConfig(**FAST), resolver=resolver) as downloader:
            for step in (0, 60, 250):  # at 0 s, 60 s, 310 s
                clock[0] += step
                assert (await downloader.fetch(url)).ok
                calls.append(resolver.calls)
        return calls

    assert asyncio.run(run()) == [1, 1, 2]


def test_guard_refuses_loopback_before_connecting(server):
    urls = [server.url("img/rgb.jpg"), server.url("img/rgb.jpg", host="localhost")]
    results = fetch(urls, allow_private_hosts=False)
    assert [r.reason for r in results] == [dl.BLOCKED_ADDRESS, dl.BLOCKED_ADDRESS]
    assert server.hits["/img/rgb.jpg"] == 0  # refused before any connection


def test_redirect_to_a_private_name_is_refused(server):
    """First hop: a name resolving to an exempt address; second hop: a name in 10/8."""
    resolver = StaticResolver({"public.test": "127.0.0.1", "internal.test": "10.20.30.40"})
    guard_on = dict(allow_private_hosts=False, exempt_networks=("127.0.0.1/32",))
    ok, refused, metadata = fetch([
        server.url("img/rgb.jpg", host="public.test"),
        server.url(f"to?location=http://internal.test:{server.port}/img/rgb.jpg",
                   host="public.test"),
        server.url("to?location=http://169.254.169.254/computeMetadata/v1/", host="public.test"),
    ], resolver=resolver, **guard_on)
    assert ok.ok
    assert refused.reason == dl.BLOCKED_ADDRESS and "10.20.30.40" in refused.detail
    assert metadata.reason == dl.BLOCKED_ADDRESS
    assert refused.final_url.startswith("http://internal.test")  # the hop that was refused
    assert metadata.final_url.startswith("http://169.254.169.254")
    assert server.hits["/to"] == 2 and server.hits["/img/rgb.jpg"] == 1


def test_concurrency_is_bounded_and_overlapping():
    with ImageServer(latency_s=0.2) as srv:
        results = fetch([srv.url("img/rgb.jpg")] * 20, concurrency=5)
        assert all(r.ok for r in results) and srv.hits["/img/rgb.jpg"] == 20
        # Counted by the server: 5 requests at once (overlapping, not sequential), never more.
        assert srv.max_in_flight == 5


# ----------------------------------------------------------------------------- settings, headers

@pytest.mark.parametrize("field,value,message", [
    ("concurrency", 0, "concurrency must be >= 1, got 0"),
    ("per_host_limit", 0, "per_host_limit must be >= 1, got 0"),
    ("max_bytes", 0, "max_bytes must be >= 1, got 0"),
    ("timeout_s", 0.0, "timeout_s must be > 0, got 0.0"),
    ("retries", -1, "retries, max_redirects and host_failure_limit must be >= 0"),
    ("max_redirects", -1, "retries, max_redirects and host_failure_limit must be >= 0"),
    ("host_failure_limit", -1, "retries, max_redirects and host_failure_limit must be >= 0"),
    ("rate_per_host", -0.5, r"rate_per_host must be >= 0 \(got -0.5\) and breaker_cooldown_s > 0"
                            r" \(got 30.0\)"),
    ("rate_per_host", float("inf"), r"rate_per_host must be >= 0 \(got inf\)"),
    ("breaker_cooldown_s", 0.0, r"rate_per_host must be >= 0 \(got 50.0\) and "
                                r"breaker_cooldown_s > 0 \(got 0.0\)"),
])
def test_config_refuses_bad_values(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        DownloadConfig(**{field: value})


def test_config_accepts_the_smallest_values():
    config = DownloadConfig(concurrency=1, per_host_limit=1, max_bytes=1, timeout_s=0.001,
                            retries=0, max_redirects=0, host_failure_limit=0, rate_per_host=0.0,
                            breaker_cooldown_s=0.001)
    assert config.concurrency == 1 and config.max_redirects == 0


def test_config_from_pipeline_parameters():
    from item_embeddings.config import PipelineParams
    from item_embeddings.image.hosts import HostPolicy

    params = PipelineParams(download_concurrency=7, download_timeout_s=3.5, download_retries=4,
                            max_image_bytes=12345, download_rate_per_host=2.5,
                            host_failure_limit=6, image_user_agent="acme-bot/2 (+ops@acme)",
                            respect_opt_out=False, respect_robots_txt=True,
                            allow_private_hosts=True)
    config = DownloadConfig.from_params(params)
    assert (config.concurrency, config.timeout_s, config.retries, config.max_bytes,
            config.rate_per_host, config.host_failure_limit, config.user_agent,
            config.respect_opt_out, config.respect_robots_txt, config.allow_private_hosts) == (
        7, 3.5, 4, 12345, 2.5, 6, "acme-bot/2 (+ops@acme)", False, True, True)
    assert config.guard().allows("127.0.0.1")
    assert not DownloadConfig.from_params(PipelineParams()).guard().allows("127.0.0.1")
    default = DownloadConfig.from_params(PipelineParams(image_user_agent=""))
    assert default.user_agent == DEFAULT_USER_AGENT
    # the per-host limits the downloader applies: 32 connections, a 30 s cool-down doubling
    # up to 10 min, Retry-After pauses capped at 10 s
    assert config.host_policy() == HostPolicy(failure_limit=6, rate=2.5, connections=32,
                                              cooldown_s=30.0, max_pause_s=10.0)


def test_requests_say_what_they_accept(server):
    server.robots_txt = "User-agent: *\nAllow: /\n"
    [result] = fetch([server.url("img/rgb.jpg")], respect_robots_txt=True)
    assert result.ok and result.content_type == "image/jpeg"
    assert server.accepts["/img/rgb.jpg"] == {"image/*,*/*;q=0.5"}
    assert server.accepts["/robots.txt"] == {"text/plain,*/*;q=0.5"}


def test_a_proxy_in_the_environment_is_not_used(server, monkeypatch):
    from image_server import DeadServer

    with DeadServer("127.0.0.2") as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.2:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        [result] = fetch([server.url("img/rgb.jpg")], timeout_s=0.5, retries=0)
        assert proxy.requests == 0
    assert result.ok and server.hits["/img/rgb.jpg"] == 1


def test_conditional_fetch_of_an_unchanged_image(server):
    [first] = fetch([server.url("img/rgb.jpg")])
    assert first.ok and first.etag and first.last_modified
    assert not first.not_modified

    async def again(**validators):
        async with dl.Downloader(DownloadConfig(**FAST)) as d:
            return await d.fetch(server.url("img/rgb.jpg"), **validators)

    for validators in (dict(etag=first.etag), dict(last_modified=first.last_modified)):
        result = asyncio.run(again(**validators))
        assert (result.not_modified, result.body, result.status, result.reason) == (
            True, None, 304, None)
    changed = asyncio.run(again(etag='"another"'))
    assert changed.ok and not changed.not_modified and changed.body == first.body
    assert server.conditional["/img/rgb.jpg"] == 3 and server.not_modified["/img/rgb.jpg"] == 2


def test_a_body_of_exactly_max_bytes_is_kept(server):
    url = server.url("big?chunks=1")  # 65536 bytes, chunked: no Content-Length
    [at_limit] = fetch([url], max_bytes=65536)
    [over] = fetch([url], max_bytes=65535)
    assert at_limit.ok and len(at_limit.body) == 65536
    assert (over.reason, over.detail) == (dl.TOO_LARGE, "body exceeds 65535 bytes")
    [declared] = fetch([server.url("big-declared")], max_bytes=2 * 1024 * 1024)
    assert declared.ok and len(declared.body) == 2 * 1024 * 1024


def test_what_a_failure_says(server):
    html, missing, busy = fetch([server.url("html"), server.url("img/nothing.jpg"),
                                 server.url("status/503")], retries=0)
    assert (html.reason, html.detail, html.content_type) == (
        dl.NOT_AN_IMAGE, "content type 'text/html'", "text/html")
    assert html.final_url == server.url("html")
    assert (missing.reason, missing.status, missing.detail) == (dl.HTTP_ERROR, 404, "Not Found")
    assert (busy.reason, busy.status, busy.detail) == (dl.HTTP_ERROR, 503, "Service Unavailable")
    [slow] = fetch([server.url("slow")], timeout_s=0.2, retries=0)
    assert slow.detail == "no complete response in 0.2s" and slow.final_url == server.url("slow")
    assert 0.2 <= slow.elapsed_s < 1.0
    [loop] = fetch([server.url("loop/a")])
    assert loop.detail == f"{server.url('loop/a')} visited before"
    assert loop.final_url == server.url("loop/b")
    [chain] = fetch([server.url("chain/3")], max_redirects=2)
    assert (chain.reason, chain.detail) == (dl.TOO_MANY_REDIRECTS, "more than 2")
    assert chain.final_url == server.url("chain/1")
    [ok] = fetch([server.url("chain/2")], max_redirects=2)
    assert ok.ok and ok.final_url == server.url("chain/0") and ok.status == 200


def test_a_503_without_retry_after_does_not_slow_the_host(server):
    async def run():
        async with dl.Downloader(DownloadConfig(**{**FAST, "retries": 0})) as d:
            await d.fetch(server.url("status/503"))
            plain = d.hosts.summary()
            await d.fetch(server.url("status/503?retry_after=0"))
            return plain, d.hosts.summary()

    plain, asked = asyncio.run(run())
    assert plain == {}
    assert asked[f"127.0.0.1:{server.port}"]["slowed"] == 1


def test_robots_refusal_names_the_file_the_path_and_the_robot(server):
    server.robots_txt = "User-agent: *\nDisallow: /img/\n"
    [named] = fetch([server.url("img/rgb.jpg?v=1")], respect_robots_txt=True,
                    user_agent="acme-bot/1.0")
    assert named.detail == (f"http://127.0.0.1:{server.port}/robots.txt disallows "
                            "/img/rgb.jpg?v=1 for 'acme-bot' (rule 'Disallow: /img/')")
    [anonymous] = fetch([server.url("img/rgb.jpg")], respect_robots_txt=True,
                        user_agent="(no product token)")
    assert anonymous.detail.endswith("for '*' (rule 'Disallow: /img/')")


@pytest.mark.parametrize("status", [401, 403, 410])
def test_robots_txt_answered_4xx_means_no_rules(server, status):
    server.robots_txt, server.robots_status = "User-agent: *\nDisallow: /\n", status
    [result] = fetch([server.url("img/rgb.jpg")], respect_robots_txt=True)
    assert result.ok and server.hits["/robots.txt"] == 1


def test_robots_txt_answered_300_without_location_means_no_rules(server):
    """Only a 2xx answer is a robots.txt: the body of a 300 without a Location is not read."""
    server.robots_txt, server.robots_status = "User-agent: *\nDisallow: /\n", 300
    [result] = fetch([server.url("img/rgb.jpg")], respect_robots_txt=True)
    assert result.ok and server.hits["/robots.txt"] == 1


def test_robots_txt_behind_too_many_redirects_means_no_rules(server):
    server.robots_location = server.url("chain/9")
    [result] = fetch([server.url("img/rgb.jpg")], respect_robots_txt=True, max_redirects=3)
    assert result.ok and server.hits["/robots.txt"] == 1 and server.hits["/img/rgb.jpg"] == 1


def test_robots_txt_beyond_500_kib_is_cut(server):
    rules = "User-agent: *\nDisallow: /img/rgb.jpg\n"
    server.robots_txt = "#" * (500 * 1024 - 1) + "\n" + rules  # the rules start past 500 KiB
    [result] = fetch([server.url("img/rgb.jpg")], respect_robots_txt=True)
    assert result.ok
    server.robots_txt = "#" * (500 * 1024 - 1 - len(rules)) + "\n" + rules  # they end at it
    [refused] = fetch([server.url("img/rgb.jpg")], respect_robots_txt=True)
    assert refused.reason == dl.ROBOTS_DISALLOWED


def test_each_per_host_setting_reaches_the_host_policy():
    """What the downloader is given per host is what its host tracker enforces."""
    from item_embeddings.image.hosts import HostPolicy

    config = DownloadConfig(host_failure_limit=3, rate_per_host=2.5, per_host_limit=4,
                            breaker_cooldown_s=7.0, retry_after_cap_s=9.0)
    assert config.host_policy() == HostPolicy(failure_limit=3, rate=2.5, connections=4,
                                              cooldown_s=7.0, max_pause_s=9.0)
