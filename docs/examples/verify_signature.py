"""Partner side: verify postback-worker's HMAC-SHA256 signature (Python stdlib only).

Run a receiver that answers 200 to correctly signed postbacks and 401 to the rest:

    python verify_signature.py --secret "$POSTBACK_SECRET" [--old-secret "$OLD"] --port 8080

or import `verify` into your own endpoint. See docs/signing.md.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_SECONDS = 300  # refuse timestamps older (or newer) than this: stops replays


def expected_signature(secret: str, postback_id: str, timestamp: str, payload: str) -> str:
    message = f"{postback_id}.{timestamp}.{payload}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(secrets: Iterable[str], postback_id: str, timestamp: str, signature_header: str,
           payload: str, now: float | None = None) -> bool:
    """True when the timestamp is fresh and one `v1=` signature matches one of `secrets`.

    payload: for GET the request target as received (path and query, e.g.
    "/pb?tid=abc&payout=1.5"); for POST the raw request body.
    """
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > TOLERANCE_SECONDS:
        return False
    given = [part.strip()[3:] for part in signature_header.split(",")
             if part.strip().startswith("v1=")]
    wanted = [expected_signature(s, postback_id, timestamp, payload) for s in secrets if s]
    return any(hmac.compare_digest(g, w) for g in given for w in wanted)


def make_handler(secrets: list[str], header: str = "X-Postback-Signature") -> type:
    class Handler(BaseHTTPRequestHandler):
        def _check(self, payload: str) -> None:
            ok = verify(secrets, self.headers.get("X-Postback-Id", ""),
                        self.headers.get("X-Postback-Timestamp", ""),
                        self.headers.get(header, ""), payload)
            body = b"success=true" if ok else b"bad signature"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self._check(self.path)

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("Content-Length") or 0)
            self._check(self.rfile.read(length).decode())

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secret", required=True)
    parser.add_argument("--old-secret", default="", help="accepted too, during a rotation")
    parser.add_argument("--header", default="X-Postback-Signature")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port),
                                 make_handler([args.secret, args.old_secret], args.header))
    print(f"verifying postbacks on http://127.0.0.1:{args.port}/")
    server.serve_forever()


if __name__ == "__main__":
    main()
