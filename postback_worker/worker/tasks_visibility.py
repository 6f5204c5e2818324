"""Celery tasks and beat entries for alert evaluation and rollup compaction (`maintenance`)."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from postback_worker.settings import RedisSettings, Settings
from postback_worker.worker.queues import MAINTENANCE

log = logging.getLogger(__name__)

TASK_EVALUATE_ALERTS = "postback_worker.evaluate_alerts"
TASK_COMPACT_ROLLUPS = "postback_worker.compact_rollups"


class _RedisPerProcess:
    """One Redis client per worker process (built after fork)."""

    def __init__(self, redis: RedisSettings) -> None:
        self.redis = redis
        self._pid = -1
        self._client: Any = None

    def get(self) -> Any:
        if self._pid != os.getpid():
            self._client = self.redis.client()
            self._pid = os.getpid()
        return self._client


def register(app: Celery) -> None:
    """Register this module's tasks on `app`."""
    services = app.postback_services  # type: ignore[attr-defined]
    redis_client = _RedisPerProcess(services.settings.redis)

    @app.task(name=TASK_EVALUATE_ALERTS, bind=True, acks_late=False, ignore_result=True)
    def evaluate_alerts(self: Task) -> dict[str, Any]:
        from postback_worker.ops.visibility.alerts import evaluate

        try:
            events = evaluate(services.settings, services.pipeline.store, redis_client.get(),
                              now=datetime.now(UTC))
        except OperationalError as exc:
            # The next beat run evaluates again; nothing was recorded half-way (one txn).
            log.warning("alert evaluation skipped, database unavailable: %s", exc)
            return {"skipped": str(exc)}
        return {"fired": sum(e.action == "fire" for e in events),
                "resolved": sum(e.action == "resolve" for e in events)}


    # Every few seconds: no task events, so Flower's task list keeps to real work.
    @app.task(name=TASK_COMPACT_ROLLUPS, bind=True, acks_late=False, ignore_result=True,
              send_events=False)
    def compact_rollups(self: Task) -> dict[str, Any]:
        from postback_worker.store.rollups import compact_all

        try:
            return {"folded": compact_all(services.pipeline.store)}
        except OperationalError as exc:
            log.warning("rollup compaction skipped, database unavailable: %s", exc)
            return {"skipped": str(exc)}


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat entries (name -> entry) for this module's periodic tasks."""
    return {
        "evaluate-alerts": {
            "task": TASK_EVALUATE_ALERTS,
            "schedule": settings.alerts.interval,
            # A late message is useless: the next run looks at fresher figures.
            "options": {"queue": MAINTENANCE, "expires": max(5.0, settings.alerts.interval)},
        },
        "compact-rollups": {
            "task": TASK_COMPACT_ROLLUPS,
            "schedule": settings.metrics.compact_interval,
            "options": {"queue": MAINTENANCE,
                        "expires": max(5.0, settings.metrics.compact_interval)},
        },
    }
