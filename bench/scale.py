"""Observability at scale: the cost of every figure at 1 million and at 10 million rows.

Builds a database per size with as many conversions, postbacks and attempts as the size says
(one postback per conversion, one attempt per postback that fired), several partners, offers
and failure classes, at the same rate for both sizes (about 3.9 of each per second: 1 million
rows hold 3 days of history, 10 million rows 30 days), so the 10-million database only has
more *history*. Then it times, with the code installed in this checkout:

  /metrics, the delivery report over 24 h and over 30 days, the failed-postback export of one
  day, the dashboard (24 h), `show` of one conversion, `dlq list` with filters, and the
  retention purge of one day (last: it deletes rows).

Each figure is the median of --runs runs (the first run of each is a warm-up and not counted).
Prints a table with both sizes side by side and the ratio 10M / 1M; with --before FILE (a
--json output of an earlier run, e.g. of the code before a change) also the before/after
ratio. The load average of the machine is printed with the figures.

    .venv/bin/python bench/scale.py                       # both sizes, about 15 min
    .venv/bin/python bench/scale.py --sizes 1000000 --json after-1m.json
    .venv/bin/python bench/scale.py --before before.json --json after.json
    .venv/bin/python bench/scale.py --build-only          # keep both databases; then, as often
    .venv/bin/python bench/scale.py --database NAME1 --database NAME2 --skip-purge   # as needed

Needs PostgreSQL (default postgresql://postgres@127.0.0.1:5432/postgres, or BENCH_DATABASE_URL)
and Redis (default redis://127.0.0.1:6379/12, or BENCH_REDIS_URL). Each database is created
as pbw_scale_<size>_<random> and dropped at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import create_engine, inspect, text

from postback_worker.ops.lookup import conversion_detail
from postback_worker.ops.oncall import deadletters
from postback_worker.ops.oncall.retention import Purger
from postback_worker.ops.visibility import dashboard, metrics, reports
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.settings import Settings
from postback_worker.store.db import make_engine, normalize_url, upgrade
from postback_worker.store.repo import Store

PARTNERS = 8
OFFERS = 20
DAYS_PER_MILLION = 3
CHUNK = 1_000_000
FIGURES = ("metrics", "report_24h", "report_30d", "failed_export_1d", "dashboard_24h",
           "show", "dlq_list", "dlq_list_1d", "retention_purge_1d")

# One row per conversion i (1..N). Outcome by i % 100: 0-87 delivered on the first attempt,
# 88-92 dead-lettered (5xx, timeout, auth, blocked, config), 96-97 skipped; in the last hour
# 93-95 wait for a retry (two of them overdue), 98 is pending and 99 in flight (older ones of
# these were delivered: a healthy backlog is recent).
LOAD_SQL = """
WITH s0 AS (
  SELECT i, :start + (i - 1) * :step AS at, i % 100 AS k,
         'p' || lpad((i % :partners)::text, 2, '0') AS partner,
         'of' || lpad((i % :offers)::text, 2, '0') AS offer
  FROM generate_series(:lo, :hi) AS i
), s AS (
  SELECT s0.*, CASE WHEN k < 88 THEN 'delivered' WHEN k < 93 THEN 'dead_lettered'
                    WHEN k IN (96, 97) THEN 'skipped'
                    WHEN at < :now - interval '1 hour' THEN 'delivered'
                    WHEN k < 96 THEN 'retry_scheduled' WHEN k = 98 THEN 'pending'
                    ELSE 'in_flight' END AS o,
         CASE k WHEN 88 THEN 'partner_5xx' WHEN 89 THEN 'timeout' WHEN 90 THEN 'auth'
                WHEN 91 THEN 'blocked' WHEN 92 THEN 'config' END AS dead_class,
         CASE k WHEN 88 THEN 503 WHEN 90 THEN 401 WHEN 91 THEN 403 WHEN 92 THEN 404 END
           AS dead_status
  FROM s0
)
{body}
"""

CONVERSIONS = """
INSERT INTO conversions (id, transaction_id, offer_id, aff_id, goal_id, payout, currency, status,
                         occurred_at, received_at, state, reason, processed_at)
SELECT 'cv' || i, 'tx' || i, offer, partner, '', '1.50', 'USD', 'approved', at, at,
       CASE WHEN i % 37 = 0 THEN 'expired_click' WHEN i % 53 = 0 THEN 'unknown_click'
            ELSE 'attributed' END,
       NULL, at
