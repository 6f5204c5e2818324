"""A fast local partner for the benchmark: raw asyncio HTTP/1.1 keep-alive server.

Run as its own process (so it never competes for the measuring process's GIL):

    python bench/fast_partner.py [--host 127.0.0.1] [--port 0] [--delay-ms 0]

It prints ``READY <port>`` on stdout once it listens. Every request is answered
``200 OK`` with ``Content-Length`` (keep-alive unless the client sends ``Connection: close``),
optionally after ``--delay-ms`` (``loop.call_later``, so delayed requests stay concurrent).

Control paths (not counted):
  GET /__count   body = number of counted requests since start / last reset
  GET /__reset   sets the counter to 0

uvloop is used when importable.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK"
_OK_CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nOK"
)
_MAX_HEAD = 64 * 1024


class Counter:
    requests = 0


def _plain(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class PartnerProtocol(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD and self.transport is not None:
                    self.transport.close()
                return
            head = self.buf[:end]
            lower = head.lower()
            length = 0
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                try:
                    length = int(lower[at + 17 : stop if stop >= 0 else None].strip())
                except ValueError:
                    length = 0
            body_start = end + 4
            if len(self.buf) < body_start + length:
                return  # wait for the rest of the body
            self.buf = self.buf[body_start + length :]
            request_line = head.split(b"\r\n", 1)[0]
            close = b"\r\nconnection: close" in lower
            self._handle(request_line, close)

    def _handle(self, request_line: bytes, close: bool) -> None:
        parts = request_line.split(b" ")
        path = parts[1] if len(parts) > 1 else b"/"
        if path.startswith(b"/__count"):
            self._write(_plain(str(Counter.requests).encode()), close)
            return
        if path.startswith(b"/__reset"):
            Counter.requests = 0
            self._write(_plain(b"0"), close)
            return
        Counter.requests += 1
        response = _OK_CLOSE if close else _OK
        if self.delay > 0:
            self.loop.call_later(self.delay, self._write, response, close)
        else:
            self._write(response, close)

    def _write(self, response: bytes, close: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(response)
        if close:
            t.close()


async def serve(host: str, port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: PartnerProtocol(delay), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    coro = serve(args.host, args.port, args.delay_ms / 1000.0)
    try:
        import uvloop
    except ImportError:
        print("LOOP asyncio", flush=True)
        asyncio.run(coro)
    else:
        print("LOOP uvloop", flush=True)
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
