"""Dispatch: claim postbacks, admit them, fire them, record every answer and settle it.

Claim takes postbacks under a lease (state `in_flight` + token). Admission puts some back to
wait (pause, circuit, limits) without spending an attempt. The rest are signed and fired
concurrently; each answer is settled by `domain.postback.settle` and saved in small groups as
answers arrive, so a worker killed mid-batch leaves only what was truly in flight unrecorded.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from postback_worker import tracing
from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.domain.failures import FailureClass
from postback_worker.domain.masking import mask_url
from postback_worker.domain.postback import WAITING_PREFIX, PostbackState, Settlement, settle
from postback_worker.domain.retry import Outcome, RetryPolicy
from postback_worker.pipeline.admission import Admission
from postback_worker.pipeline.catalog import Catalog, Partner
from postback_worker.pipeline.leases import LeaseKeeper
from postback_worker.pipeline.lifecycle import Lifecycle
from postback_worker.settings import Settings
from postback_worker.store.postbacks import Claimed, dead_letter_row, release_row, update_row
from postback_worker.store.repo import Store

log = logging.getLogger(__name__)

S = PostbackState
# BatchResult key for postbacks put back to wait (paused, circuit open, over a limit).
WAITING = "waiting"


@dataclass
class BatchResult:
    """What one call did, for logs, tests and the task's return value."""

    conversions: dict[str, int] = field(default_factory=dict)
    postbacks: dict[str, int] = field(default_factory=dict)
    # Intake stopped with events perhaps still waiting: the caller wakes a worker for them.
    handed_over: bool = False

    def count(self, bucket: dict[str, int], key: str, n: int = 1) -> None:
        bucket[key] = bucket.get(key, 0) + n

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"conversions": self.conversions, "postbacks": self.postbacks}


@dataclass
class _Unsaved:
    """Answers and hand-backs not yet saved."""

    updates: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)
    dead_conversions: dict[str, str] = field(default_factory=dict)  # postback -> conversion
    released: list[dict[str, Any]] = field(default_factory=list)
    # Partners that answered 410 Gone -> why they are paused.
    gone: dict[str, str] = field(default_factory=dict)
    first_at: float | None = None  # monotonic time of the oldest unsaved answer
    observed: int = 0  # answers not yet reported to admission
    traced: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)  # tracing on

    def answer(self) -> None:
        self.observed += 1
        if self.first_at is None:
            self.first_at = time.monotonic()

    def due(self, batch: int, wait_ms: float) -> bool:
        """Save now: `batch` answers waiting, or the oldest has waited `wait_ms`."""
        if len(self.updates) >= batch:
            return True
        return self.first_at is not None and (time.monotonic() - self.first_at) * 1000 >= wait_ms

    def saved(self) -> None:
        self.updates, self.attempts, self.dead, self.dead_conversions = [], [], [], {}
        self.first_at = None
        self.traced = []


