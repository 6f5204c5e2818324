"""Redis restarted (AOF on) and Redis lost entirely (flushed) in the middle of a run.

Runs against a dedicated Redis and PostgreSQL started for the test (never the shared ones).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from celery import Celery
from conftest import ADMIN, wait_until
from sqlalchemy import insert
from support.faults import Cluster, postback_states, unfinished
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.api.app import create_app
from postback_worker.dev.services import free_port
from postback_worker.domain.retry import RetryPolicy
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.db import make_engine
from postback_worker.store.repo import Store
from postback_worker.worker.queues import MAINTENANCE, TASK_REQUEUE_STUCK

pytestmark = pytest.mark.e2e


def _calm(settings: Settings, **overrides: Any) -> Settings:
    """Fault-test settings: a long, fast retry schedule and no circuit breaker, so the
    only thing under test is riding through the fault."""
    extra: dict[str, Any] = {"breaker_enabled": False} if hasattr(settings, "breaker_enabled") \
        else {}
    return settings.with_overrides(
        retry=RetryPolicy(max_attempts=50, base_delay=0.3, max_delay=1.0, horizon=600.0),
        **extra, **overrides)


@pytest.fixture()
def cluster(settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster", _calm(settings)) as c:
        yield c


def _seed(cluster: Cluster, partner: PartnerServer, n: int) -> tuple[Store, list[str]]:
    store = Store(make_engine(cluster.settings.database.url))
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    txs = [f"tx{i:03d}" for i in range(n)]
    for tx in txs:
        add_click(store, tx)
    return store, txs


@pytest.fixture()
def cluster_now(settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster whose beat and workers treat any waiting event as stuck at once."""
    with Cluster(tmp_path / "cluster", _calm(settings, stuck_conversion_after=0)) as c:
        yield c


def test_redis_restart_mid_run(cluster_now: Cluster, partner: PartnerServer) -> None:
    cluster = cluster_now
    store, txs = _seed(cluster, partner, 80)
    partner.set_response(status=200, delay=0.05)
    worker = cluster.worker("w1", concurrency=2, delivery_concurrency=4)
    cluster.beat()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cluster.settings), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    api = f"http://127.0.0.1:{port}"
    http = requests.Session()
    http.headers.update(ADMIN)
    events = [{"id": f"cv{i:03d}", "transaction_id": tx} for i, tx in enumerate(txs)]
    ids = [e["id"] for e in events]
    try:
        wait_until(lambda: server.started, 10, message="uvicorn to start")
        for chunk in (events[:20], events[20:40]):
            assert http.post(f"{api}/v1/conversions", json=chunk, timeout=10).status_code == 202
        wait_until(lambda: partner.count() >= 5, 60, message="the first deliveries")

        in_flight = {p for p, s in postback_states(store.engine, ids).items() if s == "in_flight"}
        cluster.redis.stop()  # SIGTERM: Redis fsyncs its AOF and exits
        # Redis only wakes workers: events are committed in PostgreSQL and accepted anyway.
        down = http.post(f"{api}/v1/conversions", json=events[40:60], timeout=60)
        assert down.status_code == 202, down.text
        cluster.redis.start()  # same data directory: the AOF brings the queues back

        up = http.post(f"{api}/v1/conversions", json=events[60:], timeout=30)
        assert up.status_code == 202, up.text
        # Beat's safety net (every max(30 s, stuck_conversion_after / 2)) wakes a worker for
        # the events accepted while Redis was down; sent now, not waited for.
        app = Celery(broker=cluster.settings.redis.effective_broker_url)
        app.send_task(TASK_REQUEUE_STUCK, queue=MAINTENANCE)
        app.close()
        wait_until(lambda: unfinished(store.engine, ids) == 0, 120,
                   message="every accepted conversion to end after the Redis restart")
    finally:
        server.should_exit = True
        thread.join(10)

    states = postback_states(store.engine, ids)
    assert len(states) == 80 and set(states.values()) == {"delivered"}
    counts = Counter(partner.postback_ids())
    assert set(counts) == set(states)
    twice = {pid for pid, n in counts.items() if n > 1}
    assert twice <= in_flight, twice - in_flight
    assert worker.alive, "the worker must reconnect, not exit"
    store.engine.dispose()


def test_redis_flushed_persisted_work_is_found_again(cluster: Cluster,
                                                     partner: PartnerServer) -> None:
    """Everything is in PostgreSQL: waiting retries, events accepted while no worker ran
    (their wake-ups only in Redis) and events whose wake-up was lost long ago. After a flush,
    the sweepers and a starting worker find all of it; nothing has to be resent."""
    store, txs = _seed(cluster, partner, 40)
    s = cluster.settings
    partner.set_response(status=503)
    worker = cluster.worker("w1", concurrency=2, delivery_concurrency=8)
    cluster.beat()
    producer = Producer(s)
    app = Celery(broker=s.redis.effective_broker_url)
    try:
        # 1. Processed and failing: postbacks wait in PostgreSQL (retry_scheduled / queued).
        persisted = producer.send_conversions(
            [{"id": f"cv{i:03d}", "transaction_id": tx} for i, tx in enumerate(txs[:25])])
        wait_until(lambda: len(postback_states(store.engine, persisted)) == 25 and all(
            st in {"retry_scheduled", "queued"}
            for st in postback_states(store.engine, persisted).values()), 60,
            message="postbacks waiting for a retry")
        # 2. Accepted long ago, its wake-up lost: state `received`.
        old = datetime.now(UTC) - timedelta(seconds=s.sweep.stuck_conversion_after + 60)
        stuck = [f"cvs{i}" for i in range(5)]
        with store.engine.begin() as conn:
            conn.execute(insert(t.conversions), [{
                "id": cid, "transaction_id": txs[25 + i], "offer_id": None, "goal_id": "",
                "status": "approved", "occurred_at": old, "received_at": old,
                "state": "received"} for i, cid in enumerate(stuck)])
        # 3. Accepted while no worker consumes: committed, the wake-up only in Redis.
        worker.stop()
        waiting = producer.send_conversions(
            [{"id": f"cvr{i}", "transaction_id": tx} for i, tx in enumerate(txs[30:])])

        cluster.redis.flushall()
        partner.reset()  # from now on every request is answered 200
        cluster.worker("w2", concurrency=2, delivery_concurrency=8)
        # What beat runs every max(30 s, stuck_conversion_after / 2): sent now, not waited for.
        app.send_task(TASK_REQUEUE_STUCK, queue=MAINTENANCE)
        every = persisted + stuck + waiting
        wait_until(lambda: unfinished(store.engine, every) == 0, 120,
                   message="all accepted work to be found again after the flush")
    finally:
        producer.close()
        app.close()

    states = postback_states(store.engine, every)
    assert len(states) == 40 and set(states.values()) == {"delivered"}
    # After recovery each postback was answered 200 exactly once.
    assert Counter(partner.postback_ids()) == Counter(states.keys())
    store.engine.dispose()
