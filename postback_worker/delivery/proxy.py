"""Fixed egress through a forward proxy: HTTP CONNECT tunnels to the checked partner address.

The sender resolves and checks the partner's address itself (the address guard), then asks
the proxy to `CONNECT <checked IP>:<port>`, so the proxy can neither re-resolve the name nor
be used to reach an address the guard refuses. TLS (for https) runs inside the tunnel, with the
partner's host name for SNI and the certificate check. Anything that goes wrong with the proxy
itself (cannot connect, refuses the tunnel, answers garbage) raises `ProxyFailed`, which the
sender reports as its own failure class (`proxy`): never the partner's fault. A proxy that
answers 502 or 504 to CONNECT could not reach the partner: that is the partner's `network`
failure, as it would be without the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass
from urllib.parse import unquote

from urllib3.util import parse_url

DIRECT = "direct"
SETTING = "POSTBACK_EGRESS_PROXY"
_HEAD_LIMIT = 16 * 1024


class ProxyError(ValueError):
    """A proxy address we cannot use."""


class ProxyFailed(Exception):
    """The egress proxy itself failed (unreachable, refused the tunnel, broken answer)."""


class TargetUnreachable(ConnectionRefusedError):
    """The proxy works but could not connect to the partner (502/504 to CONNECT): a network
    failure of the partner's, like a refused direct connection."""


# CONNECT answers meaning "the proxy is fine, the partner's address did not answer".
UPSTREAM_FAILED = frozenset({502, 504})


@dataclass(frozen=True, repr=False)
class Proxy:
    host: str
    port: int
    authorization: str | None = None  # "Basic ..." from user:password in the URL

    def __repr__(self) -> str:
        return f"Proxy({self.host}:{self.port})"

    @property
    def key(self) -> str:
        """host:port, for messages (never the credentials)."""
        return f"{self.host}:{self.port}"

    @property
    def pool_key(self) -> str:
        """Tunnels are pooled per proxy and per credential (a digest, not the secret)."""
        if not self.authorization:
            return self.key
        digest = hashlib.sha256(self.authorization.encode()).hexdigest()[:16]
        return f"{self.key}#{digest}"


def parse_proxy(url: str) -> Proxy:
    """http://[user:password@]host:port; raises ProxyError naming what is wrong."""
    try:
        u = parse_url(url.strip())
    except ValueError as exc:
        raise ProxyError(f"cannot parse the proxy address: {exc}") from None
    if (u.scheme or "").lower() != "http":
        raise ProxyError("the proxy address must start with http:// (CONNECT is used for "
                         "https partners)")
    if not u.host:
        raise ProxyError("the proxy address has no host")
    if u.path not in (None, "", "/") or u.query:
        raise ProxyError("the proxy address takes no path or query: http://host:port")
    auth = None
    if u.auth:
        user, _, password = u.auth.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        auth = f"Basic {token}"
    return Proxy(u.host.strip("[]"), u.port or 3128, auth)


def choose(partner_proxy: str | None, default: str) -> Proxy | None:
    """The proxy for a partner: its own, else the deployment's; None for a direct request."""
    chosen = partner_proxy or default
    if not chosen or chosen == DIRECT:
        return None
    return parse_proxy(chosen)


class _Handshake(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT; the caller then hands the transport on."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if not self.done.done() and (end >= 0 or len(self.buffer) > _HEAD_LIMIT):
            self.done.set_result(bytes(self.buffer[:end]) if end >= 0 else b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(b"")


async def tunnel(proxy: Proxy, ip: str, port: int, timeout: float) -> asyncio.Transport:
    """A transport tunnelled to ip:port through `proxy` (CONNECT); raises ProxyFailed, or
    TargetUnreachable when the proxy could not reach the partner."""
    loop = asyncio.get_running_loop()
    try:
        transport, hs = await asyncio.wait_for(
            loop.create_connection(_Handshake, proxy.host, proxy.port), timeout)
    except TimeoutError:
        raise ProxyFailed(f"the egress proxy {proxy.key} did not accept a connection within "
                          f"{timeout:g} s") from None
    except OSError as exc:
        raise ProxyFailed(f"cannot connect to the egress proxy {proxy.key}: "
                          f"{exc.strerror or exc}") from None
    authority = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        head = await asyncio.wait_for(asyncio.shield(hs.done), timeout)
    except TimeoutError:
        transport.close()
        raise ProxyFailed(f"the egress proxy {proxy.key} did not answer CONNECT within "
                          f"{timeout:g} s") from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", errors="replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit() or not parts[0].startswith("HTTP/"):
        transport.close()
        raise ProxyFailed(f"the egress proxy {proxy.key} answered {status_line[:80]!r}"
                          if status_line else
                          f"the egress proxy {proxy.key} closed the tunnel request")
    status = int(parts[1])
    if status in UPSTREAM_FAILED:
        transport.close()
        raise TargetUnreachable(f"the egress proxy {proxy.key} could not reach {authority}: "
                                f"{status_line[:120]}")
    if not 200 <= status < 300:
        transport.close()
        raise ProxyFailed(f"the egress proxy {proxy.key} refused the tunnel to {authority}: "
                          f"{status_line[:120]}")
    return transport
