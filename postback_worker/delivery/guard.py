"""Outbound address guard: refuse private, loopback, link-local, reserved and metadata addresses.

The sender resolves a host once, checks every address here and then connects to the checked
address itself, so a DNS answer cannot change between the check and the connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from postback_worker.errors import Forbidden

Resolver = Callable[[str, int], list[str]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWLIST_SETTING = "POSTBACK_ALLOW_NETWORKS"

METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
# Ranges the stdlib flags do not all cover (shared CGNAT space, 6to4/Teredo relays, NAT64).
_EXTRA_BLOCKED: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("100.64.0.0/10"), "shared (carrier-grade NAT) address"),
    (ipaddress.ip_network("64:ff9b:1::/48"), "reserved address"),
)


class AddressBlocked(Forbidden):
    """The destination resolves to an address outbound requests must not reach."""


def default_resolver(host: str, port: int) -> list[str]:
    """All addresses of `host` (IPv4 and IPv6), in resolver order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]).split("%", 1)[0], None)
    return list(seen)


@lru_cache(maxsize=64)
def parse_networks(allow_networks: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings; raises ValueError naming the bad entry."""
    nets: list[IPNetwork] = []
    for raw in allow_networks:
        try:
            nets.append(ipaddress.ip_network(raw.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{ALLOWLIST_SETTING}: invalid network {raw!r}: {exc}") from None
    return tuple(nets)


def _in_networks(addr: IPAddress, nets: Iterable[IPNetwork]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _classify(addr: IPAddress) -> str | None:
    if addr in METADATA_ADDRESSES:
        return "cloud metadata address"
    checks = (
        ("is_unspecified", "unspecified address"),
        ("is_loopback", "loopback address"),
        ("is_link_local", "link-local address"),
        ("is_multicast", "multicast address"),
        ("is_reserved", "reserved address"),
        ("is_private", "private address"),
    )
    for attr, reason in checks:
        if getattr(addr, attr):
            return reason
    for net, reason in _EXTRA_BLOCKED:
        if addr.version == net.version and addr in net:
            return reason
    if not addr.is_global:
        return "non-global address"
    return None


def check_address(ip: str, allow_networks: Sequence[str] = ()) -> str | None:
    """Why `ip` must not be contacted (e.g. "private address"), or None when it may be.

    IPv6 addresses that lead to an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, 6to4 2002::/16,
    NAT64 64:ff9b::/96) are judged as that IPv4 address; site-local fec0::/10 is refused.
    An address inside one of `allow_networks` (CIDR strings) is always allowed.
    """
    try:
        addr: IPAddress = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    nets = parse_networks(tuple(allow_networks))
    if _in_networks(addr, nets):
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_site_local:
            return "site-local address"
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            if _in_networks(embedded, nets):
                return None
            addr = embedded
    return _classify(addr)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to: IPv4-mapped, 6to4 or NAT64 (64:ff9b::/96)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def blocked_message(ip: str, reason: str) -> str:
    """The operator-facing text of a refusal."""
    return (
        f"refused to connect to {ip} ({reason}); allowlist it with {ALLOWLIST_SETTING} if intended"
    )


def resolve_and_check(
    host: str,
    port: int,
    allow_networks: Sequence[str] = (),
    resolver: Resolver | None = None,
) -> tuple[list[str], str | None]:
    """Resolve `host` and check every address.

    Returns (allowed addresses, None) when at least one address may be contacted (the sender
    connects only to those), or (all addresses, message naming the first refused one) when none
    may. Resolution errors (socket.gaierror) propagate.
    """
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        addresses = [host]
    except ValueError:
        addresses = (resolver or default_resolver)(host, port)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"no addresses for {host}")
    allowed: list[str] = []
    first_refusal: str | None = None
    for ip in addresses:
        reason = check_address(ip, allow_networks)
        if reason is None:
            allowed.append(ip)
        elif first_refusal is None:
            first_refusal = blocked_message(ip, reason)
    if allowed:
        return allowed, None
    return addresses, first_refusal
