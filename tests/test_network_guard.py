"""The suite-wide network guard (conftest + network_guard.py) refuses and reports every attempt
to leave the machine, including ones the code under test swallows. Nothing here ever connects
to the addresses named: the guard refuses before the system call."""

from __future__ import annotations

import asyncio
import socket
import textwrap
from pathlib import Path

import aiohttp
import pytest

from item_embeddings.image import download as dl
from item_embeddings.image.download import DownloadConfig, fetch_all
from network_guard import NetworkGuardError, NetworkGuardLookupError, take_refusals

TESTS_DIR = Path(__file__).resolve().parent


@pytest.mark.parametrize("family, address", [
    (socket.AF_INET, ("10.20.30.40", 80)),
    (socket.AF_INET, ("169.254.169.254", 80)),
    (socket.AF_INET6, ("2001:db8::1", 443)),
    (socket.AF_INET6, ("::ffff:10.0.0.1", 80)),
])
def test_connect_outside_loopback_is_refused_and_recorded(family, address):
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(NetworkGuardError, match="test network guard"):
            sock.connect(address)
        assert sock.connect_ex(address) != 0
    refused = take_refusals()
    target = f"{address[0]}:{address[1]}"
    assert [line.split(" refused")[0] for line in refused] == [
        f"test network guard: connect to {target}", f"test network guard: connect_ex to {target}"]


def test_udp_send_and_name_lookups_are_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(NetworkGuardError):
            sock.sendto(b"x", ("8.8.8.8", 53))
    with pytest.raises(NetworkGuardLookupError):
        socket.getaddrinfo("metadata.google.internal", 80)
    assert len(take_refusals()) == 2
    # Literals and localhost need no DNS: looked up as usual.
    assert socket.getaddrinfo("127.0.0.1", 80)[0][4][0] == "127.0.0.1"
    assert socket.getaddrinfo("localhost", 80)
    assert take_refusals() == []


def test_loopback_connections_work():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert take_refusals() == []


def test_aiohttp_connections_go_through_the_guard():
    """asyncio's non-blocking connect (what aiohttp uses) is refused too; the error is the
    guard's."""

    async def get():
        async with aiohttp.ClientSession() as session:
            await session.get("http://10.20.30.40:81/x.jpg")

    with pytest.raises(aiohttp.ClientConnectorError) as info:
        asyncio.run(get())
    assert isinstance(info.value.os_error, NetworkGuardError)
    assert [r.split(" refused")[0] for r in take_refusals()] == [
        "test network guard: connect to 10.20.30.40:81"]


def test_a_regressed_ssrf_guard_would_be_stopped_by_the_network_guard():
    """With the download guard off, a private address reaches the socket layer: the network
    guard refuses it there, so a test of a regressed SSRF guard cannot reach 10.20.30.40."""
    [result] = asyncio.run(fetch_all(["http://10.20.30.40:8080/x.jpg"],
                                     DownloadConfig(allow_private_hosts=True, retries=0)))
    assert result.reason == dl.CONNECTION_ERROR and "test network guard" in result.detail
    assert len(take_refusals()) == 1


def test_a_swallowed_refusal_still_fails_the_test_and_subprocesses_are_guarded(pytester):
    """A test that catches the refusal, and one whose subprocess tries, both end in an error."""
    for name in ("conftest.py", "helpers.py", "network_guard.py",
                 "network_guard_site/sitecustomize.py"):
        (pytester.path / name).parent.mkdir(exist_ok=True)
        (pytester.path / name).write_text((TESTS_DIR / name).read_text())
    pytester.makepyfile(textwrap.dedent("""
        import socket, subprocess, sys

        def test_swallows():
            try:
                socket.create_connection(("10.20.30.40", 80), timeout=1)
            except OSError:
                pass

        def test_subprocess():
            code = ("import socket\\ntry: socket.create_connection(('10.20.30.41', 80))\\n"
                    "except OSError: pass")
            subprocess.run([sys.executable, "-c", code], check=True)

        def test_loopback_only():
            socket.getaddrinfo("localhost", 80)
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*this test tried to leave the machine*",
                                 "*connect to 10.20.30.40:80 refused*",
                                 "*connect to 10.20.30.41:80 refused*"])
