"""A minimal OTLP/HTTP traces sink for measuring tracing overhead (stands in for a collector).

    .venv/bin/python bench/otlp_sink.py --port 4318 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 .venv/bin/python bench/e2e.py --only ours

It answers every export at once and counts spans only when stopped (SIGTERM or Ctrl-C), so
decoding costs the machine nothing while the benchmark runs.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BODIES: list[bytes] = []


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        BODIES.append(self.rfile.read(int(self.headers.get("content-length") or 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return


def count() -> dict[str, int]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    names: dict[str, int] = {}
    for body in BODIES:
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    names[s.name] = names.get(s.name, 0) + 1
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=4318)
    port = ap.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    names = count()
    print(f"{len(BODIES)} exports, {sum(names.values())} spans", file=sys.stderr)
    for name, n in sorted(names.items()):
        print(f"  {name}: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
