"""The per-failure-class table: retried or not, why, what to do, which cause."""

from datetime import UTC, datetime

import pytest

from postback_worker.domain import diagnosis
from postback_worker.domain.failures import FACTS, RETRYABLE, Cause, FailureClass, cause_of
from postback_worker.domain.retry import RetryPolicy

F = FailureClass
NOW = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize(
    ("failure", "retried", "cause"),
    [
        (F.DELIVERED, False, None),
        (F.PARTNER_5XX, True, Cause.PARTNER_DOWN),
        (F.TIMEOUT, True, Cause.PARTNER_DOWN),
        (F.THROTTLED, True, Cause.PROVIDER),
        (F.DNS, True, Cause.NETWORK),
        (F.NETWORK, True, Cause.NETWORK),
        (F.AUTH, False, Cause.PROVIDER),
        (F.BLOCKED, False, Cause.FIREWALL),
        (F.CONFIG, False, Cause.URL_CONFIG),
    ],
)
def test_table_rows(failure: FailureClass, retried: bool, cause: Cause | None) -> None:
    facts = FACTS[failure]
    assert facts.retried is retried and (failure in RETRYABLE) is retried
    assert facts.cause is cause
    assert facts.advice.endswith(".")
    # A class that fails and is not retried says why; the policy uses those words.
    if failure is not F.DELIVERED and not retried:
        assert facts.not_retried
        decision = RetryPolicy().decide(failure, attempts_made=1, first_attempt_at=NOW, now=NOW,
                                        retry_after=None, rand=0.5)
        assert (decision.action, decision.reason) == ("dead_letter", facts.not_retried)
    else:
        assert facts.not_retried is None


@pytest.mark.parametrize(
    ("failure_class", "status", "cause"),
    [
        ("config", 400, Cause.URL_CONFIG),
        ("config", None, Cause.URL_CONFIG),
        ("config", 404, Cause.PROVIDER),  # the endpoint moved: a provider change
        ("config", 410, Cause.PROVIDER),
        ("auth", 401, Cause.PROVIDER),
        ("blocked", 403, Cause.FIREWALL),
        ("delivered", 200, None),
        ("no_such_class", 500, None),
    ],
)
def test_cause_of(failure_class: str, status: int | None, cause: Cause | None) -> None:
    assert cause_of(failure_class, status) is cause


def test_every_cause_has_a_title_and_an_action() -> None:
    assert set(diagnosis.TITLES) == set(Cause) == set(diagnosis.ACTIONS)

