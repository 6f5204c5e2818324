"""Producer call latency: durable (the default) against durable=False, one event per call.

    .venv/bin/python bench/producer.py [--calls 3000] [--rounds 3] [--threads 1]

Each round runs both modes one after the other (alternating which goes first) against a fresh
database, with no worker running: what a backend's `send_conversions` call costs the caller.
Prints per mode the median call time, calls/s, and the fast mode's gain. durable=False
publishes whole events to Redis, where they are lost if Redis loses data (README).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.e2e import bench_database  # noqa: E402
from postback_worker.producer import Producer  # noqa: E402
from postback_worker.settings import Settings  # noqa: E402
from postback_worker.store.db import upgrade  # noqa: E402

MODES = ("durable", "fast")


def run(settings: Settings, mode: str, calls: int, threads: int) -> tuple[float, float]:
    """(median seconds per call, calls per second) of `calls` one-event calls."""
    producer = Producer(settings, durable=mode == "durable")
    tag = uuid.uuid4().hex[:8]
    times: list[float] = []

    def call(i: int) -> None:
        t0 = time.perf_counter()
        producer.send_conversions([{"transaction_id": f"tx-{tag}-{i}", "payout": "1.50"}])
        times.append(time.perf_counter() - t0)

    try:
        started = time.perf_counter()
        if threads <= 1:
            for i in range(calls):
                call(i)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(call, range(calls)))
        elapsed = time.perf_counter() - started
    finally:
        producer.close()
    return statistics.median(times), calls / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="one-event calls per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads calling at once")
    ap.add_argument("--pg-url", default=os.environ.get(
        "BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--redis-url", default=os.environ.get(
        "BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"))
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or args.threads < 1:
        ap.error("--calls, --rounds and --threads must be at least 1")
    figures: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    rds = redis.Redis.from_url(args.redis_url)
    with bench_database(args.pg_url) as (_name, url):
        upgrade(url)
        settings = Settings.build(database_url=url, redis_url=args.redis_url)
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                figures[mode].append(run(settings, mode, args.calls, args.threads))
                rds.flushdb()  # the fast mode's messages: no worker takes them here
            print(f"round {r + 1}: " + ", ".join(
                f"{m} {figures[m][-1][0] * 1000:.3f} ms/call {figures[m][-1][1]:,.0f}/s"
                for m in MODES), flush=True)
    med = {m: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
           for m, v in figures.items()}
    print(f"\n{args.rounds} rounds of {args.calls} one-event calls from {args.threads} "
          f"thread(s), load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'mode':<10}{'median ms/call':>16}{'calls/s':>10}")
    for m in MODES:
        print(f"{m:<10}{med[m][0] * 1000:>16.3f}{med[m][1]:>10,.0f}")
    print(f"fast / durable calls/s: {med['fast'][1] / med['durable'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
