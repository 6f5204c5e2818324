"""Celery tasks and beat entries for data retention purges."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from postback_worker.settings import Settings
from postback_worker.worker.queues import MAINTENANCE

log = logging.getLogger(__name__)

TASK_PURGE = "postback_worker.purge_expired_data"


def register(app: Celery) -> None:
    """Register this module's tasks on `app`."""
    services = app.postback_services  # type: ignore[attr-defined]

    @app.task(name=TASK_PURGE, bind=True, acks_late=False, ignore_result=True)
    def purge_expired_data(self: Task) -> dict[str, Any]:
        from postback_worker.ops.oncall.retention import Purger

        pipeline = services.pipeline
        try:
            return Purger(services.settings, pipeline.store).run().as_dict()
        except OperationalError as exc:
            # The next beat run starts over; nothing half-done is left (one batch = one txn).
            log.warning("retention purge skipped, database unavailable: %s", exc)
            return {"skipped": str(exc)}


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat entries (name -> entry) for this module's periodic tasks."""
    return {
        "purge-expired-data": {
            "task": TASK_PURGE,
            "schedule": settings.retention.interval,
            "options": {"queue": MAINTENANCE, "expires": settings.retention.interval},
        },
    }
