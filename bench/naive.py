"""The naive baseline: what most teams write first. One Celery task per conversion.

Each task opens a session, and runs every step as its own statement and commit:
INSERT the conversion ('received'), SELECT the click, SELECT the offer, check the lifespan,
SELECT the partner, render the URL with str.replace + urllib.parse.quote,
``requests.get(url, timeout=10)`` (a new connection each time, no session reuse),
INSERT the postback, INSERT one attempt row, UPDATE the conversion.

It uses the same PostgreSQL database and the same tables as postback-worker, so the
benchmark measures both the same way (postbacks.delivered_at - postbacks.received_at).

Worker (the benchmark starts it; cwd = repository root):

    NAIVE_BROKER_URL=redis://127.0.0.1:6379/12 NAIVE_DATABASE_URL=postgresql://... \
        python -m celery -A bench.naive worker -Q naive --concurrency 2 -l warning

Producer: ``app.send_task(TASK, args=(message,), queue=QUEUE)`` once per conversion.
Failure handling is deliberately the simple kind (no retry schedule): it is never exercised
by the benchmark, whose partner always answers 200.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import requests
from celery import Celery
from sqlalchemy import create_engine, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from postback_worker.domain.ids import new_id
from postback_worker.store import schema as t
from postback_worker.store.db import normalize_url

QUEUE = "naive"
TASK = "naive.deliver_conversion"


def make_app(broker_url: str) -> Celery:
    """The baseline's Celery app, with the typical "safe" settings."""
    app = Celery("naive", broker=broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
    )
    return app


app = make_app(os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/12"))

# Module-level engine and session factory, as in most code bases. Creating the engine opens
# no connection, so nothing is shared across the prefork fork.
engine = create_engine(
    normalize_url(os.environ.get("NAIVE_DATABASE_URL",
                                 "postgresql://postgres@127.0.0.1:5432/postgres"))
)
SessionLocal = sessionmaker(engine)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def render(template: str, values: dict[str, Any]) -> str:
    url = template
    for name, value in values.items():
        url = url.replace("{" + name + "}", quote(str(value if value is not None else ""),
                                                  safe=""))
    return url


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@app.task(name=TASK)
def deliver_conversion(msg: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    session: Session = SessionLocal()
    try:
        session.execute(insert(t.conversions).values(
            id=msg["id"], transaction_id=msg["transaction_id"], offer_id=None, aff_id=None,
            goal_id="", payout=msg.get("payout"), status=msg.get("status") or "approved",
            occurred_at=_ts(msg["occurred_at"]), received_at=_ts(msg["received_at"]),
            state="received",
        ))
        session.commit()

        click = session.execute(
            select(t.clicks).where(t.clicks.c.transaction_id == msg["transaction_id"])
        ).mappings().first()
        if click is None:
            _set_state(session, msg["id"], "unknown_click", None, None)
            return
        offer = session.execute(
            select(t.offers).where(t.offers.c.id == click["offer_id"])
        ).mappings().first()
        if offer is None:
            _set_state(session, msg["id"], "unknown_offer", None, None)
            return
        occurred = _ts(msg["occurred_at"])
        if occurred - click["clicked_at"] > timedelta(days=offer["lifespan_days"]):
            _set_state(session, msg["id"], "expired_click", offer["id"], click["aff_id"])
            return
        partner = session.execute(
            select(t.partners).where(t.partners.c.id == click["aff_id"])
        ).mappings().first()
        if partner is None:
            _set_state(session, msg["id"], "attributed", offer["id"], click["aff_id"])
            return

        postback_id = new_id("pb")
        url = render(partner["postback_url"], {
            "transaction_id": msg["transaction_id"], "payout": msg.get("payout"),
            "postback_id": postback_id, "conversion_id": msg["id"], "offer_id": offer["id"],
            "affiliate_id": click["aff_id"], "aff_sub": click["aff_sub"],
        })
        started = datetime.now(UTC)
        status: int | None = None
        error: str | None = None
        try:
            resp = requests.get(url, timeout=10)
            status = resp.status_code
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"
        done = datetime.now(UTC)
        ok = status is not None and 200 <= status < 300

        session.execute(insert(t.postbacks).values(
            id=postback_id, conversion_id=msg["id"], partner_id=partner["id"], url=url,
            method="GET", state="delivered" if ok else "dead_lettered",
            reason=None if ok else (error or f"HTTP {status}"), attempts=1,
            first_attempt_at=started, last_attempt_at=started, last_status=status,
            received_at=_ts(msg["received_at"]), created_at=now, updated_at=done,
            delivered_at=done if ok else None,
        ))
        session.commit()
        session.execute(insert(t.attempts).values(
            postback_id=postback_id, attempt_no=1, started_at=started,
            duration_ms=(done - started).total_seconds() * 1000.0, url=url,
            status_code=status, failure_class="delivered" if ok else "network",
            error=error, worker=WORKER, is_test=False,
        ))
        session.commit()
        _set_state(session, msg["id"], "attributed", offer["id"], click["aff_id"])
    finally:
        session.close()


def _set_state(session: Session, conversion_id: str, state: str, offer_id: str | None,
               aff_id: str | None) -> None:
    session.execute(
        update(t.conversions).where(t.conversions.c.id == conversion_id).values(
            state=state, offer_id=offer_id, aff_id=aff_id, processed_at=datetime.now(UTC)
        )
    )
    session.commit()


def message(transaction_id: str, payout: str, now: datetime) -> dict[str, Any]:
    """What the naive producer sends: one small JSON object per conversion."""
    iso = now.isoformat().replace("+00:00", "Z")
    return {"id": new_id("cv"), "transaction_id": transaction_id, "payout": payout,
            "status": "approved", "occurred_at": iso, "received_at": iso}