class Dispatch:
    """Claim, admit, fire and record, for one process."""

    def __init__(self, settings: Settings, store: Store, sender: Sender, catalog: Catalog,
                 admission: Admission, *, clock: Callable[[], datetime],
                 rand: Callable[[], float], worker_name: str) -> None:
        self.settings = settings
        self.store = store
        self.sender = sender
        self.catalog = catalog
        self.admission = admission
        self.clock = clock
        self.rand = rand
        self.worker_name = worker_name
        self.lifecycle = Lifecycle(catalog, settings.delivery.order_recheck)
        # Partner id -> (the partner, its retry policy): built once per catalog version of
        # the partner, not once per answer.
        self._policies: dict[str, tuple[Partner, RetryPolicy]] = {}

    def claim(self, *, ids: Sequence[str] = (),
              conversion_ids: Sequence[str] = ()) -> list[Claimed]:
        now = self.clock()
        return self.store.claim(
            now=now, lease_until=now + timedelta(seconds=self.settings.delivery.lease_seconds),
            token=secrets.token_hex(8), ids=ids, conversion_ids=conversion_ids,
        )

    def fire(self, claimed: list[Claimed], result: BatchResult) -> None:
        """Fire claimed postbacks concurrently; save answers in small groups as they arrive
        (see `_Unsaved.due`), keeping the leases of those not saved yet alive meanwhile."""
        if not claimed:
            return
        unsaved = _Unsaved()
        sendable, probes = self._admit(claimed, unsaved, result)
        if unsaved.updates or unsaved.released:  # skipped or waiting: save before firing
            self._flush(unsaved)
        now = self.clock()
        requests = [
            PostbackRequest(postback_id=c.id, url=c.url, method=c.method, timeout=p.timeout,
                            headers=p.headers, body=c.body, content_type=p.content_type,
                            signing=p.signing, signed_at=now, proxy=p.egress_proxy)
            for c, p in sendable
        ]
        delivery = self.settings.delivery
        started = self.clock()
        keeper = LeaseKeeper(self.store, claimed[0].token, [c.id for c, _ in sendable],
                             delivery.lease_seconds, self.clock)

        def handle(index: int, outcome: Outcome) -> None:
            c, p = sendable[index]
            state = self._record(unsaved, c, p, outcome, started, c.id in probes)
            result.count(result.postbacks, state)

        with keeper:
            answers = self.sender.send_iter(requests)
            ready: Callable[[], int] = getattr(answers, "ready", lambda: 0)
            for index, outcome in answers:
                handle(index, outcome)
                if unsaved.due(delivery.record_batch, delivery.record_wait_ms):
                    # Answers that have already come join this save: when saving is slower
                    # than answers arrive, saves get fewer and larger, and no answer waits
                    # for a later one.
                    for _ in range(ready()):
                        handle(*next(answers))
                    with keeper.lock:
                        keeper.saved(self._flush(unsaved))
                keeper.tick()
            with keeper.lock:
                self._flush(unsaved, last=True)

    def _admit(self, claimed: list[Claimed], unsaved: _Unsaved,
               result: BatchResult) -> tuple[list[tuple[Claimed, Partner]], set[str]]:
        """The claimed postbacks that fire now (with their partner), and the circuit probes;
        the others are skipped (partner gone or disabled) or put back to wait (behind an
        earlier event of the same conversion and partner, paused, circuit open, limits)."""
        now = self.clock()
        behind: dict[str, tuple[datetime | None, str]] = {}
        later = [c.id for c in claimed if c.event_seq > 1]  # a first event waits for none
        if later:
            with self.store.transaction() as conn:
                behind = self.lifecycle.order(conn, later, now)
        groups: dict[str, tuple[Partner, list[Claimed]]] = {}
        for c in claimed:
            if c.id in behind:
                until, why = behind[c.id]
                unsaved.released.append(release_row(c, until, why.removeprefix(WAITING_PREFIX),
                                                    now))
                result.count(result.postbacks, WAITING)
                continue
            p = self.catalog.partner(c.partner_id)
            if p is None or not p.enabled:
                why = "partner deleted" if p is None else "partner disabled"
                unsaved.updates.append(update_row(c, S.SKIPPED, why, now))
                result.count(result.postbacks, S.SKIPPED)
            else:
                groups.setdefault(p.id, (p, []))[1].append(c)
        sendable: list[tuple[Claimed, Partner]] = []
        probes: set[str] = set()
        for partner, group in groups.values():
            admitted = self.admission.admit(partner, group, now)
            unsaved.released.extend(release_row(c, at, why, now) for c, at, why in admitted.wait)
            if admitted.wait:
                result.count(result.postbacks, WAITING, len(admitted.wait))
            if admitted.probe is not None:
                probes.add(admitted.probe)
            sendable.extend((c, partner) for c in admitted.fire)
        return sendable, probes

    def _record(self, unsaved: _Unsaved, c: Claimed, partner: Partner, outcome: Outcome,
                started: datetime, probe: bool) -> PostbackState:
        now = self.clock()
        attempt_no = c.attempts + 1
        settled = settle(
            outcome, policy=self._policy(partner), attempt_no=attempt_no,
            round_start=c.round_start_attempts,
            first_attempt_at=c.first_attempt_at or started, now=now, rand=self.rand(),
            probe=probe, probe_wait=self.settings.breaker.cooldown,
            success_check=partner.success_check,
        )
        self.admission.observe(partner, c.id, settled.failure, settled.retry_after, probe, now)
        unsaved.attempts.append(_attempt_row(c, attempt_no, started, outcome, settled,
                                             self.worker_name))
        if settled.failure == FailureClass.GONE:
            unsaved.gone.setdefault(partner.id, (
                f"HTTP 410 Gone for postback {c.id} at {now:%Y-%m-%d %H:%M:%S} UTC: the partner "
                "removed its endpoint; fix the postback URL, then resume"))
        if settled.dead_letter:
            unsaved.dead.append(dead_letter_row(
                c.id, c.partner_id, offer_id=None, failure_class=settled.failure,
                last_status=outcome.status_code, reason=settled.reason, attempts=attempt_no,
                now=now))
            unsaved.dead_conversions[c.id] = c.conversion_id
        unsaved.updates.append(update_row(
            c, settled.state, settled.reason, now, next_attempt_at=settled.next_attempt_at,
            last_status=outcome.status_code, last_class=settled.failure))
        if tracing.on():
            unsaved.traced.append(_trace_attempt(c, partner, attempt_no, outcome, settled))
        unsaved.answer()
        return settled.state

    def _policy(self, partner: Partner) -> RetryPolicy:
        """The partner's retry policy (cached while the catalog holds the same partner)."""
        cached = self._policies.get(partner.id)
        if cached is None or cached[0] is not partner:
            cached = self._policies[partner.id] = (partner, partner.policy(self.settings.retry))
        return cached[1]

    def _flush(self, unsaved: _Unsaved, last: bool = False) -> list[str]:
        """Save what is unsaved; returns the ids of the postbacks whose answers were saved."""
        ids = [u["id"] for u in unsaved.updates]
        for partner_id, why in unsaved.gone.items():
            if self.store.pause_gone(partner_id, why, self.clock()):
                log.warning("partner %s paused: %s", partner_id, why)
        unsaved.gone = {}
        if unsaved.updates or unsaved.released:
            if unsaved.dead:
                offers = self.store.conversion_offers(sorted(set(
                    unsaved.dead_conversions.values())))
                for row in unsaved.dead:
                    row["offer_id"] = offers.get(unsaved.dead_conversions[row["postback_id"]])
            # One transaction: answers, dead letters, hand-backs, successors woken.
            with tracing.each("postback.record", unsaved.traced):
                saved = self.store.finish(updates=unsaved.updates, attempts=unsaved.attempts,
                                          dead_letters=unsaved.dead, released=unsaved.released)
            if saved < len(unsaved.updates):
                log.warning("%d postback lease(s) expired before their result was saved",
                            len(unsaved.updates) - saved)
            unsaved.released = []
            unsaved.saved()
        # The breaker hears results about as often as before groups got small.
        if last or unsaved.observed >= self.settings.delivery.concurrency:
            self.admission.report(self.clock())
            unsaved.observed = 0
        return ids

    def sweep(self) -> list[str]:
        """Postbacks due for another attempt (or stuck), marked queued; the caller enqueues them."""
        now = self.clock()
        return self.store.sweep_due(
            now=now,
            stale_pending_before=now - timedelta(seconds=self.settings.delivery.lease_seconds),
            requeue_at=now + timedelta(seconds=self.settings.sweep.requeue_after),
            limit=self.settings.sweep.batch,
        )


