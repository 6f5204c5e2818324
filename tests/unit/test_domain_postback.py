"""settle(): every failure class x (retries left, retries exhausted, circuit probe)."""

from datetime import UTC, datetime, timedelta

import pytest

from postback_worker.domain.failures import FACTS, FailureClass
from postback_worker.domain.postback import (
    FINAL_STATES,
    OPEN_STATES,
    WAITING_PREFIX,
    PostbackState,
    settle,
)
from postback_worker.domain.retry import ErrorKind, Outcome, RetryPolicy

F = FailureClass
S = PostbackState
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=4, base_delay=10.0, max_delay=100.0, horizon=3600.0,
                     jitter=0.0)
PROBE_WAIT = 30.0

# One real outcome of each class, and what kind of class it is.
OUTCOMES = {
    F.DELIVERED: (Outcome(status_code=200), "delivered"),
    F.PARTNER_5XX: (Outcome(status_code=503), "retried"),
    F.TIMEOUT: (Outcome(error=ErrorKind.TIMEOUT, duration_ms=2000), "retried"),
    F.THROTTLED: (Outcome(status_code=429), "retried"),
    F.DNS: (Outcome(error=ErrorKind.DNS), "retried"),
    F.NETWORK: (Outcome(error=ErrorKind.REFUSED), "retried"),
    F.AUTH: (Outcome(status_code=401), "final"),
    F.BLOCKED: (Outcome(status_code=403), "final"),
    F.GONE: (Outcome(status_code=410), "final"),
    F.CONFIG: (Outcome(status_code=404), "final"),
    F.PROXY: (Outcome(error=ErrorKind.PROXY), "retried"),
}

# (kind, situation) -> (state, dead letter, next attempt in seconds or None)
# Situations: attempt 1 of 4 ("room"), attempt 4 of 4 ("exhausted"), each as a circuit probe.
EXPECTED = {
    ("delivered", "room"): (S.DELIVERED, False, None),
    ("delivered", "exhausted"): (S.DELIVERED, False, None),
    ("delivered", "probe_room"): (S.DELIVERED, False, None),
    ("delivered", "probe_exhausted"): (S.DELIVERED, False, None),
    ("retried", "room"): (S.RETRY_SCHEDULED, False, 10.0),
    ("retried", "exhausted"): (S.DEAD_LETTERED, True, None),
    ("retried", "probe_room"): (S.RETRY_SCHEDULED, False, 10.0),
    ("retried", "probe_exhausted"): (S.RETRY_SCHEDULED, False, PROBE_WAIT),
    ("final", "room"): (S.DEAD_LETTERED, True, None),
    ("final", "exhausted"): (S.DEAD_LETTERED, True, None),
    ("final", "probe_room"): (S.DEAD_LETTERED, True, None),
    ("final", "probe_exhausted"): (S.DEAD_LETTERED, True, None),
}
SITUATIONS = {"room": (1, False), "exhausted": (4, False), "probe_room": (1, True),
              "probe_exhausted": (4, True)}


@pytest.mark.parametrize("situation", list(SITUATIONS))
@pytest.mark.parametrize("failure", list(F))
def test_settle_every_class_and_situation(failure: FailureClass, situation: str) -> None:
    outcome, kind = OUTCOMES[failure]
    attempt_no, probe = SITUATIONS[situation]
    state, dead, wait = EXPECTED[(kind, situation)]
    s = settle(outcome, policy=POLICY, attempt_no=attempt_no, first_attempt_at=NOW, now=NOW,
               rand=0.5, probe=probe, probe_wait=PROBE_WAIT)
    assert s.failure is failure
    assert (s.state, s.dead_letter) == (state, dead)
    assert s.next_attempt_at == (None if wait is None else NOW + timedelta(seconds=wait))
    if state is S.DELIVERED:
        assert s.reason is None and s.error is None
    else:
        assert s.error and s.error.endswith(f"({failure})")
        assert s.reason and s.error in s.reason


@pytest.mark.parametrize(
    ("failure", "situation", "reason"),
    [
        (F.PARTNER_5XX, "room", "partner_5xx: attempt 2 of 4 in 10s"),
        (F.PARTNER_5XX, "exhausted", "retries exhausted: 4 of 4 attempts"),
        (F.TIMEOUT, "probe_exhausted", WAITING_PREFIX + "circuit open (probe failed: "),
        (F.AUTH, "room", "auth (HTTP 401) is not retried"),
        (F.BLOCKED, "probe_exhausted", "blocked (HTTP 403) is not retried"),
        (F.CONFIG, "exhausted", "config (bad URL, redirect or 4xx) is not retried"),
    ],
)
def test_settle_reason_says_why(failure: FailureClass, situation: str, reason: str) -> None:
    attempt_no, probe = SITUATIONS[situation]
    s = settle(OUTCOMES[failure][0], policy=POLICY, attempt_no=attempt_no,
               first_attempt_at=NOW, now=NOW, rand=0.5, probe=probe, probe_wait=PROBE_WAIT)
    assert s.reason is not None and reason in s.reason


def test_settle_honours_retry_after_and_reports_it() -> None:
    s = settle(Outcome(status_code=429, retry_after="45"), policy=POLICY, attempt_no=1,
               first_attempt_at=NOW, now=NOW, rand=0.5)
    assert (s.state, s.retry_after) == (S.RETRY_SCHEDULED, 45.0)
    assert s.next_attempt_at == NOW + timedelta(seconds=45)


def test_settle_dead_letters_past_the_horizon() -> None:
    s = settle(Outcome(status_code=503), policy=POLICY, attempt_no=1,
               first_attempt_at=NOW - timedelta(seconds=3595), now=NOW, rand=0.5)
    assert (s.state, s.dead_letter) == (S.DEAD_LETTERED, True)
    assert s.reason is not None and "retry horizon of 1h exceeded" in s.reason


def test_settle_success_check_failure_is_config() -> None:
    s = settle(Outcome(status_code=200, body_excerpt="success=false"), policy=POLICY,
               attempt_no=1, first_attempt_at=NOW, now=NOW, rand=0.5,
               success_check="success=true")
    assert (s.failure, s.state) == (F.CONFIG, S.DEAD_LETTERED)


def test_states_are_final_or_open() -> None:
    assert {S.DELIVERED, S.DEAD_LETTERED, S.SKIPPED} == FINAL_STATES
    assert set(OPEN_STATES) | FINAL_STATES == set(S)
    assert not set(OPEN_STATES) & FINAL_STATES


def test_every_class_has_its_facts() -> None:
    assert set(FACTS) == set(F)


@pytest.mark.parametrize(("attempt_no", "round_start", "state", "reason_end"), [
    (4, 0, S.DEAD_LETTERED, "retries exhausted: 4 of 4 attempts"),
    (5, 4, S.RETRY_SCHEDULED, "attempt 2 of 4 in 10s"),  # first attempt after a replay
    (7, 4, S.RETRY_SCHEDULED, "attempt 4 of 4 in 40s"),
    (8, 4, S.DEAD_LETTERED, "retries exhausted: 4 of 4 attempts"),  # never "8 of 4"
    (12, 8, S.DEAD_LETTERED, "retries exhausted: 4 of 4 attempts"),  # a second replay
])
def test_settle_counts_the_attempts_of_the_current_round(
        attempt_no: int, round_start: int, state: PostbackState, reason_end: str) -> None:
    settled = settle(Outcome(status_code=503), policy=POLICY, attempt_no=attempt_no,
                     round_start=round_start, first_attempt_at=NOW, now=NOW, rand=0.0)
    assert settled.state == state
    assert settled.reason is not None and settled.reason.endswith(reason_end)
