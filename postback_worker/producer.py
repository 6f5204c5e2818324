"""Producer library for backend services: validate conversions and enqueue them to Redis.

    from postback_worker.producer import Producer
    producer = Producer.from_env()
    ids = producer.send_conversions([{"transaction_id": "tx_...", "payout": "12.50"}])

`send_conversions` returns once every event is in the Redis queue; it never waits for partners.
Pass your own `id` per event to make retries of the same call idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from postback_worker import tracing
from postback_worker.domain.events import (
    ConversionEvent,
    FieldError,
    ValidationError,
    parse_conversion,
)
from postback_worker.errors import Unavailable
from postback_worker.settings import Settings
from postback_worker.worker.queues import CONVERSIONS, TASK_PROCESS


class EnqueueError(Unavailable):
    """The broker did not accept (all of) the events; `queued_ids` lists those it did take."""

    def __init__(self, message: str, queued_ids: list[str]) -> None:
        super().__init__(message)
        self.queued_ids = queued_ids


class Producer:
    """Publishes conversion batches to the `conversions` queue."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] | None = None):
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))
        tracing.configure("postback-worker-producer")
        self._celery = Celery("postback_worker_producer",
                              broker=settings.redis.effective_broker_url)
        self._celery.conf.update(
            task_serializer="json",
            broker_transport_options=settings.redis.broker_transport_options(),
            broker_connection_retry_on_startup=True,
        )

    @classmethod
    def from_env(cls) -> Producer:
        return cls(Settings.from_env())

    def validate(self, events: Iterable[Mapping[str, Any]], *,
                 allow_unknown: bool = False) -> list[ConversionEvent]:
        """Parse every event; raise one ValidationError naming all bad fields of all events."""
        now = self.clock()
        items = list(events)
        errors: list[FieldError] = []
        if not items:
            raise ValidationError([FieldError("events", "must contain at least one event")])
        if len(items) > self.settings.ingest.max_batch_size:
            raise ValidationError([FieldError(
                "events", f"at most {self.settings.ingest.max_batch_size} events per request"
            )])
        parsed: list[ConversionEvent] = []
        for i, item in enumerate(items):
            prefix = f"events[{i}]." if len(items) > 1 else ""
            if not isinstance(item, Mapping):
                errors.append(FieldError(prefix.rstrip(".") or "events", "must be an object"))
                continue
            try:
                parsed.append(parse_conversion(
                    item, now=now, max_field_length=self.settings.ingest.max_field_length,
                    allow_unknown=allow_unknown, prefix=prefix,
                ))
            except ValidationError as exc:
                errors.extend(exc.errors)
        if errors:
            raise ValidationError(errors)
        return tracing.stamp(parsed)  # each event joins the caller's trace (tracing on)

    def enqueue(self, events: Sequence[ConversionEvent]) -> list[str]:
        """Publish validated events in chunks; returns their ids."""
        size = self.settings.ingest.enqueue_chunk_size
        queued: list[str] = []
        try:
            for i in range(0, len(events), size):
                chunk = [e.to_message() for e in events[i : i + size]]
                self._celery.send_task(
                    TASK_PROCESS, args=(chunk,), queue=CONVERSIONS, headers=tracing.headers(),
                    retry=True, retry_policy={"max_retries": 3, "interval_start": 0.1,
                                              "interval_step": 0.2, "interval_max": 1.0},
                )
                queued.extend(e.id for e in events[i : i + size])
        except (KombuOperationalError, OSError) as exc:
            raise EnqueueError(f"could not enqueue to the broker: {exc}", queued) from exc
        return [e.id for e in events]

    def send_conversions(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Validate and enqueue; returns the accepted conversion ids."""
        with tracing.span("postback_worker.send_conversions", kind="producer"):
            return self.enqueue(self.validate(events))

    def close(self) -> None:
        self._celery.close()
