"""Acknowledged means durable: the producer and the API commit every accepted conversion event
in PostgreSQL before they answer; Redis only carries wake-ups (real PostgreSQL and Redis)."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import select

from postback_worker.dev.services import free_port
from postback_worker.errors import Unavailable
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.journal import Journal
from postback_worker.store.repo import Store
from postback_worker.worker.queues import (
    INTAKE_WOKEN_KEY,
    INTAKE_WOKEN_MS,
    TASK_INTAKE,
    TASK_PROCESS,
)


def stored(store: Store) -> dict[str, str]:
    """conversion id -> state, for every stored conversion."""
    cv = t.conversions.c
    with store.engine.connect() as conn:
        return {r.id: r.state for r in conn.execute(select(cv.id, cv.state))}


def messages(client: redis.Redis) -> list[tuple[str, list[object]]]:
    """(task name, first argument) of every message in the `conversions` queue."""
    out = []
    for raw in client.lrange("conversions", 0, -1):
        message = json.loads(raw)
        out.append((message["headers"]["task"],
                    json.loads(base64.b64decode(message["body"]))[0][0]))
    return out


def test_producer_returns_only_after_the_commit(settings: Settings, store: Store,
                                                redis_client: redis.Redis) -> None:
    producer = Producer(settings)
    try:
        ids = producer.send_conversions([{"transaction_id": "tx1", "payout": "2"},
                                         {"id": "mine-1", "transaction_id": "tx2"}])
        assert ids[1] == "mine-1"
        assert stored(store) == {ids[0]: "received", "mine-1": "received"}
        producer.flush()  # the wake-up goes out from the producer's waker thread
        assert messages(redis_client) == [(TASK_INTAKE, ids)]
        # Idempotent: the same id again stores nothing new.
        assert producer.send_conversions([{"id": "mine-1", "transaction_id": "tx9"}]) == [
            "mine-1"]
        assert len(stored(store)) == 2
    finally:
        producer.close()


def test_one_wake_up_waits_at_a_time(settings: Settings, store: Store,
                                     redis_client: redis.Redis) -> None:
    """While a wake-up waits in the queue, more commits publish none (that wake-up takes
    their events too); once a worker took it (and cleared the flag), the next commit wakes
    again. The flag expires, so a lost wake-up cannot silence producers for long."""
    producer = Producer(settings)
    try:
        first = producer.send_conversions([{"transaction_id": "tx1"}])
        producer.flush()
        assert 0 < redis_client.pttl(INTAKE_WOKEN_KEY) <= INTAKE_WOKEN_MS
        redis_client.pexpire(INTAKE_WOKEN_KEY, 60_000)  # (a slow machine must not expire it)
        more = [producer.send_conversions([{"transaction_id": f"tx{i}"}])[0]
                for i in range(2, 6)]
        producer.flush()
        assert messages(redis_client) == [(TASK_INTAKE, first)]
        redis_client.delete(INTAKE_WOKEN_KEY)  # what a woken worker does before claiming
        last = producer.send_conversions([{"transaction_id": "tx9"}])
        producer.flush()
        assert sorted(messages(redis_client)) == sorted([(TASK_INTAKE, first),
                                                         (TASK_INTAKE, last)])
    finally:
        producer.close()
    assert set(stored(store)) == {*first, *more, *last}


def test_producer_raises_when_the_database_is_down(settings: Settings,
                                                   redis_client: redis.Redis) -> None:
    dead = settings.with_overrides(
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    producer = Producer(dead)
    try:
        with pytest.raises(Unavailable, match="did not store the events"):
            producer.send_conversions([{"transaction_id": "tx1"}])
    finally:
        producer.close()
    assert messages(redis_client) == []


def test_producer_with_redis_down_still_stores(settings: Settings, store: Store) -> None:
    """The wake-up is best effort: the event is committed and beat's sweep finds it."""
    producer = Producer(settings.with_overrides(
        redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        (cid,) = producer.send_conversions([{"transaction_id": "tx1"}])
    finally:
        producer.close()
    assert stored(store) == {cid: "received"}


def test_one_event_calls_from_many_threads_share_commits(settings: Settings, store: Store,
                                                         redis_client: redis.Redis) -> None:
    producer = Producer(settings)
    start = threading.Barrier(16)

    def send(n: int) -> list[str]:
        start.wait()
        return [producer.send_conversions([{"transaction_id": f"tx{n}-{i}"}])[0]
                for i in range(20)]

    try:
        with ThreadPoolExecutor(16) as pool:
            ids = [i for chunk in pool.map(send, range(16)) for i in chunk]
    finally:
        producer.close()
    assert len(ids) == 320 and set(stored(store)) == set(ids)
    woken = messages(redis_client)
    assert 1 <= len(woken) < 320
    assert {i for _, group in woken for i in group} <= set(ids)


def test_fast_mode_is_explicit_and_keeps_events_in_redis(settings: Settings, store: Store,
                                                         redis_client: redis.Redis) -> None:
    producer = Producer(settings, durable=False)
    try:
        (cid,) = producer.send_conversions([{"transaction_id": "tx1"}])
    finally:
        producer.close()
    assert stored(store) == {}
    ((task, events),) = messages(redis_client)
    assert task == TASK_PROCESS and [e["id"] for e in events] == [cid]  # type: ignore[index]


def test_one_calls_events_are_taken_in_the_order_sent(settings: Settings, store: Store) -> None:
    """Workers take waiting events by time received; the events of one call (e.g. a
    conversion's pending and approved) keep the order they were sent in."""
    producer = Producer(settings)
    try:
        ids = producer.send_conversions(
            [{"transaction_id": f"tx{i % 3}", "status": ("pending", "approved")[i % 2]}
             for i in range(50)])
    finally:
        producer.close()
    with store.engine.begin() as conn:
        taken = Journal(store).claim(conn, 100, reattributed_before=datetime.now(UTC))
    assert [r["id"] for r in taken] == ids
