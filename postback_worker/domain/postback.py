"""The life of a postback (pure): its states, and what one attempt's outcome settles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from postback_worker.domain.failures import RETRYABLE, FailureClass
from postback_worker.domain.retry import Outcome, RetryPolicy, classify, describe, parse_retry_after


class PostbackState(StrEnum):
    """Where a postback is in its life; the last three are final."""

    PENDING = "pending"  # created, never claimed
    IN_FLIGHT = "in_flight"  # claimed under a lease, being fired
    RETRY_SCHEDULED = "retry_scheduled"  # waits for next_attempt_at (a retry or a guardrail)
    QUEUED = "queued"  # handed to a queue (sweep, replay), due for a claim
    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    SKIPPED = "skipped"  # never fired: partner disabled, status does not fire it


FINAL_STATES: frozenset[PostbackState] = frozenset(
    {PostbackState.DELIVERED, PostbackState.DEAD_LETTERED, PostbackState.SKIPPED}
)
OPEN_STATES: tuple[PostbackState, ...] = tuple(s for s in PostbackState if s not in FINAL_STATES)
# Reason prefix of postbacks waiting on a pause, an open circuit or a partner limit.
WAITING_PREFIX = "waiting: "


@dataclass(frozen=True)
class Settlement:
    """What one attempt settles: the postback's next state and the attempt's record."""

    state: PostbackState
    failure: FailureClass
    reason: str | None
    next_attempt_at: datetime | None
    dead_letter: bool
    # The outcome in words for the attempt record (None when delivered).
    error: str | None
    # Seconds the partner asked us to wait (Retry-After), if it said.
    retry_after: float | None


def settle(
    outcome: Outcome,
    *,
    policy: RetryPolicy,
    attempt_no: int,
    round_start: int = 0,
    first_attempt_at: datetime,
    now: datetime,
    rand: float,
    probe: bool = False,
    probe_wait: float = 0.0,
    success_check: str | None = None,
) -> Settlement:
    """Settle attempt number `attempt_no` (1 for the first) of a postback. The policy counts
    the attempts of the current round: those after `round_start` (a replay starts a round).

    A circuit probe (`probe`) that fails with a retried class while the policy would give up
    only confirms the partner is still down: the postback waits `probe_wait` seconds for the
    circuit instead of being dead-lettered for the outage.
    """
    failure = classify(outcome, success_check)
    retry_after = parse_retry_after(outcome.retry_after, now)
    decision = policy.decide(failure, attempts_made=attempt_no - round_start,
                             first_attempt_at=first_attempt_at, now=now,
                             retry_after=retry_after, rand=rand)
    if decision.action == "delivered":
        return Settlement(PostbackState.DELIVERED, failure, None, None, False, None, retry_after)
    text = describe(outcome, failure)
    if decision.action == "retry":
        assert decision.delay is not None
        return Settlement(PostbackState.RETRY_SCHEDULED, failure, f"{text}; {decision.reason}",
                          now + timedelta(seconds=decision.delay), False, text, retry_after)
    if probe and failure in RETRYABLE:
        return Settlement(PostbackState.RETRY_SCHEDULED, failure,
                          f"{WAITING_PREFIX}circuit open (probe failed: {text})",
                          now + timedelta(seconds=probe_wait), False, text, retry_after)
    return Settlement(PostbackState.DEAD_LETTERED, failure, f"{text}; {decision.reason}", None,
                      True, text, retry_after)
