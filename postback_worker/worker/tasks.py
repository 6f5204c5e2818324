"""Thin Celery tasks: deserialize, call the pipeline, handle infrastructure retries."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import DBAPIError, OperationalError

from postback_worker.worker.queues import (
    CONVERSIONS,
    RETRIES,
    TASK_DELIVER,
    TASK_INTAKE,
    TASK_PROCESS,
    TASK_REQUEUE_STUCK,
    TASK_SWEEP,
)

log = logging.getLogger(__name__)

DELIVER_CHUNK = 100
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

    @app.task(name=TASK_INTAKE, bind=True, **DB_RETRY)
    def intake(self: Task, conversion_ids: list[str]) -> dict[str, Any]:
        # Events already committed to the journal by the API or the producer.
        return services.pipeline.reprocess(conversion_ids, None).as_dict()

    @app.task(name=TASK_DELIVER, bind=True, **DB_RETRY)
    def deliver_postbacks(self: Task, postback_ids: list[str],
                          triggered_by: str | None = None) -> dict[str, Any]:
        return services.pipeline.deliver(postback_ids, triggered_by).as_dict()

    @app.task(name=TASK_SWEEP, bind=True, acks_late=False)
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

    @app.task(name=TASK_REQUEUE_STUCK, bind=True, acks_late=False)
    def requeue_stuck_conversions(self: Task) -> dict[str, int]:
        stuck = services.pipeline.stuck_conversions()
        if stuck:
            log.warning("re-enqueueing %d conversions stuck in 'received'", len(stuck))
            process_conversions.apply_async((stuck,), queue=CONVERSIONS)
        return {"conversions_requeued": len(stuck)}
