"""Acknowledged means durable: 2,000 events accepted through every door while no worker runs,
then Redis loses everything (FLUSHDB; or a redis-server without persistence killed with
SIGKILL and restarted empty). Workers started afterwards deliver every event, each postback
exactly once. Real PostgreSQL, Redis, Celery workers, API (uvicorn) and partner."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from conftest import ADMIN, Proc, wait_until
from support.faults import DedicatedRedis, postback_states, unfinished
from support.helpers import NOW, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e

N = 2000
QUARTER = N // 4


def _seed(store: Store, partner: PartnerServer) -> None:
    from datetime import timedelta

    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    store.insert_clicks([
        {"transaction_id": f"tx{i:05d}", "offer_id": "o1", "aff_id": "p1", "aff_sub": None,
         "aff_sub2": None, "aff_sub3": None, "aff_sub4": None, "aff_sub5": None,
         "source": None, "ip": None, "device_id": None, "user_agent": None,
         "clicked_at": NOW - timedelta(days=1)} for i in range(N)])


def _accept_everywhere(api: str, settings: Settings) -> list[str]:
    """N events: a quarter by GET /postback (one per request), a quarter by POST
    /v1/conversions one event per request, a quarter by POST in batches of 50, and a quarter
    by the producer (one-event calls from 8 threads, and batches of 25). Returns the ids."""
    http = requests.Session()
    http.headers.update(ADMIN)
    txs = [f"tx{i:05d}" for i in range(N)]
    parts = [txs[i * QUARTER:(i + 1) * QUARTER] for i in range(4)]

    def get_one(tx: str) -> str:
        r = http.get(f"{api}/postback", params={"transaction_id": tx, "payout": "1"},
                     timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["ids"][0])

    def post(events: list[dict[str, str]]) -> list[str]:
        r = http.post(f"{api}/v1/conversions", json=events, timeout=60)
        assert r.status_code == 202, r.text
        return list(r.json()["ids"])

    ids: list[str] = []
    with ThreadPoolExecutor(16) as pool:
        ids += pool.map(get_one, parts[0])
        ids += [i for got in pool.map(lambda tx: post([{"transaction_id": tx}]), parts[1])
                for i in got]
        ids += [i for got in pool.map(post, [[{"transaction_id": tx} for tx in parts[2][k:k + 50]]
                                            for k in range(0, QUARTER, 50)]) for i in got]
    producer = Producer(settings)
    try:
        half = QUARTER // 2
        with ThreadPoolExecutor(8) as pool:
            ids += [i for got in pool.map(lambda tx: producer.send_conversions(
                [{"transaction_id": tx}]), parts[3][:half]) for i in got]
        for k in range(half, QUARTER, 25):
            ids += producer.send_conversions([{"transaction_id": tx}
                                              for tx in parts[3][k:k + 25]])
    finally:
        producer.close()
    assert len(set(ids)) == N
    return ids


def _delivered_exactly_once(store: Store, partner: PartnerServer, ids: list[str]) -> None:
    wait_until(lambda: unfinished(store.engine, ids) == 0, 600, interval=0.5,
               message="every accepted event to reach a final state")
    states = postback_states(store.engine, ids)
    assert len(states) == N and set(states.values()) == {"delivered"}
    counts = Counter(partner.postback_ids())
    assert set(counts) == set(states)
    assert max(counts.values()) == 1, [p for p, n in counts.items() if n > 1][:5]


def test_redis_flushed_after_acceptance_loses_nothing(
    serve: Callable[[Settings], str], settings: Settings, store: Store,
    redis_client: redis.Redis, partner: PartnerServer, celery_procs: Callable[..., Proc]
) -> None:
    _seed(store, partner)
    ids = _accept_everywhere(serve(settings), settings)
    assert redis_client.llen("conversions") > 0  # the wake-ups that are about to be lost
    redis_client.flushdb()
    celery_procs("worker", concurrency=2)
    _delivered_exactly_once(store, partner, ids)


def test_redis_killed_without_persistence_loses_nothing(
    serve: Callable[[Settings], str], settings: Settings, store: Store,
    partner: PartnerServer, celery_procs: Callable[..., Proc], tmp_path: Path
) -> None:
    server = DedicatedRedis(tmp_path / "redis", persistence=False).start()
    try:
        s = settings.with_overrides(redis_url=server.url(), broker_url="")
        _seed(store, partner)
        ids = _accept_everywhere(serve(s), s)
        client = redis.Redis.from_url(server.url())
        assert client.llen("conversions") > 0
        client.close()
        server.stop(signal.SIGKILL)  # a crash: no AOF, no snapshot
        server.start()
        client = redis.Redis.from_url(server.url())
        assert client.dbsize() == 0  # restarted empty: every wake-up is gone
        client.close()
        # Beat is the safety net: it wakes workers for events waiting too long. (Leases long
        # enough for 500-postback batches on a loaded machine: this test is about Redis.)
        after = {"redis_url": server.url(), "broker_url": "", "stuck_conversion_after": 1,
                 "lease_seconds": 60}
        celery_procs("worker", concurrency=2, **after)
        celery_procs("beat", **after)
        _delivered_exactly_once(store, partner, ids)
    finally:
        server.stop()


