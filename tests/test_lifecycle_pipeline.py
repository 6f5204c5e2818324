"""Conversion lifecycle through the pipeline: real PostgreSQL, a real local partner, an
injected clock (no Celery: see test_lifecycle_e2e.py for the workers)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from sqlalchemy import select, text
from support.helpers import NOW, Clock, add_click, add_offer, conversion, messages
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.domain.deadletters import Filter
from postback_worker.ops.config import parse_partner
from postback_worker.ops.oncall import reattribute, replay
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.db import make_engine, upgrade
from postback_worker.store.journal import Journal
from postback_worker.store.repo import Store

ALL = "approved,adjustment,reversal"
EVENT_QS = "tid={transaction_id}&e={event}&s={status}&was={previous_status}&p={payout}&r={revenue}"


@pytest.fixture()
def pipeline(settings: Settings, store: Store, clock: Clock) -> Iterator[Pipeline]:
    sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=8)
    yield Pipeline(settings, store, sender, clock=clock, rand=lambda: 0.0, worker_name="test")
    sender.close()


def setup(store: Store, partner: PartnerServer, **offer: Any) -> None:
    """Offer o1; partner p1 (own clicks) fires on approved, adjustment and reversal; partner
    pg (global) only on approved (the default); one click tx1 of affiliate p1."""
    add_offer(store, "o1", **offer)
    store.upsert_partner(parse_partner({"id": "p1", "fire_events": ALL,
                                        "postback_url": f"{partner.url}/all?{EVENT_QS}"}, NOW))
    store.upsert_partner(parse_partner({"id": "pg", "scope": "global",
                                        "postback_url": f"{partner.url}/one?{EVENT_QS}"}, NOW))
    add_click(store, "tx1", aff_id="p1")


def received(partner: PartnerServer, path: str) -> list[tuple[str, str, str]]:
    """(event, status, payout) of each request the partner got on `path`, in arrival order."""
    return [(r.query["e"][0], r.query["s"][0], r.query.get("p", [""])[0])
            for r in partner.received() if r.path == path]


def drain(pipeline: Pipeline, clock: Clock, rounds: int = 5, step: float = 2.0) -> None:
    """Let time pass and run the sweep like beat does, a few times."""
    for _ in range(rounds):
        clock.advance(step)
        pipeline.deliver(pipeline.sweep())


def root_postbacks(store: Store, conversion_id: str) -> list[dict[str, Any]]:
    return sorted(store.postbacks_for(conversion_id), key=lambda p: (p["partner_id"],
                                                                     p["event_seq"]))


def history(store: Store, conversion_id: str) -> list[tuple[int, str, str]]:
    ev = t.conversion_events.c
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            select(ev.seq, ev.kind, ev.summary).where(ev.conversion_id == conversion_id)
            .order_by(ev.seq))]  # type: ignore[misc]


@pytest.mark.parametrize("one_batch", [False, True])
def test_pending_approved_adjusted_reversed(pipeline: Pipeline, store: Store, clock: Clock,
                                            partner: PartnerServer, one_batch: bool) -> None:
    """The issue's scenario: the all-events partner gets approved, adjustment, reversal in
    that order, once each; the default partner gets exactly one postback."""
    setup(store, partner)
    events = [conversion("tx1", status="pending", payout="10"),
              conversion("tx1", status="approved", payout="10"),
              conversion("tx1", status="approved", payout="12.5"),
              conversion("tx1", status="rejected", payout="12.5")]
    if one_batch:
        pipeline.process_conversions(messages(*events))
    else:
        for e in events:
            pipeline.process_conversions(messages(e))
            clock.advance(1)
    drain(pipeline, clock)
    for e in events:  # redelivered messages change nothing
        pipeline.process_conversions(messages(e))
    drain(pipeline, clock)
    assert received(partner, "/all") == [("approved", "approved", "10"),
                                         ("adjustment", "approved", "12.5"),
                                         ("reversal", "rejected", "12.5")]
    assert received(partner, "/one") == [("approved", "approved", "10")]
    root = events[0].id
    conv = store.get_conversion(root)
    assert conv is not None
    assert (conv["state"], conv["status"], conv["payout"]) == ("attributed", "rejected", "12.5")
    assert [store.get_conversion(e.id)["state"] for e in events[1:]] == [  # type: ignore[index]
        "updated"] * 3
    assert history(store, root) == [(1, "created", "created pending"),
                                    (2, "status_changed", "pending -> approved"),
                                    (3, "adjusted", "payout 10 -> 12.5"),
                                    (4, "status_changed", "approved -> rejected")]
    rows = root_postbacks(store, root)
    assert [(p["partner_id"], p["event_seq"], p["event"], p["state"]) for p in rows] == [
        ("p1", 1, None, "skipped"), ("p1", 2, "approved", "delivered"),
        ("p1", 3, "adjustment", "delivered"), ("p1", 4, "reversal", "delivered"),
        ("pg", 1, None, "skipped"), ("pg", 2, "approved", "delivered")]
    assert all(p["attempts"] == 1 for p in rows if p["state"] == "delivered")


def test_exact_repeat_is_a_recorded_no_op(pipeline: Pipeline, store: Store,
                                          partner: PartnerServer) -> None:
    setup(store, partner)
    first, again = conversion("tx1", payout="10"), conversion("tx1", payout="10.00")
    pipeline.process_conversions(messages(first))
    pipeline.process_conversions(messages(again))
    repeat = store.get_conversion(again.id)
    assert repeat is not None and repeat["state"] == "duplicate"
    assert repeat["reason"] == (
        f"duplicate of conversion {first.id} (same offer, transaction_id and goal_id, same "
        "status and amounts): recorded as event 2, nothing fires")
    assert history(store, first.id)[1] == (2, "repeat", "repeat of approved (no change)")
    assert len(received(partner, "/all")) == 1


@pytest.mark.parametrize("mode, states, fired", [
    ("ignore", ["attributed", "duplicate"], 1),
    ("separate", ["attributed", "attributed"], 2),
    ("update", ["attributed", "updated"], 2),  # approved, then an adjustment
])
def test_duplicate_modes(pipeline: Pipeline, store: Store, partner: PartnerServer, mode: str,
                         states: list[str], fired: int) -> None:
    setup(store, partner, duplicate_mode=mode)
    a, b = conversion("tx1", payout="10"), conversion("tx1", payout="11")
    pipeline.process_conversions(messages(a))
    pipeline.process_conversions(messages(b))
    assert [store.get_conversion(e.id)["state"] for e in (a, b)] == states  # type: ignore[index]
    assert len(received(partner, "/all")) == fired


def test_approved_retrying_goes_before_the_reversal(pipeline: Pipeline, store: Store,
                                                    clock: Clock,
                                                    partner: PartnerServer) -> None:
    """503 on the approved postback: the reversal waits without spending attempts, then
    follows once the approved one is delivered."""
    setup(store, partner)
    partner.route("/all", 503)
    approved = conversion("tx1", payout="10")
    pipeline.process_conversions(messages(approved))
    clock.advance(0.01)
    reversal = conversion("tx1", status="reversed", payout="10", now=clock())
    pipeline.process_conversions(messages(reversal))
    partner.route("/all", 200)
    rows = {p["event"]: p for p in root_postbacks(store, approved.id) if p["partner_id"] == "p1"}
    assert rows["approved"]["state"] == "retry_scheduled"
    waiting = rows["reversal"]
    assert (waiting["state"], waiting["attempts"]) == ("retry_scheduled", 0)
    assert waiting["reason"] == (f"waiting: earlier postback {rows['approved']['id']} "
                                 "(approved) is retry_scheduled")
    drain(pipeline, clock)
    assert [e for e, _, _ in received(partner, "/all")] == ["approved", "approved", "reversal"]
    rows = {p["event"]: p for p in root_postbacks(store, approved.id) if p["partner_id"] == "p1"}
    assert [(rows[e]["state"], rows[e]["attempts"]) for e in ("approved", "reversal")] == [
        ("delivered", 2), ("delivered", 1)]


def test_hold_period(pipeline: Pipeline, store: Store, clock: Clock,
                     partner: PartnerServer) -> None:
    """An approved postback waits the offer's 24 h hold; a reversal inside the hold fires
    nothing; without one, the sweep releases the postback after the hold."""
    setup(store, partner, hold_hours=24)
    add_click(store, "tx2", aff_id="p1")
    held, kept = conversion("tx1", payout="10"), conversion("tx2", payout="7")
    pipeline.process_conversions(messages(held, kept))
    assert partner.count() == 0
    pb = next(p for p in store.postbacks_for(held.id) if p["partner_id"] == "p1")
    assert (pb["state"], pb["next_attempt_at"]) == ("retry_scheduled", NOW + timedelta(hours=24))
    assert pb["reason"] == "held: 24 h hold period, until 2026-11-27T12:00:00Z"
    clock.advance(3600)
    pipeline.process_conversions(messages(conversion("tx1", status="reversed", payout="10",
                                                     now=clock())))
    clock.advance(23 * 3600 + 60)
    drain(pipeline, clock)
    assert [r.query["tid"][0] for r in partner.received()] == ["tx2", "tx2"]  # p1 and pg
    rows = {(p["partner_id"], p["event"]): p for p in store.postbacks_for(held.id)}
    assert (rows[("p1", "approved")]["state"], rows[("p1", "approved")]["reason"]) == (
        "skipped", "cancelled: the conversion was reversed during the hold period")
    assert rows[("p1", "reversal")]["state"] == "skipped"
    assert rows[("p1", "reversal")]["reason"] == (
        "reversed (reversed) during the hold period: the held postback is cancelled and "
        "nothing fires")
    assert rows[("pg", "approved")]["state"] == "skipped"


def test_partner_hold_override_and_payout_rules(pipeline: Pipeline, store: Store,
                                                partner: PartnerServer) -> None:
    setup(store, partner, hold_hours=24, payout_rules={"pg": "fixed:3"})
    store.upsert_partner({**store.get_partner("p1"), "hold_hours": 0,  # type: ignore[dict-item]
                          "payout_rule": "percent:40", "status_map": '{"approved": "sale"}'})
    pipeline.catalog.refresh(force=True)
    pipeline.process_conversions(messages(conversion("tx1", payout="10", sale_amount="99.99",
                                                     currency="EUR")))
    (got,) = [r for r in partner.received() if r.path == "/all"]
    assert {k: v[0] for k, v in got.query.items() if k in {"e", "s", "p", "r"}} == {
        "e": "approved", "s": "sale", "p": "40.00", "r": "10"}
    assert received(partner, "/one") == []  # pg keeps the offer's hold


def test_dead_letter_blocks_later_events_until_replayed(pipeline: Pipeline, store: Store,
                                                        settings: Settings, clock: Clock,
                                                        partner: PartnerServer) -> None:
    setup(store, partner)
    partner.route("/all", 401)
    approved = conversion("tx1", payout="10")
    pipeline.process_conversions(messages(approved))
    adjusted = conversion("tx1", payout="11", now=clock())
    reversed_ = conversion("tx1", status="reversed", payout="11", now=clock())
    pipeline.process_conversions(messages(adjusted, reversed_))
    drain(pipeline, clock)
    rows = {p["event"]: p for p in root_postbacks(store, approved.id) if p["partner_id"] == "p1"}
    dead = rows["approved"]
    assert dead["state"] == "dead_lettered"
    for event in ("adjustment", "reversal"):
        assert (rows[event]["state"], rows[event]["attempts"], rows[event]["next_attempt_at"]) \
            == ("retry_scheduled", 0, None)
    assert rows["adjustment"]["reason"] == (f"waiting: earlier postback {dead['id']} (approved) "
                                            "was dead-lettered; replaying it releases this one")
    partner.reset()
    run, _ = replay.start(store, settings, Filter(partner_id="p1"), who="test", rate=100,
                          now=clock(), enqueue=None)
    assert run.queued == 1
    pipeline.deliver([dead["id"]])
    drain(pipeline, clock)
    assert [e for e, _, _ in received(partner, "/all")] == ["approved", "adjustment",
                                                            "reversal"]


def test_event_arriving_after_a_newer_one_changes_nothing(pipeline: Pipeline, store: Store,
                                                          clock: Clock,
                                                          partner: PartnerServer) -> None:
    """Two workers may take a conversion's events out of order: the older one, applied
    second, is recorded as stale and does not undo the newer one."""
    setup(store, partner)
    pending = conversion("tx1", status="pending", payout="10",
                         occurred_at=(NOW - timedelta(hours=1)).isoformat())
    approved = conversion("tx1", payout="10")
    pipeline.process_conversions(messages(approved))
    pipeline.process_conversions(messages(pending))
    conv = store.get_conversion(approved.id)
    assert conv is not None and conv["status"] == "approved"
    assert history(store, approved.id) == [
        (1, "created", "created approved"),
        (2, "stale", "pending arrived after a newer event (no change)")]
    assert received(partner, "/all") == [("approved", "approved", "10")]


def test_lifecycle_on_sqlite(tmp_path: Path, settings: Settings, clock: Clock,
                             partner: PartnerServer) -> None:
    """The embedded default (SQLite) folds events, keeps order and records history too."""
    url = f"sqlite:///{tmp_path / 'pbw.db'}"
    upgrade(url)
    store = Store(make_engine(url))
    setup(store, partner)
    partner.route("/all", 503)
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        pipeline = Pipeline(settings.with_overrides(database_url=url), store, sender,
                            clock=clock, rand=lambda: 0.0)
        approved = conversion("tx1", payout="10")
        pipeline.process_conversions(messages(approved))
        pipeline.process_conversions(messages(conversion("tx1", status="reversed",
                                                         payout="10", now=clock())))
        partner.route("/all", 200)
        drain(pipeline, clock)
    assert [e for e, _, _ in received(partner, "/all")] == ["approved", "approved", "reversal"]
    assert [k for _, k, _ in history(store, approved.id)] == ["created", "status_changed"]


def test_reattribution_folds_the_events_in_order(pipeline: Pipeline, store: Store,
                                                 clock: Clock,
                                                 partner: PartnerServer) -> None:
    """Pending then approved, both after the click's lifespan: lost. Once the lifespan is
    extended, re-attribution folds them into one conversion and the partner gets the approval
    once."""
    setup(store, partner, lifespan_days=1)
    add_click(store, "tx-old", aff_id="p1", clicked_at=NOW - timedelta(days=2))
    pending = conversion("tx-old", status="pending", payout="3")
    approved = conversion("tx-old", payout="3", now=NOW + timedelta(seconds=1))
    pipeline.process_conversions(messages(pending))
    pipeline.process_conversions(messages(approved))
    assert {store.get_conversion(e.id)["state"] for e in (pending, approved)} == {  # type: ignore[index]
        "expired_click"}
    store.upsert_offer({**store.get_offer("o1"), "lifespan_days": 3})  # type: ignore[dict-item]
    pipeline.catalog.refresh(force=True)
    _, plan, taken = reattribute.start(store, "o1", since=None, until=None, who="test",
                                       now=clock(), enqueue=None)
    assert taken == 2
    pipeline.reprocess([e["conversion_id"] for e in plan.eligible], "test")
    assert [store.get_conversion(e.id)["state"] for e in (pending, approved)] == [  # type: ignore[index]
        "attributed", "updated"]
    assert history(store, pending.id) == [(1, "created", "created pending"),
                                          (2, "status_changed", "pending -> approved")]
    assert received(partner, "/all") == [("approved", "approved", "3")]


def test_two_workers_apply_one_conversions_events_in_order(settings: Settings, store: Store,
                                                           clock: Clock,
                                                           partner: PartnerServer) -> None:
    """Durable intake: three events of one conversion wait in the journal; worker A takes the
    first (and is slow), worker B takes the other two meanwhile. B waits for A's event before
    folding its own, so nothing is reordered or lost: pending, approved, rejected."""
    setup(store, partner)
    events = [conversion("tx1", status=s, payout="10", now=NOW + timedelta(seconds=i))
              for i, s in enumerate(("pending", "approved", "rejected"))]
    Journal(store).record(events)
    claimed, go = threading.Event(), threading.Event()
    slow = Store(store.engine)
    look_up = slow.clicks_by_transaction

    def paused(conn: Any, txs: Any) -> Any:
        claimed.set()  # A holds the first event's row lock from here until it commits
        assert go.wait(30)
        return look_up(conn, txs)

    slow.clicks_by_transaction = paused  # type: ignore[method-assign]
    sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=8)
    workers = [Pipeline(settings, s, sender, clock=clock, rand=lambda: 0.0, worker_name=name)
               for s, name in ((slow, "a"), (store, "b"))]
    results: dict[str, Any] = {}
    try:
        a = threading.Thread(target=lambda: results.update(
            a=workers[0].intake_pending(limit=1, max_rounds=1)))
        a.start()
        assert claimed.wait(30)
        b = threading.Thread(target=lambda: results.update(
            b=workers[1].intake_pending(limit=10, max_rounds=1)))
        b.start()
        wait_until(lambda: not b.is_alive() or lock_waiters(store) > 0, timeout=30)
        assert lock_waiters(store) == 1, "worker B must wait for A's older event"
        go.set()
        a.join(30)
        b.join(30)
        assert results["a"].conversions == {"rejected_status": 1}  # pending fires nobody
        assert results["b"].conversions == {"updated": 2}
        drain(workers[1], clock)
    finally:
        go.set()
        sender.close()
    root = events[0].id
    assert history(store, root) == [(1, "created", "created pending"),
                                    (2, "status_changed", "pending -> approved"),
                                    (3, "status_changed", "approved -> rejected")]
    conv = store.get_conversion(root)
    assert conv is not None and (conv["state"], conv["status"]) == ("attributed", "rejected")
    assert received(partner, "/all") == [("approved", "approved", "10"),
                                         ("reversal", "rejected", "10")]
    assert received(partner, "/one") == [("approved", "approved", "10")]


def lock_waiters(store: Store) -> int:
    """Backends of this database waiting for a row lock."""
    with store.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar_one())
