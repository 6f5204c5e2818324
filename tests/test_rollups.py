"""Rollups: every figure read from the trigger-kept rollups equals the same figure computed
from raw rows, on the same data, through retries, replays, dead-letter purges, retention, a
compaction and a rebuild from rows (PostgreSQL; SQLite computes from rows)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import redis
from sqlalchemy import text
from support.helpers import NOW, Clock, add_click, conversion, messages
from support.partner import PartnerServer
from support.visibility_seed import seed

from postback_worker.domain.deadletters import Filter
from postback_worker.ops.config import parse_partner
from postback_worker.ops.oncall import deadletters, replay
from postback_worker.ops.oncall.retention import Purger
from postback_worker.ops.visibility import dashboard
from postback_worker.ops.visibility.reports import Scope, delivery_report
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import rollups
from postback_worker.store.db import make_engine, upgrade
from postback_worker.store.figures import RawFigures, RollupFigures, figures_for
from postback_worker.store.journal import Journal
from postback_worker.store.repo import Store

PARTNERS = (None, "p-ok", "p-down", "p-life")
OFFERS = (None, "o1", "o2")
# `dlq list` filters whose totals are compared (time bounds come from `ranges`).
DEAD_FILTERS = ({}, {"partner_id": "p-down"}, {"failure_class": "blocked"},
                {"partner_id": "p-blocked", "offer_id": "o1", "last_status": 403},
                {"offer_id": "o2"}, {"last_status": 503})


def ranges(now: datetime) -> list[tuple[datetime, datetime]]:
    """Whole hours and minutes, partial ones at either end, inside one minute, whole days
    (day tables) around partial ones, 30 days."""
    h = NOW.replace(minute=0, second=0)
    return [
        (h - timedelta(hours=1), h + timedelta(hours=5)),
        (NOW - timedelta(minutes=47, seconds=13), now + timedelta(seconds=1)),
        (NOW + timedelta(seconds=3), NOW + timedelta(seconds=40)),
        (NOW - timedelta(seconds=1), NOW + timedelta(hours=2, minutes=11, seconds=7)),
        (NOW + timedelta(minutes=30), now + timedelta(hours=1)),
        (now - timedelta(days=30), now + timedelta(microseconds=1)),
        (h - timedelta(days=2, minutes=1), now + timedelta(days=3, seconds=5)),
    ]


def assert_same(store: Store, now: datetime) -> None:
    raw, roll = RawFigures(store), RollupFigures(store)
    assert roll.postback_outcomes() == raw.postback_outcomes()
    assert roll.attempt_totals() == raw.attempt_totals()
    assert roll.conversion_states() == raw.conversion_states()
    assert roll.dead_letters() == raw.dead_letters()
    for since, until in ranges(now):
        for partner in PARTNERS:
            assert roll.attempt_window(since, until, partner) == raw.attempt_window(
                since, until, partner), (since, until, partner)
            assert roll.attempt_minutes(since, until, partner) == raw.attempt_minutes(
                since, until, partner)
            for method in ("report_postbacks", "report_attempts", "report_durations"):
                for offer in OFFERS:
                    got = getattr(roll, method)(since, until, partner, offer)
                    want = getattr(raw, method)(since, until, partner, offer)
                    assert got == want, (method, since, until, partner, offer)
        for offer in OFFERS:
            assert roll.lost_counts(since, until, offer) == raw.lost_counts(since, until, offer)
            for partner in PARTNERS:
                assert roll.postbacks_by_event(since, until, partner, offer) == (
                    raw.postbacks_by_event(since, until, partner, offer))
        assert roll.lifecycle_events(since, until) == raw.lifecycle_events(since, until)
        for keys in DEAD_FILTERS:
            for filt in (Filter(**keys), Filter(**keys, since=since),
                         Filter(**keys, since=since, until=until), Filter(**keys, until=until)):
                assert roll.dead_letter_total(filt) == raw.dead_letter_total(filt), filt
        assert roll.duration_histogram(since, until) == raw.duration_histogram(since, until)
        assert roll.latency_histogram(since, until) == raw.latency_histogram(since, until)
        scope = Scope(TimeRange(since, until))
        assert delivery_report(store, scope) == delivery_report(store, scope, raw)


def lifecycle_traffic(store: Store, pipeline: Pipeline, clock: Clock, partner: PartnerServer,
                      tx: str) -> None:
    """One conversion through pending, approved, a repeat, an adjustment, a stale event and
    a reversal, to a partner that fires approvals, adjustments and reversals."""
    add_click(store, tx, aff_id="p-life", clicked_at=clock())
    first = clock()
    for fields in ({"status": "pending", "payout": "10"}, {"payout": "10"}, {"payout": "10"},
                   {"payout": "12.5"}, {"status": "pending", "payout": "1", "at": first},
                   {"status": "reversed", "payout": "12.5"}):
        at = fields.pop("at", clock())
        pipeline.process_conversions(messages(conversion(tx, now=at, **fields)))
        clock.advance(7)
    pipeline.deliver(pipeline.sweep())


def compact(store: Store) -> int:
    return rollups.compact_all(store)


def test_rollups_equal_raw_rows_through_the_lifecycle(
    settings: Settings, store: Store, partner: PartnerServer, pipeline: Pipeline, clock: Clock,
    redis_client: redis.Redis,
) -> None:
    assert isinstance(figures_for(store), RollupFigures)
    seed(store, partner, pipeline, clock)  # retries, dead letters, lost conversions, test fire
    store.upsert_partner(parse_partner({
        "id": "p-life", "fire_events": "approved,adjustment,reversal",
        "postback_url": f"{partner.url}/ok?tid={{transaction_id}}&e={{event}}"}, NOW))
    lifecycle_traffic(store, pipeline, clock, partner, "tx-life-0")
    kinds = RawFigures(store).lifecycle_events(NOW, clock() + timedelta(seconds=1))
    assert {k for k, _, _ in kinds} == {"status_changed", "repeat", "adjusted", "stale"}
    assert set(RawFigures(store).postbacks_by_event(NOW, clock() + timedelta(seconds=1))) == {
        "approved", "adjustment", "reversal"}
    # Accepted events waiting for intake (counted from rows, not in the rollup), then taken.
    Journal(store).record([conversion(f"tx-wait-{i}", now=clock(), id=f"cv-wait-{i}")
                           for i in range(3)])
    assert RollupFigures(store).conversion_states()["received"] == 3
    assert_same(store, clock())
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM rollup_conversions "
                                 "WHERE state = 'received'")).scalar() == 0
    pipeline.intake_pending(100, 1)
    assert "received" not in RollupFigures(store).conversion_states()
    assert_same(store, clock())
    assert RollupFigures(store).tests() is not None  # the test fire is subtracted
    assert compact(store) > 0
    assert_same(store, clock())

    # Two hours later: more traffic, some of it retried and then delivered.
    clock.advance(2 * 3600 + 611)
    lifecycle_traffic(store, pipeline, clock, partner, "tx-life-1")
    partner.route("/down", 503)
    events = []
    for i in range(5):
        tx = f"tx-later-{i}"
        add_click(store, tx, aff_id="p-ok" if i % 2 else "p-down", clicked_at=clock())
        events.append(conversion(tx, now=clock()))
    pipeline.process_conversions(messages(*events))
    clock.advance(5)
    pipeline.deliver(pipeline.sweep())
    partner.route("/down", 200)
    clock.advance(5)
    pipeline.deliver(pipeline.sweep())
    assert_same(store, clock())

    # Replay p-down's dead letters once the partner is fixed; they are delivered.
    run, _ = replay.start(store, settings, deadletters.Filter(partner_id="p-down"), who="test",
                          rate=1000.0, now=clock(), enqueue=None)
    assert run.queued > 0
    assert_same(store, clock())
    pipeline.deliver(replay.next_chunk(store, "replay", run.id, 100))
    assert RollupFigures(store).dead_letters().get(("p-down", "partner_5xx"), 0) == 0
    assert_same(store, clock())

    # Purge p-blocked's dead letters (their postbacks stay dead-lettered, no longer waiting).
    assert deadletters.purge(store, deadletters.Filter(partner_id="p-blocked"), "test",
                             clock()) == 2
    assert_same(store, clock())
    compact(store)
    assert_same(store, clock())

    # Retention: one day after the first hour, keeping a day, the first hour's delivered
    # postbacks and attempts go (the later ones stay).
    purge_now = NOW + timedelta(days=1, hours=1)
    keep = settings.with_overrides(attempt_retention_days=1, delivered_retention_days=1)
    result = Purger(keep, store, clock=lambda: purge_now).run()
    assert result.deleted["delivered_postbacks"] > 0
    assert_same(store, clock())
    # Conversion events: a day later, the first conversion's superseded events go; its last
    # event stays (later updates fold onto it), and so do the second conversion's.
    events = keep.with_overrides(event_retention_days=1)
    with store.engine.connect() as conn:
        before = dict(conn.execute(text(
            "SELECT c.transaction_id, count(*) FROM conversion_events e JOIN conversions c "
            "ON c.id = e.conversion_id GROUP BY c.transaction_id")).all())
    result = Purger(events, store, clock=lambda: NOW + timedelta(days=1, hours=1)).run()
    assert result.deleted["conversion_events"] == before["tx-life-0"] - 1 > 0
    with store.engine.connect() as conn:
        after = dict(conn.execute(text(
            "SELECT c.transaction_id, count(*) FROM conversion_events e JOIN conversions c "
            "ON c.id = e.conversion_id GROUP BY c.transaction_id")).all())
    assert after == {**before, "tx-life-0": 1}
    assert_same(store, clock())
    compact(store)
    assert_same(store, clock())

    # The dashboard's data is the same from rollups and from rows.
    scope = Scope(TimeRange(NOW - timedelta(minutes=13, seconds=5), clock()))
    assert dashboard.gather(store, redis_client, scope, clock()) == dashboard.gather(
        store, redis_client, scope, clock(), figures=RawFigures(store))

    # Rebuilding the rollups from rows (what the migration does) gives the same figures.
    before = RollupFigures(store).attempt_totals()
    with store.engine.begin() as conn:
        rollups.install(conn, backfill=True)
        assert conn.execute(text("SELECT count(*) FROM rollup_attempts WHERE NOT compacted")
                            ).scalar() == 0
    assert RollupFigures(store).attempt_totals() == before
    assert_same(store, clock())


def test_duration_bucket_sql_matches_python(store: Store) -> None:
    from postback_worker.store.figures import duration_bucket

    values = [0.0, 0.001, 0.07, 0.0701, 0.3, 0.734, 2.5, 3.14159, 47.123, 1.0, 9.99, 10.0,
              20.1, 99.99, 100.0, 123.456, 1000.5, 4321.0, 9999.0, 29999.999]
    with store.engine.connect() as conn:
        got = [conn.execute(text("SELECT pbw_duration_bucket(:v)"), {"v": v}).scalar()
               for v in values]
    assert got == [duration_bucket(v) for v in values]


@pytest.fixture()
def scratch_url(pg_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the test server."""
    base = pg_url.rsplit("/", 1)[0]
    admin = make_engine(base + "/postgres").execution_options(isolation_level="AUTOCOMMIT")
    name = f"pbw_migrate_{os.getpid()}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_migration_takes_waiting_events_out_of_the_rollup_and_back(scratch_url: str) -> None:
    """0013 on a database whose rollup counted `received` rows (0012): the figures stay the
    same through the upgrade and the downgrade."""
    from alembic import command

    from postback_worker.store.db import alembic_config

    def waiting_in_rollup(store: Store) -> int:
        with store.engine.connect() as conn:
            return int(conn.execute(text("SELECT coalesce(sum(n), 0) FROM rollup_conversions "
                                         "WHERE state = 'received'")).scalar_one())

    # (Older migrations install the current triggers: the downgrade puts 0012's back.)
    upgrade(scratch_url, "0013")
    command.downgrade(alembic_config(scratch_url), "0012")
    store = Store(make_engine(scratch_url))
    try:
        Journal(store).record([conversion(f"tx{i}", id=f"cv{i}") for i in range(4)])
        with store.engine.begin() as conn:  # one taken (what a worker does), three waiting
            conn.execute(text("UPDATE conversions SET state = 'no_click' WHERE id = 'cv0'"))
        assert waiting_in_rollup(store) == 3
        want = RawFigures(store).conversion_states()
        assert want == {"received": 3, "no_click": 1}
        upgrade(scratch_url, "0013")
        assert waiting_in_rollup(store) == 0
        assert RollupFigures(store).conversion_states() == want
        Journal(store).record([conversion("tx9", id="cv9")])  # no delta row now
        assert waiting_in_rollup(store) == 0
        assert RollupFigures(store).conversion_states() == {**want, "received": 4}
        command.downgrade(alembic_config(scratch_url), "0012")
        assert waiting_in_rollup(store) == 4
        with store.engine.begin() as conn:  # the old trigger counts them again
            conn.execute(text("UPDATE conversions SET state = 'no_click' WHERE id = 'cv9'"))
        assert waiting_in_rollup(store) == 3
    finally:
        store.engine.dispose()


