"""The demo `postback-worker up --demo` runs against a live stack, through its HTTP API only."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click
import requests

from postback_worker.domain.postback import FINAL_STATES

# Where the demo partner listens (`up --partner-port`): a fixed port, so that the partners'
# stored URLs still reach it after `up` restarts (replays, test fires).
DEMO_PARTNER_PORT = 8001
PAGES = {"/ok": (200, b"success=true"), "/down": (503, b"maintenance"),
         "/blocked": (403, b"forbidden")}


class DemoPartner:
    """A local partner for as long as the stack runs: /ok answers 200 success=true, /down 503,
    /blocked 403. `POST /heal` makes every path answer like /ok (the partner is back and has
    allowlisted us), `POST /break` undoes it."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[str] = []
        self.healed = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.received.append(self.path)
                page = self.path.split("?")[0]
                if page in PAGES and outer.healed:
                    page = "/ok"
                self._answer(*PAGES.get(page, (404, b"not found")))

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                page = self.path.split("?")[0]
                if page not in ("/heal", "/break"):
                    self._answer(404, b"not found")
                    return
                outer.healed = page == "/heal"
                self._answer(200, b"healed: every path answers 200 success=true\n"
                             if outer.healed else b"broken again: /down 503, /blocked 403\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Sends the stack's bootstrap admin token (set by run_demo); the API needs a credential.
_http = requests.Session()


def _post(api: str, path: str, body: Any) -> Any:
    r = _http.post(f"{api}{path}", json=body, timeout=10)
    if r.status_code >= 400:
        raise click.ClickException(f"POST {path} answered {r.status_code}: {r.text}")
    return r.json()


def run_demo(api: str, partner: DemoPartner, timeout: float = 90.0, token: str = "",
             cli: str = "postback-worker") -> bool:
    """Create an offer and partners, record clicks, send conversions, print what happened.
    The partner keeps answering after this returns (the caller closes it)."""
    if token:
        _http.headers["Authorization"] = f"Bearer {token}"
    return _run(api, partner, timeout, cli)


def _run(api: str, partner: DemoPartner, timeout: float, cli: str) -> bool:
    qs = "tid={transaction_id}&payout={payout}&sub={aff_sub}&pb={postback_id}"
    click.echo(f"demo partner listening at {partner.url} (/ok 200, /down 503, /blocked 403)")
    _post(api, "/v1/offers", {"id": "demo-offer", "name": "Demo lead gen",
                              "campaign_type": "lead_gen",
                              "landing_url": "https://advertiser.example/land?click={transaction_id}"})
    _post(api, "/v1/partners", {"id": "aff-good", "postback_url": f"{partner.url}/ok?{qs}",
                                "success_check": "success=true"})
    _post(api, "/v1/partners", {"id": "aff-down", "postback_url": f"{partner.url}/down?{qs}",
                                "max_attempts": 3, "base_delay": 1, "max_delay": 2})
    _post(api, "/v1/partners", {"id": "aff-blocked", "postback_url": f"{partner.url}/blocked?{qs}"})
    click.echo("offer demo-offer (lead_gen, 14-day lifespan); partners aff-good, aff-down, "
               "aff-blocked")

    now = datetime.now(UTC)
    old = (now - timedelta(days=20)).isoformat()
    clicks = [
        {"offer_id": "demo-offer", "aff_id": "aff-good", "aff_sub": "summer sale & more"},
        {"offer_id": "demo-offer", "aff_id": "aff-good", "aff_sub": "banner-2"},
        {"offer_id": "demo-offer", "aff_id": "aff-good", "clicked_at": old},
        {"offer_id": "demo-offer", "aff_id": "aff-down"},
        {"offer_id": "demo-offer", "aff_id": "aff-blocked"},
        {"offer_id": "demo-offer", "aff_id": "aff-good"},
    ]
    tx = _post(api, "/v1/clicks", clicks)["transaction_ids"]
    click.echo(f"recorded {len(tx)} clicks (one of them 20 days old)")
    conversions = [
        {"transaction_id": tx[0], "payout": "12.50", "currency": "USD"},
        {"transaction_id": tx[1], "payout": "7", "currency": "USD"},
        {"transaction_id": tx[2], "payout": "30"},
        {"transaction_id": tx[3], "payout": "5"},
        {"transaction_id": tx[4], "payout": "5"},
        {"transaction_id": tx[5], "payout": "9", "status": "pending"},
        {"transaction_id": tx[0], "payout": "12.50", "currency": "USD"},
        {"transaction_id": "tx_never_clicked", "payout": "3"},
    ]
    ids = _post(api, "/v1/conversions", conversions)["ids"]
    click.echo(f"sent {len(ids)} conversions; waiting for every one to reach a final state...")

    details = _wait_final(api, ids, timeout)
    rows = []
    counts: Counter[str] = Counter()
    for cid in ids:
        d = details.get(cid)
        if d is None:
            rows.append((cid, "(not processed)", "", ""))
            continue
        c = d["conversion"]
        pbs = "; ".join(f"{p['partner_id']}: {p['state']} after {p['attempts']} attempt(s)"
                        for p in d["postbacks"]) or "-"
        for p in d["postbacks"]:
            counts[p["state"]] += 1
        rows.append((cid, c["state"], c["reason"] or "", pbs))
    click.echo("")
    for cid, state, reason, pbs in rows:
        click.echo(f"{cid}  {state}")
        click.echo(f"    why:       {reason}")
        click.echo(f"    postbacks: {pbs}")
    click.echo("")
    click.echo(f"postbacks delivered: {counts['delivered']}, skipped: {counts['skipped']}, "
               f"dead-lettered: {counts['dead_lettered']}, "
               f"still pending: {sum(v for k, v in counts.items() if k not in FINAL_STATES)}")
    click.echo(f"the demo partner received {len(partner.received)} requests, e.g.:")
    for path in partner.received[:3]:
        click.echo(f"  GET {path}")
    _next_steps(cli, partner.url, ids[0])
    return len(details) == len(ids) and all(
        p["state"] in FINAL_STATES for d in details.values() for p in d["postbacks"]
    )


def _wait_final(api: str, ids: list[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    details: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for cid in ids:
            r = _http.get(f"{api}/v1/conversions/{cid}", timeout=10)
            if r.status_code == 200:
                details[cid] = r.json()
        done = len(details) == len(ids) and all(
            d["conversion"]["state"] != "received"
            and all(p["state"] in FINAL_STATES for p in d["postbacks"])
            for d in details.values()
        )
        if done:
            break
        time.sleep(0.5)
    return details


def _next_steps(cli: str, partner_url: str, conversion_id: str) -> None:
    click.echo(f"""
Try, in another terminal of this directory (the CLI finds this stack by itself):
  {cli} show {conversion_id}
  {cli} dlq list
  {cli} dlq replay --partner aff-down        # 503 again: the partner is still down
  curl -X POST {partner_url}/heal        # the demo partner recovers
  {cli} dlq replay --partner aff-down        # delivered
  {cli} dashboard link""")
