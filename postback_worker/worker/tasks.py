"""Thin Celery tasks: deserialize, call the pipeline, handle infrastructure retries."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from functools import partial
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, OperationalError

from postback_worker.pipeline.processing import Drain
from postback_worker.store.journal import Journal
from postback_worker.worker.queues import (
    CONVERSIONS,
    INTAKE_HOLD_MS,
    INTAKE_WOKEN_KEY,
    INTAKE_WOKEN_MS,
    RETRIES,
    TASK_DELIVER,
    TASK_INTAKE,
    TASK_PROCESS,
    TASK_REQUEUE_STUCK,
    TASK_SWEEP,
)

log = logging.getLogger(__name__)

DELIVER_CHUNK = 100
# Delete the intake flag only if this worker's hold is still what it says.
RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
           "return redis.call('del', KEYS[1]) end return 0")
# At most this many wake-ups per sweep run (each woken task drains batches while they come).
WAKE_MAX = 8
# Database outages are retried by Celery with backoff; the message stays unacknowledged
# until the retry is published, so nothing is lost.
DB_RETRY = {
    "autoretry_for": (OperationalError, DBAPIError),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": None,
}


def register(app: Celery) -> None:
    services = app.postback_services  # type: ignore[attr-defined]

    @app.task(name=TASK_PROCESS, bind=True, **DB_RETRY)
    def process_conversions(self: Task, events: list[dict[str, Any]]) -> dict[str, Any]:
        return services.pipeline.process_conversions(events).as_dict()

    # Acknowledged on receipt: a wake-up carries no state. If the worker dies, the events
    # are still `received` in the journal and the next wake-up (a starting worker, beat's
    # sweep) takes them; claimed postbacks come back through the sweep. (Acknowledged late,
    # a wake-up running while the broker connection drops makes kombu's restore of
    # unacknowledged messages kill the worker: tests/test_faults_redis.py.)
    @app.task(name=TASK_INTAKE, bind=True, acks_late=False, **DB_RETRY)
    def intake(self: Task, conversion_ids: list[str]) -> dict[str, Any]:
        # A wake-up: events wait in the journal. The ids only say what prompted it; the
        # worker takes whatever waits, oldest first, in batches, while events keep coming.
        pipeline = services.pipeline
        ingest = pipeline.settings.ingest
        drain = None
        if ingest.linger > 0:
            token = self.request.id or uuid.uuid4().hex
            hold_ms = int(ingest.linger * 1000) + INTAKE_HOLD_MS
            drain = Drain(linger=ingest.linger, budget=ingest.drain_seconds,
                          hold=partial(hold_flag, token, hold_ms),
                          release=partial(release_flag, token))
        else:
            release_flag(None)  # one take per wake-up: later commits wake another worker
        result = pipeline.intake_pending(ingest.claim_batch, ingest.claim_rounds,
                                         on_backlog=wake_another, drain=drain)
        if result.handed_over:
            wake_another()  # a fresh wake-up (any worker) takes the rest
        return {**result.as_dict(), "handed_over": result.handed_over}

    def hold_flag(token: str, ms: int) -> None:
        try:
            services.redis.set(INTAKE_WOKEN_KEY, token, px=ms)
        except RedisError as exc:  # producers wake more workers than needed: harmless
            log.warning("could not renew the wake-up flag: %s", exc)

    def release_flag(token: str | None) -> None:
        """Later commits wake a worker again, unless another worker holds the flag now (it
        takes them, or looks once more when it lets go). No token: delete it whoever set it."""
        try:
            if token is None:
                services.redis.delete(INTAKE_WOKEN_KEY)
            else:
                services.redis.eval(RELEASE, 1, INTAKE_WOKEN_KEY, token)
        except RedisError as exc:
            log.warning("could not clear the wake-up flag (it expires): %s", exc)

    def wake_another() -> None:
        """More waits: wake one more worker to share it (a wake-up the producers left may sit
        in this busy worker's own reserve)."""
        try:
            services.redis.set(INTAKE_WOKEN_KEY, "1", px=INTAKE_WOKEN_MS)
            intake.apply_async(([],), queue=CONVERSIONS)
        except (RedisError, OSError) as exc:
            log.warning("could not wake another worker for the backlog: %s", exc)

    def wake_on_start(sender: Any = None, **_: Any) -> None:
        # A starting worker takes what waits in the journal (after Redis lost its queue, or
        # a fleet-wide stop), without waiting for beat.
        if getattr(sender, "app", None) is app:
            intake.apply_async(([],), queue=CONVERSIONS)

    worker_ready.connect(wake_on_start, weak=False)

    @app.task(name=TASK_DELIVER, bind=True, **DB_RETRY)
    def deliver_postbacks(self: Task, postback_ids: list[str],
                          triggered_by: str | None = None) -> dict[str, Any]:
        return services.pipeline.deliver(postback_ids, triggered_by).as_dict()

    # The sweep runs every second or so: it sends no task events, so it does not drown real
    # work in Flower's task list (its effect shows as deliver tasks and in the metrics).
    @app.task(name=TASK_SWEEP, bind=True, acks_late=False, send_events=False)
    def sweep(self: Task) -> dict[str, int]:
        # Keep taking batches while they come back full, so a large backlog falling due at
        # once drains at worker speed rather than one batch per beat tick.
        pipeline = services.pipeline
        queued = 0
        while queued < pipeline.settings.sweep.max_per_run:
            ids = pipeline.sweep()
            with app.producer_or_acquire() as producer:
                for i in range(0, len(ids), DELIVER_CHUNK):
                    deliver_postbacks.apply_async((ids[i : i + DELIVER_CHUNK],),
                                                  queue=RETRIES, producer=producer)
            queued += len(ids)
            if len(ids) < pipeline.settings.sweep.batch:
                break
        return {"postbacks_queued": queued}

    @app.task(name=TASK_REQUEUE_STUCK, bind=True, acks_late=False, send_events=False)
    def requeue_stuck_conversions(self: Task) -> dict[str, int]:
        # The safety net of durable intake: accepted events whose wake-up was lost (Redis
        # flushed, crashed, failed over) are in the journal; wake enough workers to take them.
        pipeline = services.pipeline
        sweep = pipeline.settings.sweep
        older = pipeline.clock() - timedelta(seconds=sweep.stuck_conversion_after)
        stuck = Journal(pipeline.store).pending(older_than=older)
        if stuck:
            log.warning("%d accepted conversions wait for intake; waking workers", stuck)
            with app.producer_or_acquire() as producer:
                for _ in range(min(WAKE_MAX, -(-stuck // sweep.batch))):
                    intake.apply_async(([],), queue=CONVERSIONS, producer=producer)
        return {"conversions_waiting": stuck}
