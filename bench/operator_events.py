"""Operator events: what the outbox costs the delivery path, and what the relay does.

    .venv/bin/python bench/operator_events.py [--conversions 2000] [--batch 500] [--pairs 3]
        [--pg-url postgresql://127.0.0.1:5432/postgres]

The worst case for the delivery path is a partner whose every postback is dead-lettered at
once (401): each dead letter then writes one `operator_events` row in the same transaction.
The script runs the real pipeline in-process (PostgreSQL, a local HTTP partner answering 401)
over the same conversions with the outbox write on and off (off = the code before operator
events), alternating, and prints the medians and their ratio; then times one relay run that
plans and sends every event (batched) to a local receiver.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.e2e import bench_database, log  # noqa: E402
from postback_worker.delivery.sender import Sender  # noqa: E402
from postback_worker.delivery.signing import STANDARD, new_secret  # noqa: E402
from postback_worker.domain.events import parse_conversion  # noqa: E402
from postback_worker.domain.retry import RetryPolicy  # noqa: E402
from postback_worker.ops.config import parse_offer, parse_partner  # noqa: E402
from postback_worker.ops.visibility.operator_events import Relay  # noqa: E402
from postback_worker.pipeline.processing import Pipeline  # noqa: E402
from postback_worker.settings import Settings  # noqa: E402
from postback_worker.store import postbacks as postbacks_module  # noqa: E402
from postback_worker.store.db import make_engine, upgrade  # noqa: E402
from postback_worker.store.repo import Store  # noqa: E402


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    status = 401
    received = 0

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        type(self).received += 1
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"no")

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def serve(status: int) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.status = status  # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def seed(store: Store, partner_url: str, n: int, now: datetime) -> None:
    store.upsert_offer(parse_offer({"id": "o1", "campaign_type": "ecommerce"}, now))
    store.upsert_partner(parse_partner({
        "id": "p1", "postback_url": partner_url + "/pb?t={transaction_id}", "timeout": 5},
        now))
    store.insert_clicks([
        {"transaction_id": f"tx{i:07d}", "offer_id": "o1", "aff_id": "p1", "aff_sub": None,
         "aff_sub2": None, "aff_sub3": None, "aff_sub4": None, "aff_sub5": None,
         "source": None, "ip": None, "device_id": None, "user_agent": None,
         "clicked_at": now - timedelta(hours=1)} for i in range(n)])


def reset(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE attempts, dead_letters, postbacks, conversion_keys, "
                          "conversion_events, conversions, operator_events, "
                          "operator_deliveries CASCADE"))


FINISH_SECONDS: list[float] = []


def timed_finish(store: Store) -> None:
    """Count the seconds spent saving answers (`Store.finish`), where the outbox writes."""
    inner = Store.finish

    def finish(**kw: Any) -> int:
        t0 = time.perf_counter()
        try:
            return inner(store, **kw)
        finally:
            FINISH_SECONDS.append(time.perf_counter() - t0)

    store.finish = finish  # type: ignore[method-assign]


def one_run(store: Store, settings: Settings, n: int, batch: int,
            outbox: bool) -> tuple[float, float]:
    reset(store)
    FINISH_SECONDS.clear()
    original = postbacks_module.dead_letter_events
    if not outbox:
        postbacks_module.dead_letter_events = lambda *a, **k: None  # type: ignore[assignment]
    try:
        sender = Sender.from_settings(settings.delivery, concurrency=64)
        pipeline = Pipeline(settings, store, sender, worker_name="bench")
        now = datetime.now(UTC)
        msgs = [dict(parse_conversion({"transaction_id": f"tx{i:07d}"}, now=now).to_message())
                for i in range(n)]
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            pipeline.process_conversions(msgs[start:start + batch])
        elapsed = time.perf_counter() - t0
        sender.close()
    finally:
        postbacks_module.dead_letter_events = original
    with store.engine.connect() as conn:
        dead = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar()
        events = conn.execute(text("SELECT count(*) FROM operator_events")).scalar()
    assert dead == n, f"{dead} dead letters, expected {n}"
    assert events == (n if outbox else 0), events
    return elapsed, sum(FINISH_SECONDS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversions", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--pg-url", default="postgresql://127.0.0.1:5432/postgres")
    args = ap.parse_args()
    partner, partner_url = serve(401)
    receiver, receiver_url = serve(200)
    with bench_database(args.pg_url) as (_, url):
        upgrade(url)
        store = Store(make_engine(url))
        settings = Settings.build(database_url=url, allow_networks=("127.0.0.0/8",),
                                  config_cache_seconds=60.0, events_url=receiver_url + "/hooks",
                                  events_secret=new_secret(STANDARD), events_batch_window=0.0,
                                  retry=RetryPolicy(max_attempts=1))
        seed(store, partner_url, args.conversions, datetime.now(UTC))
        timed_finish(store)
        one_run(store, settings, args.conversions, args.batch, True)  # warm-up
        on: list[tuple[float, float]] = []
        off: list[tuple[float, float]] = []
        for _ in range(args.pairs):
            off.append(one_run(store, settings, args.conversions, args.batch, False))
            on.append(one_run(store, settings, args.conversions, args.batch, True))
        n = args.conversions
        print(f"delivery path, {n} postbacks all dead-lettered (401), batches of {args.batch}:")
        for i, what in enumerate(("whole batch", "saving answers (Store.finish)")):
            m_off = statistics.median(x[i] for x in off)
            m_on = statistics.median(x[i] for x in on)
            print(f"  {what}: outbox off median {m_off:.3f} s, on {m_on:.3f} s, "
                  f"ratio on/off {m_on / m_off:.3f}  (off runs "
                  + ", ".join(f"{x[i]:.3f}" for x in off) + "; on runs "
                  + ", ".join(f"{x[i]:.3f}" for x in on) + ")")
        # the relay: plan and send every event of the last run (batched per partner)
        sender = Sender.from_settings(settings.delivery, concurrency=32)
        _Handler.received = 0
        relay = Relay(settings, store, sender, None, clock=lambda: datetime.now(UTC))
        t0 = time.perf_counter()
        result = relay.run()
        elapsed = time.perf_counter() - t0
        sender.close()
        print(f"relay: {n} dead-letter events -> {result.delivered} signed deliveries "
              f"(max batch {settings.events.max_batch}) in {elapsed:.3f} s")
        store.dispose()
    partner.shutdown()
    receiver.shutdown()
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
