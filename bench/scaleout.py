"""Scale-out benchmark: worker "hosts" in network namespaces, one host vs two.

Each host is a network namespace with its own address and hostname; PostgreSQL, Redis and
the partner run on this machine and are reached over the namespaces' bridge (never loopback).
Conversions for valid clicks are enqueued through the producer in batches once the workers are
ready; the figure is postbacks delivered (each attempt recorded in PostgreSQL) per second,
from the first enqueue to the last delivery. Needs root and iproute2.

    sudo .venv/bin/python bench/scaleout.py [--conversions 20000] [--hosts 1,2]
        [--concurrency 1] [--partner-delay-ms 0]

It prints one line per run and checks every postback was delivered exactly once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fault-test harness (tests/support)

from support.faults import (  # noqa: E402
    Cluster,
    TestNetwork,
    netns_unavailable,
    postback_states,
)

from postback_worker.settings import Settings  # noqa: E402

POLL_TIMEOUT = 600.0


@dataclass
class RunResult:
    hosts: list[str]
    postbacks: int
    seconds: float
    per_host: dict[str, int]  # attempts recorded by each host
    states: dict[str, str]  # postback id -> state
    attempts: Counter[str]  # postback id -> attempts recorded

    @property
    def throughput(self) -> float:
        return self.postbacks / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        hosts = " ".join(f"{h}={n}" for h, n in sorted(self.per_host.items()))
        return (f"hosts={len(self.hosts)} postbacks={self.postbacks} seconds={self.seconds:.2f} "
                f"throughput={self.throughput:.0f}/s attempts by host: {hosts}")


def _seed(cluster: Cluster, partner_url: str, n: int, partner_extra: dict[str, Any],
          rate_limit: float | None = None) -> list[str]:
    from postback_worker.ops.config import parse_offer, parse_partner
    from postback_worker.store.db import make_engine
    from postback_worker.store.repo import Store

    now = datetime.now(UTC)
    store = Store(make_engine(cluster.settings.database.url))
    store.upsert_offer(parse_offer({"id": "o1", "campaign_type": "ecommerce"}, now))
    store.upsert_partner(parse_partner({
        "id": "p1", "postback_url": f"{partner_url}/pb?tid={{transaction_id}}&pb={{postback_id}}",
        **partner_extra}, now))
    if rate_limit is not None:
        from sqlalchemy import update

        from postback_worker.store import schema as t

        with store.engine.begin() as conn:
            conn.execute(update(t.partners).where(t.partners.c.id == "p1").values(
                rate_limit=rate_limit))
    txs = [f"tx{i:07d}" for i in range(n)]
    clicked = now - timedelta(hours=1)
    for i in range(0, n, 5000):
        store.insert_clicks([{
            "transaction_id": tx, "offer_id": "o1", "aff_id": "p1", "aff_sub": None,
            "aff_sub2": None, "aff_sub3": None, "aff_sub4": None, "aff_sub5": None,
            "source": None, "ip": None, "device_id": None, "user_agent": None,
            "clicked_at": clicked} for tx in txs[i : i + 5000]])
    store.engine.dispose()
    return txs


def _delivered(engine: Any) -> int:
    from sqlalchemy import func, select

    from postback_worker.store import schema as t

    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(
            t.postbacks.c.state == "delivered")).scalar() or 0)


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)  # polling real processes


def run_scaleout(network: TestNetwork, hosts: Sequence[str], partner_url: str, workdir: Path,
                 settings: Settings, conversions: int, *, chunk: int = 500,
                 concurrency: int = 1, partner_extra: dict[str, Any] | None = None,
                 partner_rate_limit: float | None = None,
                 timeout: float = POLL_TIMEOUT) -> RunResult:
    """Fresh PostgreSQL + Redis on the bridge, one worker per host, `conversions` enqueued in
    batches of `chunk` once every worker is ready; returns when every postback is final."""
    from sqlalchemy import select

    from postback_worker.producer import Producer
    from postback_worker.store import schema as t
    from postback_worker.store.db import make_engine

    with Cluster(workdir, settings, network=network) as cluster:
        txs = _seed(cluster, partner_url, conversions, partner_extra or {},
                    partner_rate_limit)
        workers = [cluster.worker(f"w{host}", host=host, concurrency=concurrency)
                   for host in hosts]
        cluster.beat()
        for w in workers:
            _poll(lambda w=w: " ready." in w.output() or not w.alive, 60, f"{w.name} to start")
            if not w.alive:
                raise RuntimeError(f"{w.name} exited:\n{w.output()[-3000:]}")
        engine = make_engine(cluster.settings.database.url)
        producer = Producer(cluster.settings)
        try:
            started = time.perf_counter()
            ids: list[str] = []
            for i in range(0, len(txs), chunk):
                ids += producer.send_conversions(
                    [{"transaction_id": tx} for tx in txs[i : i + chunk]])
            _poll(lambda: _delivered(engine) >= len(txs), timeout, "every postback delivered")
            seconds = time.perf_counter() - started
            states = postback_states(engine, ids)
            with engine.connect() as conn:
                rows = conn.execute(select(t.attempts.c.postback_id, t.attempts.c.worker)).all()
        finally:
            producer.close()
            engine.dispose()
    attempts = Counter(r[0] for r in rows)
    per_host = Counter(str(r[1]).split(":", 1)[0] for r in rows)
    return RunResult(list(hosts), len(states), seconds, dict(per_host), states, attempts)


def bench_settings(network: TestNetwork, **overrides: Any) -> Settings:
    return Settings.build(allow_networks=(network.subnet,), config_cache_seconds=5.0,
                    visibility_timeout=600, **overrides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--conversions", type=int, default=20000)
    ap.add_argument("--hosts", default="1,2", help="comma-separated host counts to run")
    ap.add_argument("--concurrency", type=int, default=1, help="worker processes per host")
    ap.add_argument("--chunk", type=int, default=500, help="events per enqueued message")
    ap.add_argument("--partner-delay-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    reason = netns_unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    counts = [int(c) for c in args.hosts.split(",") if c.strip()]
    with TestNetwork() as net, tempfile.TemporaryDirectory(prefix="pbw-scaleout-") as tmp:
        names = [f"host{i + 1}" for i in range(max(counts))]
        for name in names:
            net.add_host(name)
        partner = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "fast_partner.py"), "--host", net.gateway,
             "--delay-ms", str(args.partner_delay_ms)],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert partner.stdout is not None
            ready: list[str] = []
            for _ in range(20):  # it may print other lines (e.g. its event loop) first
                ready = partner.stdout.readline().split()
                if not ready or ready[0] == "READY":
                    break
            if len(ready) != 2 or ready[0] != "READY":
                print("the partner server did not start", file=sys.stderr)
                return 1
            url = f"http://{net.gateway}:{ready[1]}"
            print(f"# {args.conversions} conversions, {args.concurrency} worker process(es) per "
                  f"host, {os.cpu_count()} cores; PostgreSQL, Redis and the partner on "
                  f"{net.gateway}")
            for n in counts:
                result = run_scaleout(net, names[:n], url, Path(tmp) / f"run{n}",
                                      bench_settings(net), args.conversions,
                                      chunk=args.chunk, concurrency=args.concurrency)
                once = set(result.states.values()) == {"delivered"} and \
                    max(result.attempts.values()) == 1
                print(result.line() + ("" if once else "  NOT delivered exactly once"),
                      flush=True)
        finally:
            partner.terminate()
            partner.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
