"""Retry-backlog benchmark: many postbacks scheduled for a later retry, then all due at once.

    .venv/bin/python bench/backlog.py [--postbacks 100000] [--concurrency 2]

Prints the worker RSS idle, with the backlog scheduled (it lives in PostgreSQL, not in worker
memory: the two should be within a few MB), and while draining; and the drain rate once every
postback falls due (beat sweeps them onto the `retries` queue, workers claim and fire them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.e2e import (  # noqa: E402
    LOOPBACK,
    OFFER_ID,
    PARTNER_ID,
    QUEUES,
    BenchError,
    Proc,
    RssSampler,
    Services,
    _rss,
    bench_database,
    delivered_count,
    log,
    seed,
    start_partner,
    wait_ready,
)
from postback_worker.dev import services as devservices  # noqa: E402
from postback_worker.settings import Settings  # noqa: E402
from postback_worker.store.db import make_engine, upgrade  # noqa: E402
from postback_worker.store.repo import Store  # noqa: E402


def schedule_backlog(svc: Services, partner_base: str, n: int, due: datetime) -> None:
    """n attributed conversions, each with one postback waiting in retry_scheduled."""
    now = datetime.now(UTC)
    with svc.store.engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO conversions (id, transaction_id, offer_id, aff_id, goal_id, payout,
                status, occurred_at, received_at, state, reason, processed_at)
            SELECT 'cv' || lpad(g::text, 8, '0'), 'tx' || lpad(g::text, 8, '0'), :offer,
                   :partner, '', '1.00', 'approved', :now, :now, 'attributed', 'bench', :now
            FROM generate_series(0, :n - 1) AS g
        """), {"offer": OFFER_ID, "partner": PARTNER_ID, "now": now, "n": n})
        conn.execute(text("""
            INSERT INTO postbacks (id, conversion_id, partner_id, url, method, state, reason,
                attempts, next_attempt_at, first_attempt_at, last_attempt_at, last_status,
                last_class, received_at, created_at, updated_at)
            SELECT 'pb' || lpad(g::text, 8, '0'), 'cv' || lpad(g::text, 8, '0'), :partner,
                   :base || '/pb?tid=tx' || lpad(g::text, 8, '0'), 'GET', 'retry_scheduled',
                   'HTTP 503 from partner (partner_5xx); bench', 1, :due, :now, :now, 503,
                   'partner_5xx', :now, :now, :now
            FROM generate_series(0, :n - 1) AS g
        """), {"partner": PARTNER_ID, "base": partner_base, "due": due, "now": now, "n": n})


def sample_rss(procs: list[Proc], seconds: float) -> tuple[float, float]:
    """Median and max of the largest worker process's RSS over `seconds` (MB)."""
    sampler = RssSampler([p.pid for p in procs])
    values = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.5)
        values.append(max((_rss(pid) for pid in sampler._all_pids()), default=0) / 2**20)
    return statistics.median(values), max(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--postbacks", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    if not devservices.redis_answers(args.redis_url):
        raise BenchError(f"Redis at {args.redis_url} does not answer")
    tmp = Path(tempfile.mkdtemp(prefix="pbw-backlog-"))
    with contextlib.ExitStack() as stack:
        partner = start_partner("auto", tmp, 0.0)
        stack.callback(partner.stop)
        _, db_url = stack.enter_context(bench_database(args.pg_url))
        upgrade(db_url)
        svc = Services(server_url=args.pg_url, db_name=db_url.rsplit("/", 1)[1],
                       db_url=db_url, redis_url=args.redis_url,
                       store=Store(make_engine(db_url)))
        seed(svc.store, partner.base_url, 0)
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
        settings = Settings.build(database_url=db_url, redis_url=args.redis_url,
                            allow_networks=LOOPBACK, sweep_interval=1.0)
        env = {**os.environ, **settings.to_env()}
        tag = secrets.token_hex(3)
        celery = [sys.executable, "-m", "celery", "-A", "postback_worker.worker.app"]
        worker = Proc(f"w-{tag}", celery + [
            "worker", "-Q", QUEUES, "--concurrency", str(args.concurrency), "-n",
            f"w-{tag}@%h", "-l", "warning", "--without-mingle", "--without-gossip"],
            env, tmp / "worker.log")
        stack.callback(worker.stop)
        beat = Proc(f"beat-{tag}", celery + ["beat", "-l", "warning", "-s",
                                             str(tmp / "beat-schedule")], env, tmp / "beat.log")
        stack.callback(beat.stop)
        wait_ready(args.redis_url, [f"w-{tag}"], [worker], 60)
        idle_med, idle_max = sample_rss([worker], 5)
        log(f"idle worker RSS (largest process): median {idle_med:.1f} MB")
        later = datetime.now(UTC) + timedelta(hours=1)
        m0 = time.monotonic()
        schedule_backlog(svc, partner.base_url, args.postbacks, later)
        log(f"scheduled {args.postbacks} postbacks for later in {time.monotonic() - m0:.1f} s")
        held_med, held_max = sample_rss([worker], 10)
        log(f"with the backlog scheduled: median {held_med:.1f} MB, max {held_max:.1f} MB")
        with svc.store.engine.begin() as conn:
            conn.execute(text("UPDATE postbacks SET next_attempt_at = now()"))
        t0 = time.monotonic()
        with RssSampler([worker.pid]) as rss:
            deadline = t0 + args.timeout
            while delivered_count(svc) < args.postbacks:
                if time.monotonic() > deadline or not worker.alive():
                    raise BenchError(f"drain stopped at {delivered_count(svc)} delivered; "
                                     f"worker log:\n{worker.tail(20)}")
                time.sleep(0.2)
                rss.sample()
        drain_s = time.monotonic() - t0
        rate = args.postbacks / drain_s
        print(f"\npostbacks in the backlog           {args.postbacks}")
        print(f"worker RSS idle (MB)               {idle_med:.1f}")
        print(f"worker RSS with backlog (MB)       {held_med:.1f}  "
              f"(+{held_med - idle_med:.1f}; target within 50)")
        print(f"worker RSS peak while draining (MB) {rss.max_proc / 2**20:.1f}")
        print(f"drain rate once due (postbacks/s)  {rate:.0f}  (target 2000)")
        print(f"drain time (s)                     {drain_s:.1f}")
        with svc.store.engine.connect() as conn:
            attempts = conn.execute(text("SELECT count(*) FROM attempts")).scalar_one()
        print(f"attempt rows written while draining {attempts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
