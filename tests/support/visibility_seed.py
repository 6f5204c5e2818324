"""A known delivery history for the visibility tests: healthy, 503, 403 and 404 partners, lost
conversions, a postback still retrying and a test fire, made by the real pipeline against the
real local partner server with an injected clock."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import uvicorn
from conftest import wait_until
from sqlalchemy import insert

from postback_worker.api.app import create_app
from postback_worker.dev.services import free_port
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import schema
from postback_worker.store.repo import Store
from support.helpers import NOW, Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

# partner id -> (path, status it answers, conversions sent)
PARTNERS = {
    "p-ok": ("/ok", 200, 6),
    "p-down": ("/down", 503, 3),
    "p-blocked": ("/blocked", 403, 2),
    "p-gone": ("/gone", 404, 1),
}




@dataclass
class Scenario:
    conversion_ids: list[str] = field(default_factory=list)
    test_postback_id: str = ""
    statuses: dict[str, int] = field(default_factory=dict)  # path -> status

    def received_status_codes(self, partner: PartnerServer) -> Counter[str]:
        """What the partner server actually answered, counted by status code."""
        return Counter(str(self.statuses[r.path]) for r in partner.received())


def seed(store: Store, partner: PartnerServer, pipeline: Pipeline, clock: Clock) -> Scenario:
    sc = Scenario()
    add_offer(store, "o1", "ecommerce")
    add_offer(store, "o2", "lead_gen")
    events = []
    for pid, (path, status, n) in PARTNERS.items():
        add_partner(store, pid, partner.url, path=path)
        partner.route(path, status)
        sc.statuses[path] = status
        for i in range(n):
            tx = f"tx-{pid}-{i}"
            add_click(store, tx, aff_id=pid)
            events.append(conversion(tx, payout="2.50", now=clock()))
    for i in range(2):  # clicks older than o2's 14-day lifespan
        add_click(store, f"tx-old-{i}", offer_id="o2", aff_id="p-ok",
                  clicked_at=NOW - timedelta(days=20))
        events.append(conversion(f"tx-old-{i}", now=clock()))
    events.append(conversion("tx-nobody", offer_id="o1", now=clock()))
    pipeline.process_conversions(messages(*events))
    for _ in range(6):  # p-down: retried until its attempts run out
        clock.advance(5)
        pipeline.deliver(pipeline.sweep())
    # One more p-down conversion, still retrying (pending) at the end.
    add_click(store, "tx-p-down-late", aff_id="p-down")
    late = conversion("tx-p-down-late", now=clock())
    pipeline.process_conversions(messages(late))
    sc.conversion_ids = [e.id for e in [*events, late]]
    sc.test_postback_id = _test_fire(store, clock())
    return sc


def _test_fire(store: Store, now: datetime) -> str:
    """What a test-fire tool leaves: a conversion, a postback and an attempt with is_test."""
    with store.engine.begin() as conn:
        conn.execute(insert(schema.conversions).values(
            id="cv-testfire", transaction_id="tx-testfire", offer_id="o1", aff_id="p-ok",
            goal_id="", status="approved", occurred_at=now, received_at=now, state="attributed",
            processed_at=now))
        conn.execute(insert(schema.postbacks).values(
            id="pb-testfire", conversion_id="cv-testfire", partner_id="p-ok",
            url="http://127.0.0.1/ok", method="GET", state="dead_lettered", attempts=1,
            last_status=500, last_class="partner_5xx", received_at=now, created_at=now,
            updated_at=now, last_attempt_at=now, reason="test fire"))
        conn.execute(insert(schema.attempts).values(
            postback_id="pb-testfire", attempt_no=1, started_at=now, duration_ms=9999.0,
            url="http://127.0.0.1/ok", status_code=500, failure_class="partner_5xx",
            is_test=True))
    return "pb-testfire"


class Served:
    """The real API app on a local port (uvicorn in a thread)."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, message="uvicorn to start")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_api(settings: Settings) -> Callable[[], Served]:
    return lambda: Served(settings)
