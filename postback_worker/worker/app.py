"""Celery application factory, queues and beat schedule.

Run with the standard commands, e.g.::

    celery -A postback_worker.worker.app worker -Q conversions,retries,replay,maintenance
    celery -A postback_worker.worker.app beat
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from postback_worker.settings import Settings, SettingsError
from postback_worker.worker.queues import (
    CONVERSIONS,
    MAINTENANCE,
    QUEUES,
    RETRIES,
    TASK_DELIVER,
    TASK_PROCESS,
    TASK_REQUEUE_STUCK,
    TASK_SWEEP,
)

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    from postback_worker.worker import (
        tasks_events,
        tasks_oncall,
        tasks_retention,
        tasks_visibility,
    )

    extra_beat: dict[str, dict[str, Any]] = {}
    for module in (tasks_oncall, tasks_visibility, tasks_retention, tasks_events):
        extra_beat.update(module.beat_schedule(settings))
    return {
        "broker_url": settings.redis.effective_broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            **settings.redis.broker_transport_options(),
            # Look for messages of dead workers every few seconds (each look is one ZRANGE).
            "unacked_restore_interval": max(1, min(10, settings.redis.visibility_timeout // 2)),
            "unacked_restore_throttle": 1,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        # A message is acknowledged only after its batch is saved; a worker killed mid-batch
        # leaves it unacknowledged and Redis hands it out again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": CONVERSIONS,
        # One direct exchange per queue, so a message can only ever land in its own queue.
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        "task_routes": {
            TASK_PROCESS: {"queue": CONVERSIONS},
            TASK_DELIVER: {"queue": RETRIES},
            TASK_SWEEP: {"queue": MAINTENANCE},
            TASK_REQUEUE_STUCK: {"queue": MAINTENANCE},
        },
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": {
            "sweep-due-postbacks": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep.interval,
                "options": {"queue": MAINTENANCE, "expires": max(5.0, settings.sweep.interval * 5)},
            },
            "requeue-stuck-conversions": {
                "task": TASK_REQUEUE_STUCK,
                "schedule": max(30.0, settings.sweep.stuck_conversion_after / 2),
                "options": {"queue": MAINTENANCE},
            },
            **extra_beat,
        },
    }


class Services:
    """Per-process resources (database engine, HTTP pools), built lazily after fork."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid = -1
        self._lock = threading.Lock()
        self._pipeline: Any = None
        self._redis: Any = None

    @property
    def pipeline(self) -> Any:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._pipeline = build_pipeline(self.settings)
                    self._redis = self.settings.redis.client()
                    self._pid = os.getpid()
        return self._pipeline

    @property
    def redis(self) -> Any:
        """This process's Redis client (for flags such as the intake wake-up)."""
        _ = self.pipeline
        return self._redis


def build_pipeline(settings: Settings) -> Any:
    from postback_worker.delivery.sender import Sender
    from postback_worker.pipeline.processing import Pipeline
    from postback_worker.store.repo import Store

    store = Store.from_url(settings.database.url)
    sender = Sender.from_settings(settings.delivery)
    # Redis carries the per-partner circuit breaker, rate limits and concurrency caps.
    return Pipeline(settings, store, sender, redis=settings.redis.client())


@signals.beat_init.connect
def quiet_beat(sender: Any = None, **_: Any) -> None:
    """Beat publishes only periodic maintenance tasks: no task-sent events for them, so
    Flower's task list keeps to real work (tasks a worker or the API publishes still send
    theirs; maintenance tasks that run every few seconds send no worker events either)."""
    if sender is not None:
        sender.app.conf.task_send_sent_event = False


def check_settings(settings: Settings) -> None:
    """Refuse settings a worker cannot work with (raises SettingsError with what to change).

    Partners' timeouts count too; if PostgreSQL cannot be read yet, only the default does.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from postback_worker.pipeline.leases import lease_problem
    from postback_worker.store.repo import Store

    store = Store.from_url(settings.database.url)
    try:
        timeouts = {p["id"]: float(p["timeout"]) for p in store.list_partners() if p["enabled"]}
    except SQLAlchemyError as exc:
        log.warning("could not read partner timeouts to check the lease (%s)", exc)
        timeouts = {}
    finally:
        store.dispose()
    problem = lease_problem(settings, timeouts)
    if problem:
        raise SettingsError(problem)
    settings.events.check()


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app with the postback tasks registered; `settings` default to the environment."""
    settings = settings or Settings.from_env()
    app = Celery("postback_worker")

    @signals.worker_init.connect(weak=False)
    def refuse_bad_settings(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        try:
            check_settings(settings)
        except SettingsError as exc:
            # SystemExit, not an Exception: Celery would log an Exception and start anyway.
            log.critical("worker not started: %s", exc)
            raise SystemExit(f"worker not started: {exc}") from None

    app.conf.update(celery_config(settings))
    app.postback_settings = settings  # type: ignore[attr-defined]
    app.postback_services = Services(settings)  # type: ignore[attr-defined]
    from postback_worker.worker import (
        tasks,
        tasks_events,
        tasks_oncall,
        tasks_retention,
        tasks_visibility,
    )

    for module in (tasks, tasks_oncall, tasks_visibility, tasks_retention, tasks_events):
        module.register(app)
    return app


app = create_app()
