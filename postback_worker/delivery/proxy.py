"""Fixed egress through a forward proxy: HTTP CONNECT tunnels to the checked partner address.

The sender resolves and checks the partner's address itself (the address guard), then asks
the proxy to `CONNECT <checked IP>:<port>`, so the proxy can neither re-resolve the name nor
be used to reach an address the guard refuses. TLS (for https) runs inside the tunnel, with the
partner's host name for SNI and the certificate check. Anything that goes wrong with the proxy
itself (cannot connect, refuses the tunnel, answers garbage) raises `ProxyFailed`, which the
sender reports as its own failure class (`proxy`): never the partner's fault.
"""

from __future__ import annotations

import asyncio
import base64
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


@dataclass(frozen=True, repr=False)
class Proxy:
    host: str
    port: int
    authorization: str | None = None  # "Basic ..." from user:password in the URL

    def __repr__(self) -> str:
        return f"Proxy({self.host}:{self.port})"

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"


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


async def tunnel(proxy: Proxy, ip: str, port: int, timeout: float,
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a CONNECT tunnel to ip:port through `proxy`; raises ProxyFailed."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(proxy.host, proxy.port), timeout)
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
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            OSError) as exc:
        writer.close()
        raise ProxyFailed(f"the egress proxy {proxy.key} closed the tunnel request "
                          f"({type(exc).__name__})") from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", errors="replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit() or not parts[0].startswith("HTTP/"):
        writer.close()
        raise ProxyFailed(f"the egress proxy {proxy.key} answered {status_line[:80]!r}")
    if not 200 <= int(parts[1]) < 300:
        writer.close()
        raise ProxyFailed(f"the egress proxy {proxy.key} refused the tunnel to {authority}: "
                          f"{status_line[:120]}")
    return reader, writer
