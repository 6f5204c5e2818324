"""A woken worker keeps taking accepted events while they arrive (Pipeline.intake_pending with
a Drain): one-event producers still make batches, producers send no wake-ups meanwhile, and
nothing committed around the moment the worker lets go is left waiting. Real PostgreSQL;
the pause and the monotonic clock are injected; the last test runs a real worker."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from conftest import Proc, wait_until
from sqlalchemy import func, select
from support.helpers import NOW, add_click, add_offer, add_partner, conversion
from support.partner import PartnerServer

from postback_worker.pipeline.processing import Drain, Pipeline
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.journal import Journal
from postback_worker.store.repo import Store
from postback_worker.worker.queues import INTAKE_WOKEN_KEY, INTAKE_WOKEN_MS, TASK_INTAKE


class Script:
    """Records what the drain does; `arrive[k]` events are committed during the k-th pause
    (or the k-th release), as a producer would while the worker waits."""

    def __init__(self, store: Store, pipeline: Pipeline, *, arrive: dict[int, int] | None = None,
                 arrive_on_release: dict[int, int] | None = None) -> None:
        self.journal = Journal(store)
        self.log: list[str] = []
        self.now = 0.0
        self.sent = 0
        self.pauses = 0
        self.releases = 0
        self.arrive = arrive or {}
        self.arrive_on_release = arrive_on_release or {}
        take = pipeline.intake.take_pending

        def spy(limit: int, before: Any) -> Any:
            taken = take(limit, before)
            self.log.append(f"take {len(taken.conversion_ids)}")
            self.now += 0.01  # a batch takes a little time
            return taken

        pipeline.intake.take_pending = spy  # type: ignore[method-assign]

    def send(self, n: int) -> None:
        self.journal.record([conversion(f"tx{self.sent + i}", id=f"cv{self.sent + i:03d}",
                                        now=NOW + timedelta(seconds=self.sent + i))
                             for i in range(n)])
        self.sent += n

    def drain(self, linger: float = 0.1, budget: float = 60.0) -> Drain:
        def hold() -> None:
            self.log.append("hold")

        def release() -> None:
            self.log.append("release")
            self.releases += 1
            self.send(self.arrive_on_release.get(self.releases, 0))

        def pause(seconds: float) -> None:
            self.log.append(f"pause {seconds:.2f}")
            self.now += seconds
            self.pauses += 1
            self.send(self.arrive.get(self.pauses, 0))

        return Drain(linger=linger, budget=budget, hold=hold, release=release, pause=pause,
                     monotonic=lambda: self.now)


def waiting(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(
            t.conversions.c.state == "received")).scalar_one())


def test_keeps_taking_while_events_arrive_then_lets_go(store: Store,
                                                       pipeline: Pipeline) -> None:
    script = Script(store, pipeline, arrive={1: 4, 2: 5})
    script.send(3)
    result = pipeline.intake_pending(100, 2, drain=script.drain(linger=0.1))
    assert script.log == [
        "hold", "take 3", "pause 0.09",   # a short batch: wait out the rest of the linger
        "hold", "take 4", "pause 0.09",   # (events arrived meanwhile: one batch of them)
        "hold", "take 5", "pause 0.09",
        "hold", "take 0", "release",      # nothing came: producers wake workers again ...
        "take 0"]                          # ... and one more look finds nothing: done
    assert sum(result.conversions.values()) == 12 and not result.handed_over
    assert waiting(store) == 0


def test_an_event_committed_as_the_worker_lets_go_is_taken(store: Store,
                                                           pipeline: Pipeline) -> None:
    """A producer that still saw the hold sent no wake-up: the look after the release
    finds its event, and the worker holds again."""
    script = Script(store, pipeline, arrive_on_release={1: 1})
    script.send(2)
    result = pipeline.intake_pending(100, 2, drain=script.drain(linger=0.1))
    assert script.log == ["hold", "take 2", "pause 0.09",
                          "hold", "take 0", "release", "take 1", "pause 0.09",
                          "hold", "take 0", "release", "take 0"]
    assert sum(result.conversions.values()) == 3 and waiting(store) == 0


def test_hands_over_after_its_time_budget(store: Store, pipeline: Pipeline) -> None:
    """Events keep coming: after `budget` seconds the worker stops holding (no release: the
    task wakes a worker for the rest at once) and says so."""
    script = Script(store, pipeline, arrive={k: 1 for k in range(1, 20)})
    script.send(1)
    result = pipeline.intake_pending(100, 2, drain=script.drain(linger=0.1, budget=0.15))
    assert script.log == ["hold", "take 1", "pause 0.09", "hold", "take 1", "pause 0.09",
                          "hold", "take 1"]
    assert result.handed_over and "release" not in script.log
    assert script.sent == 3 and waiting(store) == 0


def test_full_batches_wake_others_and_never_linger(store: Store, pipeline: Pipeline) -> None:
    script = Script(store, pipeline)
    script.send(7)
    woken: list[int] = []
    result = pipeline.intake_pending(2, 2, on_backlog=lambda: woken.append(1),
                                     drain=script.drain())
    assert script.log == ["hold", "take 2", "hold", "take 2"]
    assert len(woken) == 2 and result.handed_over and waiting(store) == 3


def test_without_a_drain_one_wake_up_takes_what_waits_once(store: Store,
                                                           pipeline: Pipeline) -> None:
    script = Script(store, pipeline)
    script.send(5)
    result = pipeline.intake_pending(2, 5)
    assert script.log == ["take 2", "take 2", "take 1"]
    assert not result.handed_over and waiting(store) == 0


def start_worker(store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc], *,
                 clicks: int, linger: float) -> Proc:
    """Offer o1, partner p1, clicks tx0..; one worker process with this linger, once its own
    wake-up on start has run."""
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    for i in range(clicks):
        add_click(store, f"tx{i}")
    worker = celery_procs("worker", concurrency=1, ingest_linger=linger)
    wait_until(lambda: worker.output().count(f"{TASK_INTAKE}[") >= 2, 30,
               message="the worker's wake-up on start to run")
    return worker


def assert_intake_tasks(worker: Proc, n: int) -> None:
    """The worker ran exactly `n` intake tasks. Each logs a line when received and one when
    done; the done line comes just after the task lets go of the flag, so wait for it."""
    wait_until(lambda: worker.output().count(f"Task {TASK_INTAKE}[") >= 2 * n, 30,
               message="the last intake task to finish")
    assert worker.output().count(f"Task {TASK_INTAKE}[") == 2 * n


@pytest.mark.e2e
def test_a_worker_holds_the_flag_while_it_takes_then_clears_it(
        settings: Settings, store: Store, partner: PartnerServer,
        redis_client: redis.Redis, celery_procs: Callable[..., Proc]) -> None:
    """A real worker: one-event calls while it lingers publish no wake-up (it holds the flag
    for longer than a producer would), it takes them as one batch, and lets go afterwards."""
    worker = start_worker(store, partner, celery_procs, clicks=21, linger=1.0)
    producer = Producer(settings)
    try:
        (first,) = producer.send_conversions([{"transaction_id": "tx0"}])
        wait_until(lambda: (redis_client.pttl(INTAKE_WOKEN_KEY) or 0) > INTAKE_WOKEN_MS,
                   30, message="the woken worker to hold the flag")
        ids = [producer.send_conversions([{"transaction_id": f"tx{i}"}])[0]
               for i in range(1, 21)]
        producer.flush()
        wait_until(lambda: partner.count() == 21, 30, message="21 postbacks")
        wait_until(lambda: not redis_client.exists(INTAKE_WOKEN_KEY), 30,
                   message="the worker to let go of the flag")
    finally:
        producer.close()
    # Two wake-ups in all: the worker's own on start, and the first call's.
    assert_intake_tasks(worker, 2)
    with store.engine.connect() as conn:
        batches = conn.execute(select(func.count(func.distinct(t.conversions.c.processed_at)))
                               .where(t.conversions.c.id.in_([first, *ids]))).scalar_one()
    assert batches == 2  # the first event, then the other 20 after the linger
    assert sorted(r.query["tid"][0] for r in partner.requests) == sorted(
        f"tx{i}" for i in range(21))


@pytest.mark.e2e
def test_without_a_linger_each_wake_up_takes_once(
        settings: Settings, store: Store, partner: PartnerServer,
        redis_client: redis.Redis, celery_procs: Callable[..., Proc]) -> None:
    """POSTBACK_INGEST_LINGER=0: the woken worker clears the flag and takes what waits once,
    so the next commit wakes it again."""
    worker = start_worker(store, partner, celery_procs, clicks=2, linger=0)
    producer = Producer(settings)
    try:
        for i in range(2):
            producer.send_conversions([{"transaction_id": f"tx{i}"}])
            wait_until(lambda i=i: partner.count() == i + 1, 30, message="the postback")
            wait_until(lambda: not redis_client.exists(INTAKE_WOKEN_KEY), 30,
                       message="the flag to clear")
    finally:
        producer.close()
    assert_intake_tasks(worker, 3)  # the worker's own wake-up on start, then one per call
