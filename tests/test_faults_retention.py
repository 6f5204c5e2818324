"""Data retention: clicks, attempts and delivered postbacks purged in small batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import wait_until
from sqlalchemy import func, insert, select
from support.helpers import NOW, add_click, add_offer

from postback_worker.ops.oncall.retention import Purger, click_retention_days
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store
from postback_worker.worker.app import celery_config
from postback_worker.worker.tasks_retention import TASK_PURGE


@pytest.mark.parametrize(("setting", "longest", "days", "warned"), [
    (180, 120, 180, False),
    (120, 120, 120, False),
    (30, 120, 120, True),
    (0, 14, 14, True),
])
def test_click_retention_never_shorter_than_the_longest_lifespan(
        setting: int, longest: int, days: int, warned: bool) -> None:
    got, warning = click_retention_days(setting, longest)
    assert got == days
    assert (warning is not None) == warned
    if warned:
        assert warning == (f"click_retention_days={setting} is shorter than the longest offer "
                           f"lifespan ({longest} days); keeping clicks {longest} days")


def test_beat_runs_the_purge_on_the_maintenance_queue(settings: Settings) -> None:
    entry = celery_config(settings.with_overrides(retention_interval=900.0))["beat_schedule"][
        "purge-expired-data"]
    assert entry["task"] == TASK_PURGE
    assert entry["schedule"] == 900.0
    assert entry["options"]["queue"] == "maintenance"


def _postback(store: Store, pid: str, *, state: str, delivered_at: datetime | None,
              attempts_at: list[datetime], dead: bool = False) -> None:
    conv = f"cv_{pid}"
    with store.engine.begin() as conn:
        conn.execute(insert(t.conversions), [{
            "id": conv, "transaction_id": f"tx_{pid}", "offer_id": "o1", "aff_id": "p1",
            "goal_id": "", "status": "approved", "occurred_at": NOW, "received_at": NOW,
            "state": "attributed"}])
        conn.execute(insert(t.postbacks), [{
            "id": pid, "conversion_id": conv, "partner_id": "p1", "url": "http://x/", "method":
            "GET", "state": state, "attempts": len(attempts_at), "received_at": NOW,
            "created_at": NOW, "updated_at": NOW, "delivered_at": delivered_at}])
        conn.execute(insert(t.attempts), [{
            "postback_id": pid, "attempt_no": i + 1, "started_at": at, "duration_ms": 1.0,
            "url": "http://x/", "failure_class": "delivered", "is_test": False}
            for i, at in enumerate(attempts_at)])
        if dead:
            conn.execute(insert(t.dead_letters), [{
                "postback_id": pid, "partner_id": "p1", "failure_class": "partner_5xx",
                "reason": "503", "attempts": 1, "created_at": NOW, "replay_count": 1}])


def _count(store: Store, table: Any, *where: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar())


def _ids(store: Store, column: Any) -> set[str]:
    with store.engine.connect() as conn:
        return {r[0] for r in conn.execute(select(column))}


def test_purge_keeps_what_retention_keeps_and_deletes_the_rest(
        store: Store, settings: Settings) -> None:
    add_offer(store, "o1", "ecommerce")  # 30 days
    add_offer(store, "o2", "financial")  # 120 days: the longest lifespan
    for tx, age in [("c_new", 10), ("c_100", 100), ("c_119", 119), ("c_121", 121),
                    ("c_200", 200), ("c_400", 400)]:
        add_click(store, tx, clicked_at=NOW - timedelta(days=age))
    old, recent = NOW - timedelta(days=40), NOW - timedelta(days=5)
    _postback(store, "pb_old_delivered", state="delivered", delivered_at=old,
              attempts_at=[old, old], dead=True)
    _postback(store, "pb_new_delivered", state="delivered", delivered_at=recent,
              attempts_at=[recent])
    _postback(store, "pb_old_dead", state="dead_lettered", delivered_at=None,
              attempts_at=[old, recent], dead=True)
    _postback(store, "pb_retrying", state="retry_scheduled", delivered_at=None,
              attempts_at=[recent])
    # Clicks asked for 30 days: clipped to the 120-day lifespan of o2.
    s = settings.with_overrides(click_retention_days=30, attempt_retention_days=20,
                                delivered_retention_days=30, retention_batch=2)
    result = Purger(s, store, clock=lambda: NOW).run()

    assert result.click_days == 120 and result.warning is not None
    assert _ids(store, t.clicks.c.transaction_id) == {"c_new", "c_100", "c_119"}
    assert _ids(store, t.postbacks.c.id) == {"pb_new_delivered", "pb_old_dead", "pb_retrying"}
    # Old attempts of a kept postback go too; its dead letter stays (replayable).
    assert _count(store, t.attempts, t.attempts.c.postback_id == "pb_old_dead") == 1
    assert _ids(store, t.dead_letters.c.postback_id) == {"pb_old_dead"}
    assert result.deleted == {"clicks": 3, "delivered_postbacks": 1, "attempts": 1,
                              "conversion_events": 0}
    assert result.more is False
    # A second run finds nothing more.
    assert Purger(s, store, clock=lambda: NOW).run().deleted == {
        "clicks": 0, "delivered_postbacks": 0, "attempts": 0, "conversion_events": 0}


def _events(store: Store, conv: str, recorded: list[datetime]) -> None:
    with store.engine.begin() as conn:
        conn.execute(insert(t.conversion_events), [{
            "conversion_id": conv, "seq": i + 1, "event_id": f"{conv}-ev{i + 1}",
            "kind": "created" if i == 0 else "adjusted", "status": "approved",
            "previous_status": None if i == 0 else "approved", "payout": str(i),
            "summary": "", "occurred_at": at, "received_at": at, "recorded_at": at}
            for i, at in enumerate(recorded)])


def _seqs(store: Store, conv: str) -> list[int]:
    with store.engine.connect() as conn:
        return sorted(r[0] for r in conn.execute(select(t.conversion_events.c.seq).where(
            t.conversion_events.c.conversion_id == conv)))


def test_conversion_events_superseded_and_old_are_purged_the_last_and_needed_stay(
        store: Store, settings: Settings) -> None:
    add_offer(store, "o1", "ecommerce")
    old, older, recent = (NOW - timedelta(days=d) for d in (40, 45, 5))
    # cv_pb_a: three old events, then a recent one; the second is carried by a postback
    # still waiting for a retry (its replay or retry renders from it).
    _postback(store, "pb_a", state="retry_scheduled", delivered_at=None, attempts_at=[old])
    with store.engine.begin() as conn:
        conn.execute(t.postbacks.update().where(t.postbacks.c.id == "pb_a").values(event_seq=2))
    _events(store, "cv_pb_a", [older, older, old, recent])
    # cv_pb_b: every event old; the last stays (later updates fold onto it).
    _postback(store, "pb_b", state="delivered", delivered_at=recent, attempts_at=[recent])
    _events(store, "cv_pb_b", [older, old])
    # cv_pb_c: superseded long before the look-back window: left for good (documented).
    _postback(store, "pb_c", state="delivered", delivered_at=recent, attempts_at=[recent])
    _events(store, "cv_pb_c", [NOW - timedelta(days=80), recent])
    s = settings.with_overrides(event_retention_days=30, event_retention_lookback_days=20,
                                retention_batch=1)
    result = Purger(s, store, clock=lambda: NOW).run()
    assert result.deleted["conversion_events"] == 3
    assert _seqs(store, "cv_pb_a") == [2, 4]
    assert _seqs(store, "cv_pb_b") == [2]
    assert _seqs(store, "cv_pb_c") == [1, 2]
    assert Purger(s, store, clock=lambda: NOW).run().deleted["conversion_events"] == 0


def test_a_run_is_bounded_and_the_next_run_goes_on(store: Store, settings: Settings) -> None:
    add_offer(store, "o1", "lead_gen")
    for i in range(7):
        add_click(store, f"old{i}", clicked_at=NOW - timedelta(days=365))
    s = settings.with_overrides(click_retention_days=30, retention_batch=2,
                                retention_max_batches=2)
    first = Purger(s, store, clock=lambda: NOW).run()
    assert first.deleted["clicks"] == 4 and first.more is True
    second = Purger(s, store, clock=lambda: NOW).run()
    assert second.deleted["clicks"] == 3 and second.more is False
    assert _count(store, t.clicks) == 0


def test_time_moves_the_cutoff(store: Store, settings: Settings) -> None:
    add_offer(store, "o1", "lead_gen")
    add_click(store, "tx", clicked_at=NOW)
    s = settings.with_overrides(click_retention_days=60)
    assert Purger(s, store, clock=lambda: NOW + timedelta(days=59)).run().deleted["clicks"] == 0
    assert Purger(s, store, clock=lambda: NOW + timedelta(days=61)).run().deleted["clicks"] == 1


@pytest.mark.e2e
def test_the_worker_runs_the_purge_task(store: Store, settings: Settings,
                                        celery_procs: Any) -> None:
    from celery import Celery

    add_offer(store, "o1", "lead_gen")
    long_ago = datetime.now(UTC) - timedelta(days=1000)
    add_click(store, "ancient", clicked_at=long_ago)
    add_click(store, "fresh", clicked_at=datetime.now(UTC))
    celery_procs("worker", concurrency=1)
    app = Celery(broker=settings.redis.effective_broker_url)
    try:
        app.send_task(TASK_PURGE, queue="maintenance")
        wait_until(lambda: _count(store, t.clicks) == 1, timeout=60,
                   message="the purge task to delete the old click")
    finally:
        app.close()
    assert _ids(store, t.clicks.c.transaction_id) == {"fresh"}
