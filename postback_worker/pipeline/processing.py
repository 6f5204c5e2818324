"""The worker's logic, as the Celery tasks call it: intake, then dispatch.

- `pipeline/intake.py`     persist, attribute, build postbacks
- `pipeline/dispatch.py`   claim, admit, fire, record
- `pipeline/admission.py`  pause, breaker, rate and concurrency limits behind one interface

Celery tasks are thin shells over `Pipeline`; everything here runs (and is tested) without Celery.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from postback_worker.delivery.sender import Sender
from postback_worker.domain.attribution import ConversionState
from postback_worker.pipeline.admission import Admission, Guarded, PausesOnly
from postback_worker.pipeline.catalog import Catalog
from postback_worker.pipeline.dispatch import WAITING, BatchResult, Dispatch
from postback_worker.pipeline.intake import Intake, conversion_message
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

__all__ = ["WAITING", "BatchResult", "Drain", "Pipeline", "utcnow"]

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Drain:
    """How a woken worker keeps taking events while they arrive (Pipeline.intake_pending).

    `hold` tells producers that a worker is taking events (they send no wake-ups meanwhile);
    `release` lifts that. `pause` and `monotonic` are injectable for tests.
    """

    linger: float  # seconds between the starts of two short batches
    budget: float  # seconds of taking before handing over to a fresh wake-up
    hold: Callable[[], None]
    release: Callable[[], None]
    pause: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic


class Pipeline:
    """Intake and dispatch for one process (one catalog, one sender, one admission)."""

    def __init__(self, settings: Settings, store: Store, sender: Sender, *,
                 clock: Clock = utcnow, rand: Callable[[], float] = random.random,
                 worker_name: str | None = None, redis: Any | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        catalog = Catalog(store, settings.delivery.config_cache_seconds)
        # Without Redis (unit tests, tools) pauses still hold; breaker and limits are off.
        admission: Admission = (Guarded(settings, store, redis) if redis is not None
                                else PausesOnly(settings, store))
        self.catalog = catalog
        self.intake = Intake(store, catalog, clock)
        self.dispatch = Dispatch(settings, store, sender, catalog, admission, clock=clock,
                                 rand=rand,
                                 worker_name=worker_name or f"{socket.gethostname()}:{os.getpid()}")

    def process_conversions(self, messages: Sequence[Mapping[str, Any]],
                            triggered_by: str | None = None) -> BatchResult:
        """Persist, attribute and fire a batch; safe to run again on the same messages.

        `triggered_by` is recorded on the postbacks created (e.g. a re-attribution run).
        """
        result = BatchResult()
        persisted = self.intake.persist(messages, triggered_by)
        if not persisted.conversion_ids:
            return result
        result.conversions.update(persisted.states)
        # Fire what is claimable for every conversion in the batch, including postbacks a
        # previous, interrupted delivery of this message created but never fired.
        self.dispatch.fire(self.dispatch.claim(conversion_ids=persisted.conversion_ids), result)
        return result

    def intake_pending(self, limit: int, max_rounds: int,
                       on_backlog: Callable[[], None] | None = None,
                       drain: Drain | None = None) -> BatchResult:
        """Take accepted events waiting in the journal in batches of `limit` (whatever
        message woke us), oldest first, attribute them and fire.

        `on_backlog` is called when a batch comes back full (e.g. to wake another worker).
        Without `drain`, stop when a batch comes back short. With it, keep taking while
        events arrive, a short batch at most every `drain.linger` seconds (so one-event
        producers still make batches), and stop when, after `drain.release`, a take finds
        nothing. Also stop after `max_rounds` full batches or `drain.budget` seconds; then
        `handed_over` is set: the caller hands the rest over to a new wake-up.
        """
        result = BatchResult()
        stuck_after = timedelta(seconds=self.settings.sweep.stuck_conversion_after)
        started = drain.monotonic() if drain else 0.0
        full = 0
        released = False
        while True:
            round_started = drain.monotonic() if drain else 0.0
            if drain and not released:
                drain.hold()
            taken = self.intake.take_pending(limit, self.clock() - stuck_after)
            n = len(taken.conversion_ids)
            if n == limit:
                full += 1
                if on_backlog is not None:
                    on_backlog()
            for state, count in taken.states.items():
                result.count(result.conversions, state, count)
            if n:
                self.dispatch.fire(self.dispatch.claim(conversion_ids=taken.conversion_ids),
                                   result)
            if drain is None:
                if n < limit or full >= max_rounds:
                    return result
                continue
            if not n:
                if released:
                    return result  # nothing came after the release: all taken
                # A commit after this wakes a worker again; one more look for anything
                # committed while producers still saw the hold.
                drain.release()
                released = True
                continue
            released = False
            if full >= max_rounds or drain.monotonic() - started >= drain.budget:
                result.handed_over = True
                return result
            if n < limit:
                left = drain.linger - (drain.monotonic() - round_started)
                if left > 0:
                    drain.pause(left)

    def deliver(self, postback_ids: Sequence[str], triggered_by: str | None = None) -> BatchResult:
        """Claim and fire the given postbacks (retries, replays); already final ones are left."""
        result = BatchResult()
        self.dispatch.fire(self.dispatch.claim(ids=postback_ids), result)
        return result

    def sweep(self) -> list[str]:
        """Postbacks due for another attempt (or stuck), marked queued; the caller enqueues them."""
        return self.dispatch.sweep()

    def reprocess(self, conversion_ids: Sequence[str], triggered_by: str | None) -> BatchResult:
        """Process stored conversions handed back to `received` (re-attribution) again."""
        rows = self.store.get_conversions(conversion_ids)
        msgs = [conversion_message(rows[i]) for i in conversion_ids
                if i in rows and rows[i]["state"] == ConversionState.RECEIVED]
        return self.process_conversions(msgs, triggered_by)
