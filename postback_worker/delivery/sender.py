"""HTTP sender: pooled keep-alive connections, address guard, no redirects; returns an Outcome.

`Sender.send` never raises: every failure becomes an `Outcome` with an `ErrorKind`.
Connections go to the IP address the guard checked (never re-resolved), with the original
Host header, SNI and certificate hostname, so DNS rebinding cannot slip past the guard.
The sender signs each request itself (request target or body, exactly as sent) when the
request carries signing keys.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import queue
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

from urllib3 import exceptions as u3exc
from urllib3.util import Url, make_headers, parse_url

from postback_worker.delivery.guard import Resolver, parse_networks, resolve_and_check
from postback_worker.delivery.proxy import Proxy, ProxyError, ProxyFailed, choose, parse_proxy
from postback_worker.delivery.signing import SigningKeys, request_headers
from postback_worker.delivery.transport import Transport
from postback_worker.domain.retry import ErrorKind, Outcome
from postback_worker.errors import InvalidInput
from postback_worker.settings import DeliverySettings

DNS_CACHE_SECONDS = 30.0
_MESSAGE_LIMIT = 300
_QUERY_RE = re.compile(r"(?P<base>(?:[a-zA-Z][a-zA-Z0-9+.-]*://|/)[^\s?'\"]*)\?[^\s'\"]*")


FORM = "application/x-www-form-urlencoded"
# Headers the sender sets itself; a partner's custom headers cannot replace them.
RESERVED_HEADERS = frozenset({"host", "content-length", "x-postback-id", "transfer-encoding",
                              "connection"})


@dataclass(frozen=True, repr=False)
class PostbackRequest:
    """One HTTP request to a partner.

    `body`: the rendered request body (POST); for a POST without one, the URL's query string
    is sent as a form body. `signing`: the partner's keys; the sender then signs what it sends
    (at `signed_at`, else its clock's now). repr shows neither headers nor body: they may hold
    secrets.
    """

    postback_id: str
    url: str
    method: str = "GET"
    timeout: float = 10.0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str | None = None
    content_type: str | None = None
    signing: SigningKeys | None = None
    signed_at: datetime | None = None
    # The partner's own egress proxy ("direct": none); None: the sender's default.
    proxy: str | None = None

    def __repr__(self) -> str:
        return f"PostbackRequest({self.postback_id!r}, method={self.method!r})"


class InvalidURL(InvalidInput):
    """The postback URL cannot be sent (no http/https scheme, no host, unparsable)."""


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # without brackets
    port: int
    host_header: str
    request_uri: str
    body: bytes | None
    auth: str | None


def _parse_target(req: PostbackRequest) -> _Target:
    try:
        u: Url = parse_url(req.url.strip())
    except u3exc.LocationParseError as exc:
        raise InvalidURL(f"cannot parse URL: {exc}") from None
    scheme = (u.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise InvalidURL(f"unsupported or missing scheme {scheme!r}" if scheme else "no scheme")
    if not u.host:
        raise InvalidURL("no host in URL")
    host = u.host.strip("[]")
    port = u.port or (443 if scheme == "https" else 80)
    authority = u.host if u.port is None else f"{u.host}:{u.port}"
    method = req.method.upper()
    if method == "POST":
        if req.body is not None:
            return _Target(scheme, host, port, authority, u.request_uri,
                           req.body.encode("utf-8", errors="replace"), u.auth)
        body = (u.query or "").encode()
        return _Target(scheme, host, port, authority, u.path or "/", body, u.auth)
    return _Target(scheme, host, port, authority, u.request_uri, None, u.auth)


def signed_payload(target: _Target) -> str:
    """What a signature covers: the body as sent, or without a body the request target."""
    if target.body is not None:
        return target.body.decode("utf-8", errors="replace")
    return target.request_uri


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _scrub(text: str, req: PostbackRequest | None = None) -> str:
    """One line, no query strings (they carry tokens), bounded length."""
    if req is not None and "?" in req.url:
        text = text.replace(req.url, req.url.split("?", 1)[0])
        query = req.url.split("?", 1)[1]
        if query:
            text = text.replace(query, "")
    text = _QUERY_RE.sub(r"\g<base>", text)
    text = " ".join(text.split())
    return text[:_MESSAGE_LIMIT]


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for item in list(chain):
        # urllib3 ProtocolError("Connection aborted.", RemoteDisconnected(...)) keeps it in args.
        chain.extend(a for a in item.args if isinstance(a, BaseException) and a not in chain)
    return chain


def classify_exception(exc: BaseException) -> ErrorKind:
    """Map an exception raised while sending to an ErrorKind."""
    chain = _cause_chain(exc)

    def has(*types: type[BaseException]) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(ProxyFailed):
        return ErrorKind.PROXY
    if has(InvalidURL, u3exc.LocationValueError):
        return ErrorKind.INVALID_URL
    if has(socket.gaierror, u3exc.NameResolutionError):
        return ErrorKind.DNS
    if has(u3exc.SSLError, ssl.SSLError, ssl.CertificateError):
        return ErrorKind.TLS
    if has(ConnectionRefusedError):
        return ErrorKind.REFUSED
    if has(
        ConnectionResetError,
        ConnectionAbortedError,
        BrokenPipeError,
        http.client.RemoteDisconnected,
        http.client.IncompleteRead,
    ):
        return ErrorKind.RESET
    if has(u3exc.ReadTimeoutError, socket.timeout, TimeoutError):
        return ErrorKind.TIMEOUT
    # NewConnectionError subclasses ConnectTimeoutError: only a real timeout gets here unwrapped.
    if isinstance(exc, u3exc.ConnectTimeoutError) and not isinstance(exc, u3exc.NewConnectionError):
        return ErrorKind.TIMEOUT
    if has(u3exc.ProtocolError):
        return ErrorKind.RESET
    return ErrorKind.OTHER


def _describe(exc: BaseException, req: PostbackRequest) -> str:
    return _scrub(f"{type(exc).__name__}: {exc}", req)


@lru_cache(maxsize=256)
def _proxy_for(partner_proxy: str | None, default: str) -> Proxy | None:
    try:
        return choose(partner_proxy, default)
    except ProxyError as exc:
        raise ProxyFailed(f"unusable egress proxy address: {exc}") from None


class Answers(Iterator[tuple[int, Outcome]]):
    """(index, outcome) of concurrent requests in the order they complete; `ready()` says how
    many have completed and not been taken yet (to take them without waiting)."""

    def __init__(self, futures: Sequence[Future[Outcome]]) -> None:
        self._left = len(futures)
        self._done: queue.SimpleQueue[tuple[int, Future[Outcome]]] = queue.SimpleQueue()
        for i, f in enumerate(futures):
            f.add_done_callback(lambda f, i=i: self._done.put((i, f)))  # type: ignore[misc]

    def __next__(self) -> tuple[int, Outcome]:
        if self._left == 0:
            raise StopIteration
        self._left -= 1
        index, future = self._done.get()
        return index, future.result()

    def ready(self) -> int:
        return min(self._done.qsize(), self._left)


class Sender:
    """Sends postbacks over pooled keep-alive connections; see module docstring."""

    def __init__(
        self,
        *,
        concurrency: int = 32,
        excerpt_bytes: int = 512,
        user_agent: str = "postback-worker/0.1",
        allow_networks: Sequence[str] = (),
        resolver: Callable[[str, int], list[str]] | None = None,
        clock: Callable[[], datetime] | None = None,
        egress_proxy: str = "",
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.excerpt_bytes = max(0, excerpt_bytes)
        self.user_agent = user_agent
        self.allow_networks = tuple(allow_networks)
        parse_networks(self.allow_networks)  # fail fast on a bad CIDR
        self.resolver: Resolver | None = resolver
        self.clock = clock or (lambda: datetime.now(UTC))
        self.egress_proxy = egress_proxy
        if egress_proxy:
            parse_proxy(egress_proxy)  # fail fast on a bad proxy address
        self.transport = Transport(self.concurrency)
        # (host, port) -> (when, addresses, refusal); `when` None: an IP literal, whose check
        # depends on nothing else (it is not resolved), kept until the cache is cleared.
        self._dns: dict[tuple[str, int], tuple[float | None, list[str], str | None]] = {}

    @classmethod
    def from_settings(cls, delivery: DeliverySettings, concurrency: int | None = None,
                      ) -> Sender:
        """A sender configured by the delivery settings (`concurrency` overrides theirs)."""
        return cls(concurrency=concurrency or delivery.concurrency,
                   excerpt_bytes=delivery.response_excerpt_bytes,
                   user_agent=delivery.user_agent, allow_networks=delivery.allow_networks,
                   egress_proxy=delivery.egress_proxy)

    def close(self) -> None:
        """Close pooled connections and stop the event loop (rebuilt on next use)."""
        self.transport.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # sending
    def send_many(self, reqs: Sequence[PostbackRequest]) -> list[Outcome]:
        """Send concurrently; outcomes in input order."""
        futures = [self._submit(r) for r in reqs]
        return [f.result() for f in futures]

    def _submit(self, req: PostbackRequest) -> Future[Outcome]:
        return self.transport.submit(lambda: self._send(req))

    def send_iter(self, reqs: Sequence[PostbackRequest]) -> Answers:
        """Send concurrently; iterate (index, outcome) as each completes."""
        return Answers([self._submit(r) for r in reqs])

    def send(self, req: PostbackRequest) -> Outcome:
        """Send one request; never raises."""
        return self._submit(req).result()

    async def _send(self, req: PostbackRequest) -> Outcome:
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000.0, 3)

        try:
            return await asyncio.wait_for(self._attempt(req, elapsed), req.timeout)
        except TimeoutError:
            return Outcome(error=ErrorKind.TIMEOUT, duration_ms=elapsed(),
                           error_message=f"no complete answer within {req.timeout:g} s")
        except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
            return Outcome(error=classify_exception(exc), error_message=_describe(exc, req),
                           duration_ms=elapsed())

    async def _attempt(self, req: PostbackRequest, elapsed: Callable[[], float]) -> Outcome:
        target = _parse_target(req)
        try:
            addresses, blocked = await self._resolve(target.host, target.port)
        except UnicodeError as exc:  # e.g. an IDNA label longer than 63 characters
            raise InvalidURL(f"invalid host name {target.host!r}: {exc}") from None
        except socket.gaierror as exc:
            return Outcome(error=ErrorKind.DNS, duration_ms=elapsed(),
                           error_message=_scrub(f"DNS lookup of {target.host} failed: {exc}"))
        if blocked is not None:
            return Outcome(error=ErrorKind.BLOCKED_ADDRESS, error_message=blocked,
                           duration_ms=elapsed())
        ip = addresses[0]
        tls_name = target.host if target.scheme == "https" else None
        payload = self._payload(req, target)
        proxy = _proxy_for(req.proxy, self.egress_proxy)
        response = await self.transport.exchange(
            (target.scheme, ip, target.port, tls_name or "", proxy.pool_key if proxy else ""),
            payload, self.excerpt_bytes,
            lambda: self.transport.open(ip, target.port, tls_name, proxy, req.timeout / 2))
        return Outcome(
            status_code=response.status,
            error_message=_describe(response.error, req) if response.error else "",
            duration_ms=elapsed(),
            body_excerpt=response.excerpt.decode("utf-8", errors="replace"),
            retry_after=response.headers.get("retry-after"),
        )

    async def _resolve(self, host: str, port: int) -> tuple[list[str], str | None]:
        """resolve_and_check, off the loop for names, remembered for DNS_CACHE_SECONDS (we
        connect to the address that was checked, so a cached answer cannot be rebound)."""
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and (cached[0] is None or now - cached[0] < DNS_CACHE_SECONDS):
            return cached[1], cached[2]
        if _is_ip(host.strip("[]").split("%", 1)[0]):
            addresses, blocked = resolve_and_check(host, port, self.allow_networks,
                                                   self.resolver)
            self._remember(host, port, None, addresses, blocked)
            return addresses, blocked
        loop = asyncio.get_running_loop()
        addresses, blocked = await loop.run_in_executor(
            None, resolve_and_check, host, port, self.allow_networks, self.resolver)
        self._remember(host, port, now, addresses, blocked)
        return addresses, blocked

    def _remember(self, host: str, port: int, when: float | None, addresses: list[str],
                  blocked: str | None) -> None:
        if len(self._dns) > 10_000:
            self._dns.clear()
        self._dns[(host, port)] = (when, addresses, blocked)

    def _payload(self, req: PostbackRequest, target: _Target) -> bytes:
        headers = self._headers(req, target)
        if target.body is not None:
            headers["Content-Length"] = str(len(target.body))
        lines = [f"{req.method.upper()} {target.request_uri} HTTP/1.1"]
        for name, value in headers.items():
            lines.append(f"{name}: {value}")
        if any(ch in line for line in lines for ch in "\r\n\0") or " " in target.request_uri:
            raise InvalidURL("a line break, NUL or space in the request line or a header")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("latin-1", errors="strict") + (target.body or b"")

    def _headers(self, req: PostbackRequest, target: _Target) -> dict[str, str]:
        headers: dict[str, str] = {"User-Agent": self.user_agent}
        if target.auth:
            headers.update(make_headers(basic_auth=target.auth))
        signed: dict[str, str] = {}
        if req.signing is not None:
            signed = request_headers(req.signing, req.postback_id, signed_payload(target),
                                     req.signed_at or self.clock())
        reserved = RESERVED_HEADERS | {k.lower() for k in signed}
        for name, value in req.headers.items():
            lname = name.lower()
            if lname in reserved:
                continue
            if lname == "user-agent":
                headers.pop("User-Agent", None)
            headers[name] = value
        headers["Host"] = target.host_header
        headers["X-Postback-Id"] = req.postback_id
        headers.update(signed)
        if target.body is not None and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = req.content_type or FORM
        return headers