def _attempt_row(c: Claimed, attempt_no: int, started: datetime, outcome: Outcome,
                 settled: Settlement, worker: str) -> dict[str, Any]:
    return {
        "postback_id": c.id, "attempt_no": attempt_no, "started_at": started,
        "duration_ms": round(outcome.duration_ms, 3), "url": mask_url(c.url),
        "status_code": outcome.status_code, "failure_class": settled.failure.value,
        "error": settled.error, "response_excerpt": outcome.body_excerpt,
        "worker": worker, "is_test": False,
    }


def _trace_attempt(c: Claimed, partner: Partner, attempt_no: int, outcome: Outcome,
                   settled: Settlement) -> tuple[str | None, dict[str, Any]]:
    """Span the HTTP attempt just answered (timed by the sender) in its conversion's trace;
    returns the parent and attributes of its recording's span."""
    end = time.time_ns()
    attrs: dict[str, Any] = {
        "postback.id": c.id, "postback.conversion.id": c.conversion_id,
        "postback.partner.id": partner.id, "postback.attempt": attempt_no,
        "postback.failure_class": settled.failure.value, "http.request.method": c.method,
        "url.full": mask_url(c.url),
    }
    if outcome.status_code is not None:
        attrs["http.response.status_code"] = outcome.status_code
    failed = settled.failure != FailureClass.DELIVERED
    tracing.finished("postback.attempt", c.trace_context,
                     end - int(outcome.duration_ms * 1_000_000), end, attrs,
                     error=settled.error or settled.failure.value if failed else None)
    return c.trace_context, {"postback.id": c.id, "postback.attempt": attempt_no,
                             "postback.state": settled.state.value}
