"""HTTP sender: pooled keep-alive connections, address guard, no redirects; returns an Outcome.

`Sender.send` never raises: every failure becomes an `Outcome` with an `ErrorKind`.
Connections go to the IP address the guard checked (never re-resolved), with the original
Host header, SNI and certificate hostname, so DNS rebinding cannot slip past the guard.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import urllib3
from urllib3 import exceptions as u3exc
from urllib3.util import Url, make_headers, parse_url

from postback_worker.delivery.guard import Resolver, parse_networks, resolve_and_check
from postback_worker.domain.retry import ErrorKind, Outcome

DRAIN_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 300
_CHUNK = 8192
_QUERY_RE = re.compile(r"(?P<base>(?:[a-zA-Z][a-zA-Z0-9+.-]*://|/)[^\s?'\"]*)\?[^\s'\"]*")


@dataclass(frozen=True)
class PostbackRequest:
    """One HTTP request to a partner. For POST the query string is sent as a form body."""

    postback_id: str
    url: str
    method: str = "GET"
    timeout: float = 10.0
    headers: Mapping[str, str] = field(default_factory=dict)


class InvalidURL(ValueError):
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
        body = (u.query or "").encode()
        return _Target(scheme, host, port, authority, u.path or "/", body, u.auth)
    return _Target(scheme, host, port, authority, u.request_uri, None, u.auth)


def wire_payload(req: PostbackRequest) -> str:
    """What a signature covers: the request target as sent (GET) or the body (POST).

    Raises InvalidURL for a URL that cannot be sent.
    """
    target = _parse_target(req)
    if target.body is not None:
        return target.body.decode()
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
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.excerpt_bytes = max(0, excerpt_bytes)
        self.user_agent = user_agent
        self.allow_networks = tuple(allow_networks)
        parse_networks(self.allow_networks)  # fail fast on a bad CIDR
        self.resolver: Resolver | None = resolver
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._pools: urllib3.PoolManager | None = None
        self._executor: ThreadPoolExecutor | None = None

    # lifecycle
    def _after_fork_check(self) -> None:
        if self._pid != os.getpid():
            # Inherited pools/threads belong to the parent: forget them, never close them.
            self._lock = threading.Lock()
            self._pools = None
            self._executor = None
            self._pid = os.getpid()

    def _pool_manager(self) -> urllib3.PoolManager:
        self._after_fork_check()
        with self._lock:
            if self._pools is None:
                self._pools = urllib3.PoolManager(
                    num_pools=max(64, self.concurrency * 4),
                    maxsize=self.concurrency,
                    block=False,
                    retries=False,
                )
            return self._pools

    def _pool_executor(self) -> ThreadPoolExecutor:
        self._after_fork_check()
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="postback-send"
                )
            return self._executor

    def close(self) -> None:
        """Close pooled connections and stop the executor (both rebuilt on next use)."""
        self._after_fork_check()
        with self._lock:
            pools, self._pools = self._pools, None
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        if pools is not None:
            pools.clear()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # sending
    def send_many(self, reqs: Sequence[PostbackRequest]) -> list[Outcome]:
        """Send concurrently; outcomes in input order. A single request is sent inline."""
        if not reqs:
            return []
        if len(reqs) == 1:
            return [self.send(reqs[0])]
        return list(self._pool_executor().map(self.send, reqs))

    def send_iter(self, reqs: Sequence[PostbackRequest]) -> Iterator[tuple[int, Outcome]]:
        """Send concurrently; yield (index, outcome) as each completes."""
        if len(reqs) == 1:
            yield 0, self.send(reqs[0])
            return
        executor = self._pool_executor()
        futures = {executor.submit(self.send, r): i for i, r in enumerate(reqs)}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def send(self, req: PostbackRequest) -> Outcome:
        """Send one request; never raises."""
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000.0, 3)

        try:
            return self._send(req, started)
        except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
            return Outcome(
                error=classify_exception(exc),
                error_message=_describe(exc, req),
                duration_ms=elapsed(),
            )

    def _send(self, req: PostbackRequest, started: float) -> Outcome:
        target = _parse_target(req)
        try:
            addresses, blocked = resolve_and_check(
                target.host, target.port, self.allow_networks, self.resolver
            )
        except UnicodeError as exc:  # e.g. an IDNA label longer than 63 characters
            raise InvalidURL(f"invalid host name {target.host!r}: {exc}") from None
        except socket.gaierror as exc:
            return Outcome(
                error=ErrorKind.DNS,
                error_message=_scrub(f"DNS lookup of {target.host} failed: {exc}"),
                duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
            )
        if blocked is not None:
            return Outcome(
                error=ErrorKind.BLOCKED_ADDRESS,
                error_message=blocked,
                duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
            )
        ip = addresses[0]
        pool_kwargs: dict[str, Any] | None = None
        if target.scheme == "https" and not _is_ip(target.host):
            pool_kwargs = {"server_hostname": target.host, "assert_hostname": target.host}
        pool = self._pool_manager().connection_from_host(
            ip, target.port, target.scheme, pool_kwargs=pool_kwargs
        )
        headers = self._headers(req, target)
        # total: connect + TLS + waiting for the status line stay within one timeout.
        timeout = urllib3.Timeout(total=req.timeout, connect=req.timeout, read=req.timeout)
        resp = pool.urlopen(
            req.method.upper(),
            target.request_uri,
            body=target.body,
            headers=headers,
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=timeout,
            preload_content=False,
            release_conn=False,
        )
        excerpt, body_error = self._read_body(resp, started + req.timeout)
        return Outcome(
            status_code=resp.status,
            error_message=_describe(body_error, req) if body_error else "",
            duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
            body_excerpt=excerpt,
            retry_after=resp.headers.get("Retry-After"),
        )

    def _headers(self, req: PostbackRequest, target: _Target) -> dict[str, str]:
        headers: dict[str, str] = {"User-Agent": self.user_agent}
        if target.auth:
            headers.update(make_headers(basic_auth=target.auth))
        for name, value in req.headers.items():
            lname = name.lower()
            if lname in ("host", "x-postback-id", "content-length"):
                continue
            if lname == "user-agent":
                headers.pop("User-Agent", None)
            headers[name] = value
        headers["Host"] = target.host_header
        headers["X-Postback-Id"] = req.postback_id
        if target.body is not None and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        return headers

    def _read_body(
        self, resp: urllib3.BaseHTTPResponse, deadline: float
    ) -> tuple[str, BaseException | None]:
        """Excerpt of the body; drain up to DRAIN_LIMIT so the connection can be reused."""
        data = b""
        keep = False
        error: BaseException | None = None
        try:
            length = resp.headers.get("Content-Length")
            if self.excerpt_bytes:
                data = resp.read(self.excerpt_bytes)
            total = len(data)
            too_big = length is not None and length.isdigit() and int(length) > DRAIN_LIMIT
            while not too_big and time.perf_counter() < deadline:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    keep = True
                    break
                total += len(chunk)
                too_big = total > DRAIN_LIMIT
        except Exception as exc:  # noqa: BLE001 - the status is known; keep it
            error = exc
        finally:
            if not keep:
                resp.close()  # drops the socket: never reuse a half-read connection
            resp.release_conn()
        return data.decode("utf-8", errors="replace"), error
