"""Asynchronous HTTP/1.1 transport for the sender: one event loop thread per process.

Why not a thread per request: bench/README.md measured urllib3 on a thread pool at about
2,500 requests/s per process (most of it GIL hand-offs), and one asyncio loop with the
httptools response parser (the one uvicorn uses) at about 40,000, with thousands of requests
in flight for slow partners at no extra cost. Connections are kept alive and pooled per
(scheme, checked IP, port, TLS name); responses are parsed by httptools, never by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import httptools

from postback_worker.delivery.proxy import Proxy, tunnel
from postback_worker.errors import PostbackWorkerError

DRAIN_LIMIT = 64 * 1024
# An idle pooled connection older than this is closed rather than reused (servers drop idle
# keep-alive connections, often after 5-60 s).
IDLE_LIMIT = 30.0


class ResponseTooLarge(PostbackWorkerError):
    """More than DRAIN_LIMIT bytes of body: the connection is dropped, the status kept."""


class ConnectionClosed(ConnectionResetError):
    """The server closed the connection before a complete response."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    excerpt: bytes
    error: BaseException | None = None


@dataclass
class _Exchange:
    excerpt_bytes: int
    waiter: asyncio.Future[Response]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    excerpt: bytearray = field(default_factory=bytearray)
    received: int = 0
    headers_done: bool = False


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.parser: Any = None
        self.reusable = False
        self.closed = False
        self.got_bytes = False
        self.idle_since = time.monotonic()
        self._header_name = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP or TLS stream transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.exchange is None:
            self._close()  # unsolicited bytes: never reuse this connection
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionClosed("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        ex = self.exchange
        if ex is None or ex.waiter.done():
            return
        if ex.headers_done:  # a body delimited by the connection closing
            self._finish()
        else:
            self._fail(exc or ConnectionClosed("server closed the connection without answering"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.exchange is not None
        if name:
            self._header_name = name
            key = name.decode("latin-1").lower()
            self.exchange.headers[key] = value.decode("latin-1")
        elif self._header_name:  # a header value continued over several packets
            key = self._header_name.decode("latin-1").lower()
            self.exchange.headers[key] += value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.exchange is not None
        self.exchange.status = self.parser.get_status_code()
        self.exchange.headers_done = True

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        room = ex.excerpt_bytes - len(ex.excerpt)
        if room > 0:
            ex.excerpt += body[:room]
        ex.received += len(body)
        if ex.received > DRAIN_LIMIT:
            self.reusable = False
            self._finish(ResponseTooLarge(f"response body over {DRAIN_LIMIT} bytes"))
            self._close()

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is None or ex.waiter.done():
            return
        if 100 <= ex.status < 200:  # an interim response: the real one follows
            ex.headers.clear()
            ex.headers_done = False
            self.parser = httptools.HttpResponseParser(self)
            return
        self.reusable = bool(self.parser.should_keep_alive()) and not self.closed
        self._finish()

    # helpers
    def start(self, payload: bytes, excerpt_bytes: int) -> asyncio.Future[Response]:
        assert self.transport is not None
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.exchange = _Exchange(excerpt_bytes, waiter)
        self.parser = httptools.HttpResponseParser(self)
        self.reusable = False
        self.got_bytes = False
        self.transport.write(payload)
        return waiter

    def _finish(self, error: BaseException | None = None) -> None:
        ex = self.exchange
        if ex is not None and not ex.waiter.done():
            ex.waiter.set_result(Response(ex.status, ex.headers, bytes(ex.excerpt), error))

    def _fail(self, exc: BaseException) -> None:
        ex = self.exchange
        self.reusable = False
        if ex is not None and not ex.waiter.done():
            ex.waiter.set_exception(exc)
        self._close()

    def _close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()
            self.closed = True


# (scheme, checked IP, port, TLS name, proxy host:port or "")
PoolKey = tuple[str, str, int, str, str]


class Transport:
    """Runs exchanges on a private event loop thread; safe to call from any thread."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = max(1, concurrency)
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[PoolKey, list[_Conn]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._ssl: ssl.SSLContext | None = None

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._pid != os.getpid():  # after fork the parent's loop thread does not exist
            with self._lock:
                if self._pid != os.getpid():
                    self._lock = threading.Lock()
                    self._idle = {}
                    self._loop = _new_loop()
                    self._slots = None
                    thread = threading.Thread(target=self._loop.run_forever,
                                              name="postback-transport", daemon=True)
                    thread.start()
                    self._pid = os.getpid()
        assert self._loop is not None
        return self._loop

    def submit(self, make: Callable[[], Any]) -> Future[Any]:
        """Run the coroutine `make()` builds on the loop; a concurrent Future of its result."""
        return asyncio.run_coroutine_threadsafe(self._limited(make), self._ensure_loop())

    async def _limited(self, make: Callable[[], Any]) -> Any:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:
            return await make()

    def close(self) -> None:
        if self._loop is None or self._pid != os.getpid():
            return
        loop = self._loop

        async def shutdown() -> None:
            for conns in self._idle.values():
                for c in conns:
                    c._close()
            self._idle.clear()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self._loop = None
        self._pid = -1

    async def exchange(self, key: PoolKey, payload: bytes, excerpt_bytes: int,
                       connect: Callable[[], Any]) -> Response:
        """Send `payload` on a pooled connection (or a new one) and read the response.

        A pooled connection the server had already closed (nothing came back at all) is
        replaced once by a fresh one: the request never reached the partner's application.
        """
        conn, reused = self._take(key), True
        if conn is None:
            conn, reused = await connect(), False
        try:
            response = await conn.start(payload, excerpt_bytes)
        except ConnectionClosed:
            if not reused or conn.got_bytes:
                raise
            conn = await connect()
            response = await conn.start(payload, excerpt_bytes)
        finally:
            conn.exchange = None
        if conn.reusable and response.error is None:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
        else:
            conn._close()
        return response

    def _take(self, key: PoolKey) -> _Conn | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if not conn.closed and now - conn.idle_since < IDLE_LIMIT:
                return conn
            conn._close()
        return None

    async def open(self, ip: str, port: int, tls_name: str | None, proxy: Proxy | None = None,
                   proxy_timeout: float = 5.0) -> _Conn:
        """A new connection to ip:port, directly or through a CONNECT tunnel of `proxy`."""
        loop = asyncio.get_running_loop()
        context = None
        if tls_name is not None:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        if proxy is None:
            _, conn = await loop.create_connection(
                _Conn, host=ip, port=port, ssl=context,
                server_hostname=tls_name if context is not None else None)
            return conn
        raw: asyncio.BaseTransport = await tunnel(proxy, ip, port, proxy_timeout)
        conn = _Conn()
        if context is not None:
            try:
                tls = await loop.start_tls(raw, conn, context,  # type: ignore[arg-type]
                                           server_hostname=tls_name)
            except BaseException:
                raw.close()
                raise
            assert tls is not None
            raw = tls
        else:
            raw.set_protocol(conn)
        conn.connection_made(raw)
        return conn


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.new_event_loop()
