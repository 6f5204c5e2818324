"""Rollups: every figure read from the trigger-kept rollups equals the same figure computed
from raw rows, on the same data, through retries, replays, dead-letter purges, retention, a
compaction and a rebuild from rows (PostgreSQL; SQLite computes from rows)."""

from __future__ import annotations

from datetime import datetime, timedelta

import redis
from sqlalchemy import text
from support.helpers import NOW, Clock, add_click, conversion, messages
from support.partner import PartnerServer
from support.visibility_seed import seed

from postback_worker.ops.oncall import deadletters, replay
from postback_worker.ops.oncall.retention import Purger
from postback_worker.ops.visibility import dashboard
from postback_worker.ops.visibility.reports import Scope, delivery_report
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import rollups
from postback_worker.store.figures import RawFigures, RollupFigures, figures_for
from postback_worker.store.repo import Store

PARTNERS = (None, "p-ok", "p-down")
OFFERS = (None, "o1", "o2")


def ranges(now: datetime) -> list[tuple[datetime, datetime]]:
    """Whole hours and minutes, partial ones at either end, inside one minute, 30 days."""
    h = NOW.replace(minute=0, second=0)
    return [
        (h - timedelta(hours=1), h + timedelta(hours=5)),
        (NOW - timedelta(minutes=47, seconds=13), now + timedelta(seconds=1)),
        (NOW + timedelta(seconds=3), NOW + timedelta(seconds=40)),
        (NOW - timedelta(seconds=1), NOW + timedelta(hours=2, minutes=11, seconds=7)),
        (NOW + timedelta(minutes=30), now + timedelta(hours=1)),
        (now - timedelta(days=30), now + timedelta(microseconds=1)),
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
        assert roll.duration_histogram(since, until) == raw.duration_histogram(since, until)
        assert roll.latency_histogram(since, until) == raw.latency_histogram(since, until)
        scope = Scope(TimeRange(since, until))
        assert delivery_report(store, scope) == delivery_report(store, scope, raw)


def compact(store: Store) -> int:
    return rollups.compact_all(store)


def test_rollups_equal_raw_rows_through_the_lifecycle(
    settings: Settings, store: Store, partner: PartnerServer, pipeline: Pipeline, clock: Clock,
    redis_client: redis.Redis,
) -> None:
    assert isinstance(figures_for(store), RollupFigures)
    seed(store, partner, pipeline, clock)  # retries, dead letters, lost conversions, test fire
    assert_same(store, clock())
    assert RollupFigures(store).tests() is not None  # the test fire is subtracted
    assert compact(store) > 0
    assert_same(store, clock())

    # Two hours later: more traffic, some of it retried and then delivered.
    clock.advance(2 * 3600 + 611)
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
