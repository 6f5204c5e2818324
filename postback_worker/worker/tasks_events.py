"""Celery task and beat entry for the operator-event relay (`maintenance` queue)."""

from __future__ import annotations

import logging
import os
import random
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from postback_worker.settings import Settings
from postback_worker.worker.queues import MAINTENANCE

log = logging.getLogger(__name__)

TASK_SEND_EVENTS = "postback_worker.send_operator_events"


class _PerProcess:
    """A sender and a Redis client per worker process (built after fork)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid = -1
        self.sender: Any = None
        self.redis: Any = None

    def get(self) -> _PerProcess:
        if self._pid != os.getpid():
            from postback_worker.delivery.sender import Sender

            self.sender = Sender.from_settings(self.settings.delivery, concurrency=32)
            self.redis = self.settings.redis.client()
            self._pid = os.getpid()
        return self


def register(app: Celery) -> None:
    """Register this module's tasks on `app`."""
    services = app.postback_services  # type: ignore[attr-defined]
    parts = _PerProcess(services.settings)

    # Every few seconds: no task events, so Flower's task list keeps to real work.
    @app.task(name=TASK_SEND_EVENTS, bind=True, acks_late=False, ignore_result=True,
              send_events=False)
    def send_operator_events(self: Task) -> dict[str, Any]:
        from postback_worker.ops.visibility.operator_events import Relay

        p = parts.get()
        try:
            relay = Relay(services.settings, services.pipeline.store, p.sender, p.redis,
                          clock=lambda: datetime.now(UTC), rand=random.random)
            return relay.run().as_dict()
        except OperationalError as exc:
            # Nothing is lost: events wait in PostgreSQL (or Redis) for the next run.
            log.warning("operator events not sent, database unavailable: %s", exc)
            return {"skipped": str(exc)}


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat entries (name -> entry) for this module's periodic tasks."""
    return {
        "send-operator-events": {
            "task": TASK_SEND_EVENTS,
            "schedule": settings.events.interval,
            "options": {"queue": MAINTENANCE, "expires": max(5.0, settings.events.interval * 5)},
        },
    }