def insert_trigger(store: Store) -> str:
    """How conversions' INSERT trigger fires: 'row' or 'statement'."""
    with store.engine.connect() as conn:
        tgtype = conn.execute(text(
            "SELECT tgtype FROM pg_trigger WHERE tgname = 'pbw_rollup_conversions_insert'"
        )).scalar_one()
    return "row" if tgtype & 1 else "statement"


def test_conversions_inserted_not_received_are_counted_by_the_row_trigger(
        scratch_url: str) -> None:
    """0014: journal rows (`received`) run no trigger; rows inserted in a counted state (a
    test fire, a multi-row insert) are counted, before and after a downgrade to 0013."""
    from alembic import command

    from postback_worker.store.db import alembic_config

    def deltas(store: Store) -> int:
        with store.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM rollup_conversions "
                                         "WHERE NOT compacted")).scalar_one())

    def insert(store: Store, rows: list[tuple[str, str, str | None]]) -> None:
        with store.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO conversions (id, transaction_id, goal_id, payout, currency, "
                "status, occurred_at, received_at, state, offer_id) VALUES (:id, :id, '', 1, "
                "'USD', 'approved', now(), now(), :state, :offer)"),
                [{"id": i, "state": s, "offer": o} for i, s, o in rows])

    upgrade(scratch_url)
    store = Store(make_engine(scratch_url))
    try:
        assert insert_trigger(store) == "row"
        Journal(store).record([conversion(f"tx{i}", id=f"cv{i}") for i in range(3)])
        assert deltas(store) == 0  # waiting events: counted from rows, no delta written
        insert(store, [("a1", "test", None), ("a2", "attributed", "o1"),
                       ("a3", "attributed", "o1"), ("a4", "received", "o2")])
        assert deltas(store) == 3  # one delta per counted row
        want = {"received": 4, "test": 1, "attributed": 2}
        assert RawFigures(store).conversion_states() == want
        assert RollupFigures(store).conversion_states() == want
        compact(store)
        assert RollupFigures(store).conversion_states() == want

        command.downgrade(alembic_config(scratch_url), "0013")
        assert insert_trigger(store) == "statement"
        insert(store, [("b1", "no_click", "o2"), ("b2", "received", None)])
        want = {**want, "received": 5, "no_click": 1}
        assert RollupFigures(store).conversion_states() == want
        upgrade(scratch_url, "0014")
        assert insert_trigger(store) == "row"
        insert(store, [("c1", "no_click", "o2")])
        want = {**want, "no_click": 2}
        assert RawFigures(store).conversion_states() == want
        assert RollupFigures(store).conversion_states() == want
    finally:
        store.engine.dispose()