FROM s
"""

POSTBACKS = """
INSERT INTO postbacks (id, conversion_id, partner_id, url, method, state, reason, attempts,
                       next_attempt_at, first_attempt_at, last_attempt_at, last_status,
                       last_class, received_at, created_at, updated_at, delivered_at)
SELECT 'pb' || i, 'cv' || i, partner,
       'https://partner.example/pb?tid=tx' || i || '&token=secret', 'GET', o,
       CASE WHEN o IN ('dead_lettered', 'retry_scheduled') THEN 'HTTP 503; retrying' END,
       CASE WHEN o IN ('delivered', 'dead_lettered', 'retry_scheduled') THEN 1 ELSE 0 END,
       CASE WHEN o = 'retry_scheduled' THEN
            CASE WHEN k = 95 THEN :now + interval '10 minutes'
                 ELSE GREATEST(at + interval '1 minute', :now - interval '5 minutes') END
            WHEN o IN ('pending', 'in_flight') THEN at END,
       CASE WHEN o NOT IN ('skipped', 'pending') THEN at END,
       CASE WHEN o NOT IN ('skipped', 'pending') THEN at END,
       CASE WHEN o = 'delivered' THEN 200 WHEN o = 'dead_lettered' THEN dead_status
            WHEN o = 'retry_scheduled' THEN 503 END,
       CASE WHEN o = 'delivered' THEN 'delivered' WHEN o = 'dead_lettered' THEN dead_class
            WHEN o = 'retry_scheduled' THEN 'partner_5xx' END,
       at, at, at, CASE WHEN o = 'delivered' THEN at + interval '1 second' END
FROM s
"""

ATTEMPTS = """
INSERT INTO attempts (postback_id, attempt_no, started_at, duration_ms, url, status_code,
                      failure_class, error, worker, is_test)
SELECT 'pb' || i, 1, at, 20 + (i::bigint * 7919 % 2000) / 10.0,
       'https://partner.example/pb?tid=tx' || i || '&token=***',
       CASE WHEN o = 'dead_lettered' THEN dead_status WHEN o = 'retry_scheduled' THEN 503
            ELSE 200 END,
       CASE WHEN o = 'dead_lettered' THEN dead_class WHEN o = 'retry_scheduled'
            THEN 'partner_5xx' ELSE 'delivered' END,
       CASE WHEN o IN ('dead_lettered', 'retry_scheduled') THEN 'HTTP 503' END, 'bench', false
FROM s WHERE o NOT IN ('skipped', 'pending')
"""

DEAD_LETTERS = """
INSERT INTO dead_letters (postback_id, partner_id, offer_id, failure_class, last_status, reason,
                          attempts, created_at, replay_count)
SELECT 'pb' || i, partner, offer, dead_class, dead_status, 'dead-lettered', 1,
       at + interval '1 second', 0
