"""The conversion lifecycle end to end: the producer, Redis, real Celery workers and beat,
PostgreSQL and a real local partner (issue 12, item 7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proc, wait_until
from sqlalchemy import func, select
from support.helpers import NOW, add_click, add_offer
from support.partner import PartnerServer

from postback_worker.ops.config import parse_partner
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e

QS = "tid={transaction_id}&e={event}&s={status}&p={payout}"
FINAL = {"delivered", "dead_lettered", "skipped"}


def seed(store: Store, partner: PartnerServer, txs: list[str], *, global_partner: bool = True,
         **offer: Any) -> None:
    add_offer(store, "o1", **offer)
    # A 2 s timeout lets the test settings' 5 s lease pass the worker's start check.
    store.upsert_partner(parse_partner({
        "id": "p1", "fire_events": "approved,adjustment,reversal", "base_delay": 0.2,
        "max_attempts": 10, "timeout": 2.0, "postback_url": f"{partner.url}/all?{QS}"}, NOW))
    if global_partner:
        store.upsert_partner(parse_partner({
            "id": "pg", "scope": "global", "timeout": 2.0,
            "postback_url": f"{partner.url}/one?{QS}"}, NOW))
    for tx in txs:
        add_click(store, tx, aff_id="p1")


def events_recorded(store: Store, roots: list[str]) -> dict[str, int]:
    ev = t.conversion_events.c
    with store.engine.connect() as conn:
        return dict(conn.execute(  # type: ignore[arg-type]
            select(ev.conversion_id, func.count()).where(ev.conversion_id.in_(roots))
            .group_by(ev.conversion_id)).all())


def settled(store: Store, roots: list[str], events: int) -> bool:
    """Every root has `events` events recorded and every postback is final."""
    counts = events_recorded(store, roots)
    if any(counts.get(r, 0) < events for r in roots):
        return False
    return all(p["state"] in FINAL for r in roots for p in store.postbacks_for(r))


def by_tx(partner: PartnerServer, path: str) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for r in partner.received():
        if r.path == path:
            out.setdefault(r.query["tid"][0], []).append((r.query["e"][0], r.query["p"][0]))
    return out


def test_pending_approved_adjusted_reversed(settings: Settings, store: Store,
                                            partner: PartnerServer,
                                            celery_procs: Callable[..., Proc]) -> None:
    """A partner configured for all three gets approved, adjustment, reversal, in that order,
    once each; a partner that only fires on approved gets exactly one postback."""
    txs = [f"tx{i:02d}" for i in range(8)]
    seed(store, partner, txs)
    celery_procs("worker", concurrency=2)
    celery_procs("beat", sweep_interval=0.2)
    producer = Producer(settings)
    steps = [{"status": "pending", "payout": "10"}, {"status": "approved", "payout": "10"},
             {"status": "approved", "payout": "12.5"}, {"status": "rejected", "payout": "12.5"}]
    roots = producer.send_conversions([{"transaction_id": tx, **steps[0]} for tx in txs])
    for n, step in enumerate(steps, 1):
        if n > 1:
            producer.send_conversions([{"transaction_id": tx, **step} for tx in txs])
        wait_until(lambda n=n: settled(store, roots, n), 90,  # type: ignore[misc]
                   message=f"step {n} ({step['status']}) to settle")
    producer.close()
    assert by_tx(partner, "/all") == {tx: [("approved", "10"), ("adjustment", "12.5"),
                                           ("reversal", "12.5")] for tx in txs}
    assert by_tx(partner, "/one") == {tx: [("approved", "10")] for tx in txs}
    ids = partner.postback_ids()
    assert len(ids) == len(set(ids)) == 4 * len(txs)  # each postback fired once


def test_approved_retrying_still_goes_before_the_reversal(
        settings: Settings, store: Store, partner: PartnerServer,
        celery_procs: Callable[..., Proc]) -> None:
    """The approved postback fails with 503, then the partner recovers: it still receives
    approved before reversal, and the reversal spent no attempt while it waited."""
    seed(store, partner, ["tx1"], global_partner=False)
    partner.set_script([503, 503, 503])
    celery_procs("worker", concurrency=2)
    celery_procs("beat", sweep_interval=0.2)
    producer = Producer(settings)
    (root,) = producer.send_conversions([{"transaction_id": "tx1", "payout": "10"}])
    wait_until(lambda: any(p["attempts"] >= 1 for p in store.postbacks_for(root)), 60,
               message="the approved postback to fail once")
    producer.send_conversions([{"transaction_id": "tx1", "status": "reversed",
                                "payout": "10"}])
    producer.close()
    wait_until(lambda: settled(store, [root], 2), 90, message="both postbacks delivered")
    assert [r.query["e"][0] for r in partner.received()] == ["approved"] * 4 + ["reversal"]
    rows = {p["event"]: p for p in store.postbacks_for(root)}
    assert (rows["approved"]["state"], rows["approved"]["attempts"]) == ("delivered", 4)
    assert (rows["reversal"]["state"], rows["reversal"]["attempts"]) == ("delivered", 1)


def test_reversal_inside_the_hold_period_fires_nothing(
        settings: Settings, store: Store, partner: PartnerServer,
        celery_procs: Callable[..., Proc]) -> None:
    """Hold 10.8 s: the conversion reversed inside it fires nothing; the other one fires once
    the hold is over (released by beat's sweep)."""
    seed(store, partner, ["tx-rev", "tx-keep"], global_partner=False, hold_hours=0.003)
    celery_procs("worker", concurrency=2)
    celery_procs("beat", sweep_interval=0.2)
    producer = Producer(settings)
    roots = producer.send_conversions([{"transaction_id": "tx-rev", "payout": "5"},
                                       {"transaction_id": "tx-keep", "payout": "6"}])
    wait_until(lambda: events_recorded(store, roots[:1]), 60, message="the approval")
    producer.send_conversions([{"transaction_id": "tx-rev", "status": "reversed"}])
    producer.close()
    wait_until(lambda: settled(store, roots[:1], 2) and settled(store, roots[1:], 1), 90,
               message="the hold to end")
    wait_until(lambda: partner.count() >= 1, 10)
    assert by_tx(partner, "/all") == {"tx-keep": [("approved", "6")]}
    rows = {p["event"]: p for p in store.postbacks_for(roots[0])}
    assert rows["approved"]["state"] == rows["reversal"]["state"] == "skipped"
    assert rows["approved"]["reason"] == (
        "cancelled: the conversion was reversed during the hold period")
