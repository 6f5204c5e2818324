"""End to end: conversions through Redis and real Celery workers to a real local partner."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable

import pytest
from conftest import Proc, wait_until
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e

FINAL = {"delivered", "dead_lettered", "skipped"}


def seed(store: Store, partner: PartnerServer, n: int, **partner_extra: object) -> list[str]:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, **partner_extra)
    txs = [f"tx{i:04d}" for i in range(n)]
    for tx in txs:
        add_click(store, tx)
    return txs


def all_final(store: Store, ids: list[str]) -> bool:
    convs = [store.get_conversion(i) for i in ids]
    if any(c is None or c["state"] == "received" for c in convs):
        return False
    return all(p["state"] in FINAL for i in ids for p in store.postbacks_for(i))


def wait_all_final(store: Store, ids: list[str], timeout: float, what: str) -> None:
    """Wait for every conversion and postback to be final; on timeout say what is left."""
    try:
        wait_until(lambda: all_final(store, ids), timeout, message=what)
    except AssertionError as exc:
        left = [(p["id"], p["state"], p["attempts"], p["reason"])
                for i in ids for p in store.postbacks_for(i) if p["state"] not in FINAL]
        raise AssertionError(f"{exc}; not final: {left[:5]}") from None


def delivered_ids(store: Store, ids: list[str]) -> set[str]:
    return {p["id"] for i in ids for p in store.postbacks_for(i) if p["state"] == "delivered"}


def test_producer_to_partner(settings: Settings, store: Store, partner: PartnerServer,
                             celery_procs: Callable[..., Proc]) -> None:
    txs = seed(store, partner, 30)
    celery_procs("worker")
    producer = Producer(settings)
    events = [{"transaction_id": tx, "payout": f"{i}.50", "currency": "EUR"}
              for i, tx in enumerate(txs)]
    ids = producer.send_conversions(events)
    assert len(ids) == 30
    wait_until(lambda: all_final(store, ids), 60, message="30 conversions to be delivered")
    assert partner.count() == 30
    got = sorted((r.query["tid"][0], r.query["payout"][0]) for r in partner.requests)
    assert got == sorted((tx, f"{i}.50") for i, tx in enumerate(txs))
    assert len(delivered_ids(store, ids)) == 30


def test_partner_down_then_up_receives_every_postback(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc]
) -> None:
    """503 for the first 40 requests, then 200: every postback arrives once recovered.

    The circuit breaker opens on the way (short cool-downs here) and closes on recovery.
    """
    txs = seed(store, partner, 20, max_attempts=20)
    partner.set_script([503] * 40)
    fast_breaker = {"breaker_cooldown": 0.3, "breaker_max_cooldown": 0.6}
    celery_procs("worker", **fast_breaker)
    celery_procs("beat", **fast_breaker)
    ids = Producer(settings).send_conversions([{"transaction_id": tx} for tx in txs])
    wait_all_final(store, ids, 90, "every postback to be delivered")
    undelivered = [(p["id"], p["state"], p["attempts"], p["reason"])
                   for i in ids for p in store.postbacks_for(i) if p["state"] != "delivered"]
    assert undelivered == []
    after_recovery = [r.header("X-Postback-Id") for r in partner.requests[40:]]
    assert sorted(after_recovery) == sorted(delivered_ids(store, ids))  # each exactly once
    attempts = store.attempts_for(sorted(delivered_ids(store, ids)))
    assert Counter(a["failure_class"] for a in attempts) == {"partner_5xx": 40, "delivered": 20}


def test_message_delivered_twice_fires_each_postback_once(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc]
) -> None:
    """The same batch handed to two workers at once (as after a visibility-timeout redelivery)."""
    txs = seed(store, partner, 60)
    partner.set_response(status=200, delay=0.02)
    celery_procs("worker", concurrency=2)
    celery_procs("worker", concurrency=2)
    producer = Producer(settings)
    events = producer.validate([{"transaction_id": tx} for tx in txs])
    for _ in range(4):
        producer.enqueue(events)
    ids = [e.id for e in events]
    wait_until(lambda: all_final(store, ids), 60, message="60 conversions")
    # let any late duplicate firing land before counting
    wait_until(lambda: partner.count() >= 60, 10)
    counts = Counter(partner.postback_ids())
    assert len(counts) == 60
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]


def test_worker_killed_mid_batch_loses_nothing(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc]
) -> None:
    """SIGKILL a worker while it fires a batch; a new worker finishes every conversion.

    Only postbacks fired but not yet recorded may be fired again, always with the same
    postback id: those in flight (at most the delivery concurrency) and the answers not yet
    saved (saved in groups of at most record_batch as they arrive; README, Guarantees).
    """
    concurrency, record_batch = 8, 2
    txs = seed(store, partner, 80)
    # Answers spread out in time, as from a real partner (not in lockstep).
    partner.set_script([{"status": 200, "delay": 0.05 * (1 + i % 8)} for i in range(400)])
    limits = {"delivery_concurrency": concurrency, "record_batch": record_batch}
    worker = celery_procs("worker", concurrency=1, **limits)
    ids = Producer(settings).send_conversions([{"transaction_id": tx} for tx in txs])
    wait_until(lambda: partner.count() >= 30, 60, message="the worker to be mid-batch")
    worker.kill(signal.SIGKILL)
    fired_before_kill = partner.count()
    assert fired_before_kill < 80
    celery_procs("worker", concurrency=1, **limits)
    celery_procs("beat")
    wait_until(lambda: all_final(store, ids), 120, message="every conversion after the restart")
    pb_ids = delivered_ids(store, ids)
    assert len(pb_ids) == 80
    counts = Counter(partner.postback_ids())
    assert set(counts) == pb_ids
    twice = [k for k, v in counts.items() if v > 1]
    assert max(counts.values()) <= 2
    print(f"fired before kill {fired_before_kill}, fired twice {len(twice)}")
    # In flight, plus one group being saved and the answers that came meanwhile.
    assert len(twice) <= concurrency + 2 * record_batch, twice


def test_sigterm_mid_batch_is_a_warm_shutdown(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc]
) -> None:
    """SIGTERM to the worker's main process (as deploy/ stops it) while a pool child runs an
    intake wake-up: the child finishes its batch, the worker exits 0 and logs no traceback
    (no WorkerLostError), and every postback of that batch is final."""
    txs = seed(store, partner, 40)
    partner.set_response(200, delay=0.05)
    worker = celery_procs("worker", concurrency=1, delivery_concurrency=4)
    ids = Producer(settings).send_conversions([{"transaction_id": tx} for tx in txs])
    wait_until(lambda: partner.count() >= 4, 60, message="the worker to be mid-batch")
    assert partner.count() < 40
    worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.output()[-2000:]
    assert "Traceback" not in worker.output(), worker.output()[-3000:]
    assert all_final(store, ids)
    assert partner.count() == 40 and len(delivered_ids(store, ids)) == 40


def test_worker_refuses_a_lease_shorter_than_twice_the_longest_timeout(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc]
) -> None:
    """Settings that cannot keep postbacks claimed stop the worker at start, saying why."""
    seed(store, partner, 1, timeout=4)
    worker = celery_procs("worker", lease_seconds=5)
    assert worker.proc is not None
    assert worker.proc.wait(60) == 1
    out = worker.output()
    assert "worker not started: POSTBACK_LEASE_SECONDS=5 is too short" in out, out[-2000:]
    assert "(4 s, the timeout of partner p1)" in out
    assert "Set POSTBACK_LEASE_SECONDS to 8 or more" in out


def test_slow_partner_batch_longer_than_the_lease_fires_each_postback_once(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc]
) -> None:
    """One batch to a slow partner outlasts its 3 s lease several times over while beat
    sweeps every 0.2 s: leases are renewed, nothing is fired twice (issue 15)."""
    txs = seed(store, partner, 8, timeout=1.5)
    partner.set_response(status=200, delay=1.0)
    slow = {"lease_seconds": 3, "default_timeout": 1.5, "delivery_concurrency": 1}
    celery_procs("worker", concurrency=1, **slow)
    celery_procs("beat", **slow)
    ids = Producer(settings).send_conversions([{"transaction_id": tx} for tx in txs])
    wait_all_final(store, ids, 90, "the slow batch to be delivered")
    counts = Counter(partner.postback_ids())
    assert len(counts) == 8 and max(counts.values()) == 1, counts
    pb_ids = sorted(delivered_ids(store, ids))
    assert [a["attempt_no"] for a in store.attempts_for(pb_ids)] == [1] * 8
