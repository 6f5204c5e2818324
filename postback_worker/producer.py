"""Producer library for backend services: validate conversions and store them durably.

    from postback_worker.producer import Producer
    producer = Producer.from_env()          # needs DATABASE_URL and REDIS_URL
    ids = producer.send_conversions([{"transaction_id": "tx_...", "payout": "12.50"}])

`send_conversions` returns once every event is committed in the database (the intake journal,
store/journal.py: one INSERT on a connection kept open); a worker is then woken through Redis
from a background thread, so the caller does not wait for Redis. Redis is never the only copy:
if the wake-up is lost, beat's sweep finds the events. Call `close()` when done (it sends the
last wake-up). It never waits for partners. Pass your own `id`
per event to make retries of the same call idempotent. Calls from many threads share database
commits (group commit), so one-event calls from a busy service stay cheap.

`Producer(settings, durable=False)` publishes whole events to Redis instead (the pre-journal
behaviour): the caller does not wait for a commit (no measurable gain for one-event calls, see
README), but events still in Redis are lost if Redis loses data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from postback_worker import tracing
from postback_worker.domain.events import (
    ConversionEvent,
    FieldError,
    ValidationError,
    parse_conversion,
)
from postback_worker.errors import Unavailable
from postback_worker.settings import Settings
from postback_worker.store.journal import Journal
from postback_worker.store.repo import Store
from postback_worker.worker.queues import (
    CONVERSIONS,
    INTAKE_WOKEN_KEY,
    INTAKE_WOKEN_MS,
    TASK_INTAKE,
    TASK_PROCESS,
)

log = logging.getLogger(__name__)
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.2,
                 "interval_max": 1.0}
# After a failed wake-up, skip waking for this many seconds (the events are committed; the
# next wake-up after that, or beat's sweep, takes everything that waits).
BROKER_BACKOFF = 5.0
# A wake-up names at most this many of the events that prompted it (for Flower; the woken
# worker takes whatever waits).
WAKE_IDS = 1000
# Commits within this many seconds of a wake-up share the next one (bounds the Redis round
# trips of a producer committing one event at a time; adds at most this to the latency).
WAKE_COALESCE = 0.02


class EnqueueError(Unavailable):
    """The broker did not accept (all of) the events; `queued_ids` lists those it did take.

    Raised only with durable=False (in the default mode events are in the database first).
    """

    def __init__(self, message: str, queued_ids: list[str]) -> None:
        super().__init__(message)
        self.queued_ids = queued_ids


class _Waiter:
    __slots__ = ("events", "wake", "lead", "done", "error")

    def __init__(self, events: Sequence[ConversionEvent]) -> None:
        self.events = events
        self.wake = threading.Event()
        self.lead = False
        self.done = False
        self.error: BaseException | None = None


class GroupCommit:
    """Concurrent callers share one commit: whoever finds no commit running commits what
    every waiting caller brought (up to `max_events`), then hands over to the next waiter.

    A lone caller commits at once (no timer); under load, callers that arrive while a commit
    is running share the next one.
    """

    def __init__(self, commit: Callable[[list[ConversionEvent]], None],
                 after: Callable[[list[ConversionEvent]], None], max_events: int) -> None:
        self.commit = commit
        self.after = after
        self.max_events = max(1, max_events)
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._busy = False

    def submit(self, events: Sequence[ConversionEvent]) -> None:
        """Return once `events` are committed; raise what the commit raised."""
        with self._lock:
            me = _Waiter(events) if self._busy else None
            if me is None:  # no commit runs, so nobody waits: commit ours now
                self._busy = True
            else:
                self._queue.append(me)
        if me is None:
            error = self._commit_group([], list(events))
            if error is not None:
                raise error
            return
        while not me.done:
            if me.lead:
                self._lead()
            else:
                me.wake.wait()
                me.wake.clear()
        if me.error is not None:
            raise me.error

    def _lead(self) -> None:
        with self._lock:
            batch: list[_Waiter] = []
            size = 0
            while self._queue and (not batch or
                                   size + len(self._queue[0].events) <= self.max_events):
                w = self._queue.pop(0)
                batch.append(w)
                size += len(w.events)
        self._commit_group(batch, [e for w in batch for e in w.events])

    def _commit_group(self, batch: list[_Waiter],
                      events: list[ConversionEvent]) -> BaseException | None:
        """Commit `events` (those of `batch`), hand the lead over, tell `batch` the outcome."""
        error: BaseException | None = None
        try:
            self.commit(events)
        except BaseException as exc:  # every caller in the group must hear about it
            error = exc
        with self._lock:  # the next group commits while this one runs `after`
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].wake.set()
            else:
                self._busy = False
        for w in batch:
            w.error, w.done, w.lead = error, True, False
            w.wake.set()
        if error is None:
            try:
                self.after(events)
            except Exception:  # the events are committed; beat's sweep finds them
                log.exception("after-commit step failed")
        return error


class _Waker:
    """A thread that sends the wake-ups: callers hand over the ids they committed and return;
    ids handed over while a wake-up is being sent, or in the `coalesce` seconds after it, share
    the next one (a caller committing one event after the other then costs a Redis round trip
    and a thread switch per few calls, not per call)."""

    def __init__(self, send: Callable[[list[str]], None], coalesce: float = WAKE_COALESCE,
                 pause: Callable[[float], None] = time.sleep) -> None:
        self.send = send
        self.coalesce = coalesce
        self.pause = pause
        self._ids: list[str] = []
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def wake(self, ids: list[str]) -> None:
        with self._cond:
            self._ids.extend(ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pbw-producer-waker",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ids and not self._closed:
                    self._cond.wait()
                if not self._ids:
                    return
                ids, self._ids = self._ids, []
                self._busy = True
            try:
                self.send(ids)
            except Exception:  # the events are committed; beat's sweep finds them
                log.exception("wake-up failed")
            if self.coalesce > 0 and not self._closed:
                self.pause(self.coalesce)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every handed-over wake-up was sent (or `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._ids or self._busy) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)


class Producer:
    """Stores conversion events durably and wakes the workers."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] | None = None,
                 store: Store | None = None, durable: bool = True):
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))
        self.durable = durable
        tracing.configure("postback-worker-producer")
        self._celery = Celery("postback_worker_producer",
                              broker=settings.redis.effective_broker_url)
        self._celery.conf.update(
            task_serializer="json",
            broker_transport_options=settings.redis.broker_transport_options(),
            broker_connection_retry_on_startup=True,
        )
        self._own_store = durable and store is None
        self.journal: Journal | None = None
        if durable:
            self.journal = Journal(store or Store.from_url(settings.database.url))
        self._group = GroupCommit(self._commit, self.wake,
                                  max_events=settings.ingest.enqueue_chunk_size)
        self._broker_down_until = 0.0
        self._redis = settings.redis.client(timeout=2.0)
        self._waker = _Waker(self._send_wake)

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
                # Each event of a call is received 1 us after the one before it: workers take
                # waiting events by time received, so one call's events keep their order.
                parsed.append(parse_conversion(
                    item, now=now + timedelta(microseconds=i),
                    max_field_length=self.settings.ingest.max_field_length,
                    allow_unknown=allow_unknown, prefix=prefix,
                ))
            except ValidationError as exc:
                errors.extend(exc.errors)
        if errors:
            raise ValidationError(errors)
        return tracing.stamp(parsed)  # each event joins the caller's trace (tracing on)

    def enqueue(self, events: Sequence[ConversionEvent]) -> list[str]:
        """Commit validated events to the journal (shared with concurrent callers), then wake
        a worker; returns their ids. Raises Unavailable when the database cannot commit them.
        """
        if not self.durable:
            return self.publish_events(events)
        if events:
            self._group.submit(events)
        return [e.id for e in events]

    def _commit(self, events: list[ConversionEvent]) -> None:
        assert self.journal is not None
        self.journal.record(events)

    def wake(self, events: Sequence[ConversionEvent]) -> None:
        """Have a worker woken for these committed events, from the waker thread: the caller
        does not wait for Redis (best effort: beat's sweep finds them if the wake-up is lost)."""
        self._waker.wake([e.id for e in events])

    def _send_wake(self, ids: list[str]) -> None:
        """One wake-up, unless one already waits in the queue (it will take these events too)."""
        if time.monotonic() < self._broker_down_until:
            return  # Redis failed moments ago: do not retry it on every commit
        try:
            if not self._redis.set(INTAKE_WOKEN_KEY, "1", nx=True, px=INTAKE_WOKEN_MS):
                return
            self._celery.send_task(TASK_INTAKE, args=(ids[:WAKE_IDS],), queue=CONVERSIONS,
                                   retry=True, retry_policy=_RETRY_POLICY)
        except (KombuOperationalError, RedisError, OSError) as exc:
            self._broker_down_until = time.monotonic() + BROKER_BACKOFF
            log.warning("%d events are stored but no worker was woken (%s); the next "
                        "wake-up or beat's sweep hands them to a worker", len(ids), exc)

    def publish_events(self, events: Sequence[ConversionEvent]) -> list[str]:
        """durable=False: publish whole events to Redis in chunks (Redis holds the only copy
        until a worker stores them)."""
        size = self.settings.ingest.enqueue_chunk_size
        queued: list[str] = []
        try:
            for i in range(0, len(events), size):
                chunk = [e.to_message() for e in events[i : i + size]]
                self._celery.send_task(TASK_PROCESS, args=(chunk,), queue=CONVERSIONS,
                                       headers=tracing.headers(),
                                       retry=True, retry_policy=_RETRY_POLICY)
                queued.extend(e.id for e in events[i : i + size])
        except (KombuOperationalError, OSError) as exc:
            raise EnqueueError(f"could not enqueue to the broker: {exc}", queued) from exc
        return [e.id for e in events]

    def send_conversions(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Validate and store; returns the accepted conversion ids once they are committed."""
        with tracing.span("postback_worker.send_conversions", kind="producer"):
            return self.enqueue(self.validate(events))

    def flush(self) -> None:
        """Wait until the wake-ups of the events sent so far went to Redis."""
        self._waker.flush()

    def close(self) -> None:
        self._waker.close()
        self._celery.close()
        self._redis.close()
        if self.journal is not None:
            self.journal.close()
            if self._own_store:
                self.journal.store.dispose()
