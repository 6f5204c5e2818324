"""A real local HTTP server playing the partner, for tests.

Runs `ThreadingHTTPServer` (HTTP/1.1, keep-alive) on 127.0.0.1 (or ::1) in a background thread,
records every request and answers according to rules switchable at runtime.
"""

from __future__ import annotations

import collections
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Response:
    """One canned answer. `close` means: drop the connection without answering."""

    status: int = 200
    body: bytes = b"OK"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    close: bool = False


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client_port: int
    at: float
    # The request target exactly as received (path and query string).
    target: str = ""

    def header(self, name: str) -> str | None:
        """Case-insensitive header lookup."""
        lname = name.lower()
        for k, v in self.headers.items():
            if k.lower() == lname:
                return v
        return None


def _as_response(spec: Response | Mapping[str, Any] | int) -> Response:
    if isinstance(spec, Response):
        return spec
    if isinstance(spec, int):
        return Response(status=spec)
    return Response(**spec)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True
    partner: PartnerServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-answer is normal here (timeouts, dropped connections).
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError | ssl.SSLError):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _handle(self) -> None:
        partner = self.server.partner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        req = ReceivedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=dict(self.headers.items()),
            body=body,
            client_port=self.client_address[1],
            at=time.time(),
            target=self.path,
        )
        resp = partner._record_and_choose(req)
        if resp.delay and partner._stop.wait(resp.delay):
            self.close_connection = True
            return
        if resp.close:
            self.close_connection = True
            return
        try:
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if resp.body and self.command != "HEAD":
                self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


class PartnerServer:
    """Context manager: `with PartnerServer() as p: ... p.url ...`."""

    def __init__(self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> None:
        self._host = host
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self.requests: list[ReceivedRequest] = []
        self._default = Response()
        self._script: collections.deque[Response] = collections.deque()
        self._routes: list[tuple[str, Response]] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> PartnerServer:
        server_class = _Server6 if ":" in self._host else _Server
        httpd = server_class((self._host, 0), _Handler)
        httpd.partner = self
        if self._ssl_context is not None:
            httpd.socket = self._ssl_context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> PartnerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    # behaviour
    def set_response(
        self,
        status: int = 200,
        body: bytes = b"OK",
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Default answer for every path without a route (and once the script is used up)."""
        with self._lock:
            self._default = Response(status, body, dict(headers or {}), delay)

    def set_script(self, responses: Iterable[Response | Mapping[str, Any] | int]) -> None:
        """Answers used in order (one per request, any path), then back to routes/default."""
        with self._lock:
            self._script = collections.deque(_as_response(r) for r in responses)

    def close_connection_without_response(self, path_prefix: str | None = None) -> None:
        """Drop the connection without answering (globally, or for one path prefix)."""
        with self._lock:
            if path_prefix is None:
                self._default = Response(close=True)
            else:
                self._add_route(path_prefix, Response(close=True))

    def route(
        self,
        path_prefix: str,
        status: int = 200,
        body: bytes = b"OK",
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer for paths starting with `path_prefix` (longest prefix wins)."""
        with self._lock:
            self._add_route(path_prefix, Response(status, body, dict(headers or {}), delay))

    def reset(self) -> None:
        """Forget requests, script and routes; default back to 200 OK."""
        with self._lock:
            self.requests.clear()
            self._script.clear()
            self._routes.clear()
            self._default = Response()

    def _add_route(self, prefix: str, resp: Response) -> None:
        self._routes = [(p, r) for p, r in self._routes if p != prefix]
        self._routes.append((prefix, resp))
        self._routes.sort(key=lambda pr: len(pr[0]), reverse=True)

    def _record_and_choose(self, req: ReceivedRequest) -> Response:
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()
            if self._script:
                return self._script.popleft()
            for prefix, resp in self._routes:
                if req.path.startswith(prefix):
                    return resp
            return self._default

    # inspection
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def received(self) -> list[ReceivedRequest]:
        """A snapshot of the requests so far."""
        with self._lock:
            return list(self.requests)

    def postback_ids(self) -> list[str]:
        return [pid for r in self.received() if (pid := r.header("X-Postback-Id")) is not None]

    def client_ports(self) -> set[int]:
        """Distinct client ports seen: one per TCP connection."""
        return {r.client_port for r in self.received()}

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least `n` requests arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)