FROM s WHERE o = 'dead_lettered'
"""


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def compactor(engine: Any) -> Callable[[Any], int] | None:
    """The rollup compaction, where this checkout and this database have rollups."""
    try:
        from postback_worker.store.rollups import compact_all
    except ImportError:
        return None
    return compact_all if inspect(engine).has_table("rollup_postbacks") else None


def build(url: str, rows: int, now: datetime) -> datetime:
    """Fill the database; returns the time of the oldest row."""
    span = timedelta(days=DAYS_PER_MILLION * rows / 1_000_000)
    start = now - span
    step = span / rows
    engine = create_engine(normalize_url(url))
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO offers (id, name, campaign_type, lifespan_days, allow_multiple, "
            "created_at, updated_at) SELECT 'of' || lpad(i::text, 2, '0'), 'Offer ' || i, "
            "'ecommerce', 30, false, :now, :now FROM generate_series(0, :n - 1) i"),
            {"now": now, "n": OFFERS})
        conn.execute(text(
            "INSERT INTO partners (id, name, postback_url, method, timeout, fire_statuses, "
            "enabled, scope, created_at, updated_at, paused) SELECT 'p' || lpad(i::text, 2, "
            "'0'), 'Partner ' || i, 'https://partner.example/pb?tid={transaction_id}', 'GET', "
            "10, 'approved', true, 'own', :now, :now, false FROM generate_series(0, :n - 1) i"),
            {"now": now, "n": PARTNERS})
    for body, name in ((CONVERSIONS, "conversions"), (POSTBACKS, "postbacks"),
                       (ATTEMPTS, "attempts"), (DEAD_LETTERS, "dead_letters")):
        t0 = time.monotonic()
        for lo in range(1, rows + 1, CHUNK):
            hi = min(rows, lo + CHUNK - 1)
            with engine.begin() as conn:
                conn.execute(text(LOAD_SQL.format(body=body)), {
                    "start": start, "step": step, "partners": PARTNERS, "offers": OFFERS,
                    "lo": lo, "hi": hi, "now": now})
        log(f"  {name}: {time.monotonic() - t0:.0f} s")
    compact = compactor(engine)
    if compact is not None:  # what beat's compact-rollups does
        t0 = time.monotonic()
        log(f"  rollup deltas compacted: {compact(engine)} in {time.monotonic() - t0:.0f} s")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return start


def timed(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(url: str, redis_url: str, rows: int, start: datetime, now: datetime,
            runs: int, purge_day: int | None = 0) -> dict[str, float]:
    settings = Settings.build(database_url=url, redis_url=redis_url)
    store = Store(make_engine(url))
    rcli = redis.Redis.from_url(redis_url)
    day = TimeRange(now - timedelta(days=2), now - timedelta(days=1))
    last24 = reports.Scope(TimeRange(now - timedelta(hours=24), now))
    last30 = reports.Scope(TimeRange(now - timedelta(days=30), now))
    middle = f"cv{rows // 2}"
    dlq_filter = deadletters.Filter(partner_id="p03", failure_class="partner_5xx",
                                    since=now - timedelta(days=7))
    # The 7-day filter spans all of the 1M database's 3 days but 7 of the 10M one's 30: more
    # matching rows. A 1-day filter matches the same number of rows at both sizes, so its
    # ratio shows whether the cost grows with history.
    dlq_filter_1d = deadletters.Filter(partner_id="p03", failure_class="partner_5xx",
                                       since=now - timedelta(days=1))
    figures: dict[str, float] = {}
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("metrics", lambda: metrics.render(settings, store, rcli, lambda: now)),
        ("report_24h", lambda: reports.delivery_report(store, last24)),
        ("report_30d", lambda: reports.delivery_report(store, last30)),
        ("failed_export_1d", lambda: sum(1 for _ in reports.failed_postbacks(
            store, reports.Scope(day)))),
        ("dashboard_24h", lambda: dashboard.gather(store, rcli, last24, now)),
        ("show", lambda: conversion_detail(store, middle)),
        ("dlq_list", lambda: deadletters.list_dead_letters(store, dlq_filter, limit=50)),
        ("dlq_list_1d", lambda: deadletters.list_dead_letters(store, dlq_filter_1d, limit=50)),
    ]
    for name, fn in jobs:
        figures[name] = timed(fn, runs)
        log(f"  {name}: {figures[name] * 1000:.0f} ms (load {loadavg()})")
    if purge_day is None:  # --skip-purge: the database stays as it is, to be measured again
        store.engine.dispose()
        rcli.close()
        return figures
    # The retention purge of one day (`purge_day` 0: the oldest): a clock two days after that
    # day's start, keeping one day, so exactly that day is old. Runs once (it deletes).
    purge_settings = settings.with_overrides(attempt_retention_days=1, delivered_retention_days=1,
                                             retention_batch=5000, retention_max_batches=10_000)
    purger = Purger(purge_settings, store, clock=lambda: start + timedelta(days=2 + purge_day))
    t0 = time.perf_counter()
    result = purger.run()
    figures["retention_purge_1d"] = time.perf_counter() - t0
    log(f"  retention_purge_1d: {figures['retention_purge_1d'] * 1000:.0f} ms, deleted "
        f"{result.deleted}")
    store.engine.dispose()
    rcli.close()
    return figures


def run_size(server: str, redis_url: str, rows: int, runs: int, keep: bool,
             revision: str = "head", build_only: bool = False) -> dict[str, Any]:
    name = f"pbw_scale_{rows}_{secrets.token_hex(3)}"
    admin = create_engine(normalize_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, query = server.partition("?")
    url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        log(f"{rows:,} rows: building {name} (load {loadavg()})")
        upgrade(url, revision)
        t0 = time.monotonic()
        start = build(url, rows, now)
        built = time.monotonic() - t0
        log(f"  built in {built:.0f} s")
        if build_only:
            return {"rows": rows, "build_seconds": built, "figures": {}, "load": loadavg(),
                    "database": name}
        load_before = loadavg()
        figures = measure(url, redis_url, rows, start, now, runs)
        return {"rows": rows, "build_seconds": built, "figures": figures,
                "load": f"{load_before} -> {loadavg()}", "database": name}
    finally:
        if not keep:
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :n"), {"n": name})
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def run_existing(server: str, redis_url: str, name: str, runs: int, revision: str,
                 purge_day: int | None) -> dict[str, Any]:
    """Measure a database built earlier (--keep), migrated to `revision` first (timed): the
    same rows before and after a change."""
    base, _, query = server.partition("?")
    url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    log(f"{name}: migrating to {revision} (load {loadavg()})")
    t0 = time.monotonic()
    upgrade(url, revision)
    migrated = time.monotonic() - t0
    engine = create_engine(normalize_url(url))
    with engine.connect() as conn:
        rows, start, last = conn.execute(text(
            "SELECT count(*), min(received_at), max(received_at) FROM conversions")).one()
    engine.dispose()
    now = last.replace(microsecond=0) + timedelta(seconds=1)
    log(f"  migrated in {migrated:.0f} s; {rows:,} rows; measuring")
    load_before = loadavg()
    figures = measure(url, redis_url, int(rows), start, now, runs, purge_day)
    return {"rows": int(rows), "migrate_seconds": migrated, "figures": figures,
            "load": f"{load_before} -> {loadavg()}", "database": name}


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def table(results: list[dict[str, Any]], before: dict[str, Any] | None) -> str:
    by_rows = {r["rows"]: r["figures"] for r in results}
    sizes = sorted(by_rows)
    old = {r["rows"]: r["figures"] for r in (before or {}).get("results", [])}
    head = ["figure (ms)"]
    for n in sizes:
        head += ([f"before {n // 1_000_000}M", f"after {n // 1_000_000}M"] if old
                 else [f"{n // 1_000_000}M rows"])
    if len(sizes) == 2:
        head.append("10M/1M")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for fig in FIGURES:
        cells = [fig]
        for n in sizes:
            if old:
                cells.append(ms(old.get(n, {}).get(fig)))
            cells.append(ms(by_rows[n].get(fig)))
        if len(sizes) == 2:
            lo, hi = by_rows[sizes[0]].get(fig), by_rows[sizes[1]].get(fig)
            cells.append(f"{hi / lo:.2f}x" if lo and hi else "-")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000000,10000000",
                    help="comma-separated row counts (default 1000000,10000000)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--before", help="a --json file of an earlier run to compare with")
    ap.add_argument("--keep", action="store_true",
                    help="keep the databases (to measure them again with --database)")
    ap.add_argument("--revision", default="head",
                    help="migrate new databases (or --database) to this revision (default head)")
    ap.add_argument("--database", action="append", default=[],
                    help="measure this existing database instead of building one (repeatable; "
                         "never dropped)")
    ap.add_argument("--purge-day", type=int, default=0,
                    help="which day the retention purge deletes (0: the oldest; use 1 on a "
                         "database measured before)")
    ap.add_argument("--skip-purge", action="store_true",
                    help="with --database: measure everything but the retention purge (the "
                         "database is left as it is, to be measured again)")
    ap.add_argument("--build-only", action="store_true",
                    help="build and keep the databases, measure nothing")
    ap.add_argument("--pg-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--redis-url", default=os.environ.get(
        "BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        print("--sizes: expected comma-separated whole numbers, e.g. 1000000,10000000",
              file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1000:
        print("--sizes: each size must be at least 1000", file=sys.stderr)
        return 2
    before = None
    if args.before:
        with open(args.before) as fh:
            before = json.load(fh)
    if args.database:
        purge_day = None if args.skip_purge else args.purge_day
        results = [run_existing(args.pg_url, args.redis_url, name, args.runs, args.revision,
                                purge_day) for name in args.database]
    else:
        results = [run_size(args.pg_url, args.redis_url, n, args.runs,
                            args.keep or args.build_only, args.revision, args.build_only)
                   for n in sizes]
    if args.build_only:
        print("\n".join(r["database"] for r in results))
        return 0
    out = {"when": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(), "results": results}
    print(f"\nscale bench: {os.cpu_count()} CPUs, median of {args.runs} runs; "
          "loads (1/5/15 min) per size: "
          + "; ".join(f"{r['rows']:,}: {r['load']}" for r in results))
    print(table(results, before))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
