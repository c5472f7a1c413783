"""No test leaves the machine: a guard on socket connects and name lookups (tests only).

``conftest.py`` installs it for the whole test session, and every Python subprocess a test
starts (kfp.local tasks, CLI runs, the GCS emulator) installs it too, through
``network_guard_site/sitecustomize.py`` on ``PYTHONPATH``. A connect or send to an address
outside 127.0.0.0/8 and ::1, or a lookup of any name but ``localhost``, is refused with
:class:`NetworkGuardError` (a ``ConnectionRefusedError``; for lookups a ``socket.gaierror``)
*and* written to the refusal log, so that conftest fails the test even when the code under test
swallows the error.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

LOG_ENV = "ITEM_EMBEDDINGS_TEST_NETWORK_LOG"  # the refusal log; set for the session's processes
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_INET = (socket.AF_INET, socket.AF_INET6)


class NetworkGuardError(ConnectionRefusedError):
    """A connection that would leave the machine, refused by the test network guard."""


class NetworkGuardLookupError(socket.gaierror):
    """A name lookup that could leave the machine (DNS), refused by the test network guard."""


def _literal(host: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` is a literal of (an IPv6 zone dropped), else None."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None


def is_local(host: Any) -> bool:
    """True for a loopback address literal (IPv4-mapped included) or a local name."""
    name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
    if isinstance(name, str) and name.lower() in LOCAL_NAMES:
        return True
    ip = _literal(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and any(ip in net for net in _LOOPBACK)


def _record(what: str) -> str:
    message = (f"test network guard: {what} refused in pid {os.getpid()} (tests may reach only "
               "127.0.0.0/8 and ::1)")
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as fh:  # one short append per line: atomic
            fh.write(message + "\n")
    return message


def take_refusals() -> list[str]:
    """The refusals logged since the last call (by this process or its subprocesses); clears
    them."""
    log = os.environ.get(LOG_ENV)
    if not log or not os.path.exists(log):
        return []
    with open(log, "r+", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
        fh.seek(0)
        fh.truncate()
    return lines


def _target(sock: socket.socket, address: Any) -> str | None:
    """'host:port' when ``address`` (of an AF_INET/AF_INET6 socket) is not local; else None."""
    if sock.family not in _INET or not isinstance(address, tuple) or is_local(address[0]):
        return None
    return f"{address[0]}:{address[1]}"


def install(log_path: str | None = None) -> Callable[[], None]:
    """Patch ``socket`` in this process; returns a function that restores it.

    ``log_path`` (else the path in ``$ITEM_EMBEDDINGS_TEST_NETWORK_LOG``) receives one line per
    refusal; it is exported so that subprocesses log to the same file.
    """
    if log_path:
        os.environ[LOG_ENV] = log_path
    names = ("connect", "connect_ex", "sendto")
    originals = {name: getattr(socket.socket, name) for name in names}
    own = {name for name in names if name in vars(socket.socket)}  # else inherited from _socket
    original_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        target = _target(self, address)
        if target:
            raise NetworkGuardError(errno.ECONNREFUSED, _record(f"connect to {target}"))
        return originals["connect"](self, address)

    def connect_ex(self, address):
        target = _target(self, address)
        if target:
            _record(f"connect_ex to {target}")
            return errno.ECONNREFUSED
        return originals["connect_ex"](self, address)

    def sendto(self, data, *args):
        target = _target(self, args[-1]) if args else None
        if target:
            raise NetworkGuardError(errno.ECONNREFUSED, _record(f"sendto {target}"))
        return originals["sendto"](self, data, *args)

    def getaddrinfo(host, *args, **kwargs):
        # An IP literal needs no lookup (a connect to it is checked above); a name needs DNS.
        if host not in (None, "", b"") and not is_local(host) and _literal(host) is None:
            raise NetworkGuardLookupError(socket.EAI_NONAME, _record(f"lookup of {host!r}"))
        return original_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo

    def uninstall() -> None:
        for name, method in originals.items():
            if name in own:
                setattr(socket.socket, name, method)
            else:
                delattr(socket.socket, name)
        socket.getaddrinfo = original_getaddrinfo

    return uninstall
