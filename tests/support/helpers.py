"""Seeding helpers shared by the pipeline, API and end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

from postback_worker.domain.events import ConversionEvent, parse_conversion
from postback_worker.ops.config import parse_offer, parse_partner
from postback_worker.store.repo import Store

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
QS = "tid={transaction_id}&payout={payout}&sub={aff_sub}&pb={postback_id}&cv={conversion_id}"


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def add_offer(store: Store, offer_id: str = "o1", campaign_type: str = "ecommerce",
              **extra: Any) -> dict[str, Any]:
    row = parse_offer({"id": offer_id, "campaign_type": campaign_type, **extra}, NOW)
    store.upsert_offer(row)
    return row


def add_partner(store: Store, partner_id: str, base_url: str, path: str = "/pb",
                **extra: Any) -> dict[str, Any]:
    # A local partner answers at once: a 2 s timeout (the test settings' default) lets the
    # test settings' 5 s lease pass the worker's start check (twice the longest timeout).
    extra.setdefault("timeout", 2.0)
    row = parse_partner({"id": partner_id, "postback_url": f"{base_url}{path}?{QS}", **extra}, NOW)
    store.upsert_partner(row)
    return row


def add_click(store: Store, tx: str, *, offer_id: str = "o1", aff_id: str = "p1",
              clicked_at: datetime = NOW - timedelta(days=1), **extra: Any) -> None:
    row = {"transaction_id": tx, "offer_id": offer_id, "aff_id": aff_id,
           "aff_sub": None, "aff_sub2": None, "aff_sub3": None, "aff_sub4": None,
           "aff_sub5": None, "source": None, "ip": None, "device_id": None,
           "user_agent": None, "clicked_at": clicked_at}
    row.update(extra)
    store.insert_clicks([row])


def conversion(tx: str, *, now: datetime = NOW, **fields: Any) -> ConversionEvent:
    return parse_conversion({"transaction_id": tx, **fields}, now=now)


def messages(*events: ConversionEvent) -> list[dict[str, Any]]:
    return [dict(e.to_message()) for e in events]


def run_due(pipeline: Any) -> None:
    """What beat and a worker do: sweep the postbacks that are due and deliver them."""
    ids = pipeline.sweep()
    if ids:
        pipeline.deliver(ids)


def warm_stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop a worker as deploy/ does: SIGTERM to the main process only (Celery's warm shutdown
    lets pool children finish their task), SIGKILL to its process group after `timeout`, and
    to whatever is left in the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
