"""The SSRF guard of image downloads: which URLs and addresses may be fetched.

Only http/https URLs; no connection to a private, loopback, link-local, multicast, reserved,
shared or cloud-metadata address unless the guard is off (``allow_private_hosts``). Host names
are checked by :class:`GuardedResolver` when the connector resolves them (at connect time, so a
DNS answer cannot be swapped after a check); IP literals, which aiohttp does not resolve, and
hosts in legacy numeric forms are checked by :func:`check_url` before every hop.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..errors import ItemEmbeddingsError

UNSUPPORTED_SCHEME = "unsupported_scheme"
INVALID_URL = "invalid_url"
BLOCKED_ADDRESS = "blocked_address"

# Cloud metadata endpoints that are not already covered by the private/link-local ranges.
_METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254"),
                                 ipaddress.ip_address("100.100.100.200")})


class BlockedAddressError(ItemEmbeddingsError, OSError):
    """A host resolved to an address the guard refuses (private, loopback, metadata, ...)."""


def is_forbidden_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address an image download must never connect to.

    Private (RFC 1918, unique-local), loopback, link-local (which holds 169.254.169.254, the cloud
    metadata server), multicast, reserved, unspecified, shared (CGNAT) and known metadata
    addresses; IPv4-mapped and 6to4/NAT64-embedded IPv4 addresses are judged by their IPv4 part.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in ipaddress.ip_network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_forbidden_address(embedded)
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or ip in _METADATA_ADDRESSES
            or (isinstance(ip, ipaddress.IPv4Address)
                and ip in ipaddress.ip_network("100.64.0.0/10")))


@dataclass(frozen=True)
class AddressGuard:
    """The address policy: refuse forbidden addresses unless disabled or explicitly exempted.

    ``exempt`` lists networks that stay reachable with the guard on (a known private CDN; tests
    use it to let a first hop reach loopback while a redirect to another range is refused).
    """

    enabled: bool = True
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def allows(self, address: str) -> bool:
        if not self.enabled:
            return True
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        if any(ip in net for net in self.exempt):
            return True
        return not is_forbidden_address(ip)


class GuardedResolver(AbstractResolver):
    """Wraps a resolver and refuses a host if any of its addresses is forbidden.

    Refusing when *any* address is forbidden (not only all) stops a name that mixes a public
    and a private answer from reaching the private one on a retry or a second connection.
    aiohttp's DNS cache stores this resolver's answers, so cached answers were checked too.
    """

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None):
        self.guard = guard
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        refused = [r["host"] for r in results if not self.guard.allows(r["host"])]
        if refused:
            raise BlockedAddressError(f"host {host!r} resolves to refused address(es) {refused}")
        return results

    async def close(self) -> None:
        await self.inner.close()


def _ipv4_number(part: str) -> int | None:
    """One label of a numeric IPv4 host as the WHATWG URL standard reads it: ``0x`` hex,
    leading-zero octal or decimal, ASCII only; None if it is not a number."""
    if part[:2].lower() == "0x":
        digits, base = part[2:] or "0", 16
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not (digits.isascii() and digits.isalnum()):  # int() would accept '_', signs, spaces
        return None
    try:
        return int(digits, base)
    except ValueError:
        return None


def _host_labels(host: str) -> list[str]:
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot
    return labels


def is_numeric_host(host: str) -> bool:
    """True when ``host``'s last label is a number: the URL standard then reads the host as an
    IPv4 address (no DNS name has a numeric top-level label)."""
    last = _host_labels(host)[-1]
    return bool(last) and _ipv4_number(last) is not None


def parse_numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address a numeric host denotes in any of the legacy forms that browsers and
    ``inet_aton`` accept (``2130706433``, ``0177.0.0.1``, ``127.1``, ``0x7f.1``; WHATWG URL
    standard, IPv4 parser); None when it is no valid address."""
    numbers = [_ipv4_number(label) if label else None for label in _host_labels(host)]
    if len(numbers) > 4 or None in numbers or any(n > 255 for n in numbers[:-1]) \
            or numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    value = numbers[-1] + sum(n * 256 ** (3 - i) for i, n in enumerate(numbers[:-1]))
    return ipaddress.IPv4Address(value)


def check_url(url: URL, guard: AddressGuard) -> tuple[str, str] | None:
    """(reason, detail) if ``url`` must not be fetched, checked before every hop; else None.

    Only canonical IP literals and names are fetched. A host in a legacy numeric form (decimal,
    octal, hex or short IPv4) is never fetched: resolvers disagree on what it means (aiohttp
    refuses some forms, ``getaddrinfo`` maps others onto an address), so it is refused here,
    as ``blocked_address`` when the address it denotes is refused, else as ``invalid_url``.
    """
    if url.scheme not in ("http", "https"):
        return UNSUPPORTED_SCHEME, f"scheme {url.scheme!r} (only http/https)"
    host = url.raw_host
    if not host:
        return INVALID_URL, "no host"
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if not is_numeric_host(host):
            return None  # a name: GuardedResolver checks its addresses when it is resolved
        address = parse_numeric_ipv4(host)
        if address is None:
            return INVALID_URL, f"host {host!r} is numeric but not an IPv4 address"
        if not guard.allows(str(address)):
            return (BLOCKED_ADDRESS,
                    f"host {host!r} is a numeric form of {address}, which is refused")
        return INVALID_URL, (f"host {host!r} is a non-canonical numeric form of {address} "
                             "(only dotted-quad IPv4 hosts are fetched)")
    if not guard.allows(host):
        return BLOCKED_ADDRESS, f"address {host} is refused"
    return None


@dataclass
class StaticResolver(AbstractResolver):
    """Resolves names from a fixed map (tests and benchmarks: never touches the network's DNS)."""

    hosts: dict[str, str] = field(default_factory=dict)

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.hosts:
            raise OSError(f"unknown host {host!r}")
        address = self.hosts[host]
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": fam,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None
