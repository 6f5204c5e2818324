from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from postback_worker.domain.retry import (
    RETRYABLE,
    ErrorKind,
    FailureClass,
    Outcome,
    RetryDecision,
    RetryPolicy,
    classify,
    describe,
    parse_retry_after,
)

F = FailureClass


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (100, F.CONFIG),
        (200, F.DELIVERED),
        (201, F.DELIVERED),
        (204, F.DELIVERED),
        (299, F.DELIVERED),
        (301, F.CONFIG),
        (302, F.CONFIG),
        (304, F.CONFIG),
        (400, F.CONFIG),
        (401, F.AUTH),
        (403, F.BLOCKED),
        (404, F.CONFIG),
        (408, F.TIMEOUT),
        (410, F.GONE),
        (422, F.CONFIG),
        (429, F.THROTTLED),
        (500, F.PARTNER_5XX),
        (502, F.PARTNER_5XX),
        (503, F.PARTNER_5XX),
        (504, F.PARTNER_5XX),
        (520, F.PARTNER_5XX),
    ],
)
def test_classify_status(status: int, expected: FailureClass) -> None:
    assert classify(Outcome(status_code=status)) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ErrorKind.TIMEOUT, F.TIMEOUT),
        (ErrorKind.DNS, F.DNS),
        (ErrorKind.REFUSED, F.NETWORK),
        (ErrorKind.RESET, F.NETWORK),
        (ErrorKind.TLS, F.NETWORK),
        (ErrorKind.OTHER, F.NETWORK),
        (ErrorKind.BLOCKED_ADDRESS, F.CONFIG),
        (ErrorKind.INVALID_URL, F.CONFIG),
        (ErrorKind.PROXY, F.PROXY),
    ],
)
def test_classify_error(error: ErrorKind, expected: FailureClass) -> None:
    assert classify(Outcome(error=error)) is expected
    assert classify(Outcome(status_code=200, error=error)) is expected


def test_classify_no_status_no_error_is_network() -> None:
    assert classify(Outcome()) is F.NETWORK


@pytest.mark.parametrize(
    ("status", "body", "check", "expected"),
    [
        (200, '{"success": true}', None, F.DELIVERED),
        (200, "", None, F.DELIVERED),
        (200, '{"success":true}', '"success":true', F.DELIVERED),
        (200, "RESULT: SUCCESS=TRUE", "success=true", F.DELIVERED),
        (200, '{"success":false}', '"success":true', F.CONFIG),
        (200, "", "ok", F.CONFIG),
        (204, "", "ok", F.CONFIG),
        (200, "anything", "", F.DELIVERED),
        (503, "ok", "ok", F.PARTNER_5XX),
    ],
)
def test_classify_success_check(
    status: int, body: str, check: str | None, expected: FailureClass
) -> None:
    assert classify(Outcome(status_code=status, body_excerpt=body), check) is expected


@pytest.mark.parametrize(
    ("outcome", "failure", "expected"),
    [
        (Outcome(status_code=503), F.PARTNER_5XX, "HTTP 503 from partner (partner_5xx)"),
        (Outcome(status_code=401), F.AUTH, "HTTP 401 from partner (auth)"),
        (
            Outcome(status_code=200),
            F.CONFIG,
            "HTTP 200 from partner, but the body failed the success check (config)",
        ),
        (
            Outcome(error=ErrorKind.DNS, error_message="Name or service\nnot known"),
            F.DNS,
            "DNS lookup failed: Name or service not known (dns)",
        ),
        (
            Outcome(error=ErrorKind.TIMEOUT, error_message="read timeout", duration_ms=5000.4),
            F.TIMEOUT,
            "request timed out: read timeout after 5000 ms (timeout)",
        ),
        (Outcome(error=ErrorKind.REFUSED), F.NETWORK, "connection refused (network)"),
        (Outcome(), F.NETWORK, "no response from partner (network)"),
    ],
)
def test_describe(outcome: Outcome, failure: FailureClass, expected: str) -> None:
    assert describe(outcome, failure) == expected


NOW = datetime(2026, 11, 26, 20, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Thu, 26 Nov 2026 20:31:00 GMT", 60.0),
        ("Thu, 26 Nov 2026 21:30:00 +0000", 3600.0),
        ("Thu, 26 Nov 2026 20:00:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        ("-5", None),
        ("1.5", None),
        ("Thu, 99 Foo 2026", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retryable_set() -> None:
    assert frozenset({F.PARTNER_5XX, F.TIMEOUT, F.THROTTLED, F.DNS, F.NETWORK,
                      F.PROXY}) == RETRYABLE


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (7, 1920.0), (8, 3600.0), (50, 3600.0)],
)
def test_backoff_growth_and_cap_without_jitter(attempts: int, expected: float) -> None:
    assert RetryPolicy(jitter=0.0).backoff(attempts, 0.7) == expected


@pytest.mark.parametrize("attempts", [1, 2, 5, 8, 20, 5000])
@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, 0.999999])
def test_backoff_jitter_bounds(attempts: int, rand: float) -> None:
    policy = RetryPolicy()
    raw = min(policy.max_delay, policy.base_delay * 2 ** min(attempts - 1, 60))
    delay = policy.backoff(attempts, rand)
    assert raw * (1 - policy.jitter) <= delay <= raw <= policy.max_delay
    assert delay == pytest.approx(raw * (0.5 + 0.5 * rand))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("base_delay", -1.0),
        ("max_delay", -0.1),
        ("horizon", -5.0),
        ("max_retry_after", float("nan")),
        ("jitter", 1.5),
        ("jitter", -0.1),
    ],
)
def test_policy_validation_names_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: value})


def test_with_overrides_ignores_none() -> None:
    policy = RetryPolicy().with_overrides(max_attempts=3, base_delay=None, horizon=600.0)
    assert policy == RetryPolicy(max_attempts=3, horizon=600.0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy().with_overrides(jitter=2.0)
    with pytest.raises(ValueError, match="bogus"):
        RetryPolicy().with_overrides(bogus=1)


START = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def decide(
    failure: FailureClass,
    attempts: int = 1,
    elapsed: float = 0.0,
    retry_after: float | None = None,
    policy: RetryPolicy | None = None,
) -> RetryDecision:
    return (policy or RetryPolicy(jitter=0.0)).decide(
        failure,
        attempts_made=attempts,
        first_attempt_at=START,
        now=START + timedelta(seconds=elapsed),
        retry_after=retry_after,
        rand=0.5,
    )


def retry(delay: float, reason: str) -> RetryDecision:
    return RetryDecision("retry", delay, reason)


def dead(reason: str) -> RetryDecision:
    return RetryDecision("dead_letter", None, reason)


HORIZON = "retry horizon of 48h exceeded"


@pytest.mark.parametrize(
    ("failure", "kw", "expected"),
    [
        (F.DELIVERED, {}, RetryDecision("delivered", None, "delivered")),
        (F.PARTNER_5XX, {}, retry(30.0, "partner_5xx: attempt 2 of 8 in 30s")),
        (F.TIMEOUT, {"attempts": 3}, retry(120.0, "timeout: attempt 4 of 8 in 120s")),
        (F.DNS, {"attempts": 2}, retry(60.0, "dns: attempt 3 of 8 in 60s")),
        (F.NETWORK, {"attempts": 7}, retry(1920.0, "network: attempt 8 of 8 in 1920s")),
        (F.THROTTLED, {"retry_after": 600.0}, retry(600.0, "throttled: attempt 2 of 8 in 600s")),
        (F.THROTTLED, {"retry_after": 5.0}, retry(30.0, "throttled: attempt 2 of 8 in 30s")),
        (F.THROTTLED, {"retry_after": 1e5}, retry(3600.0, "throttled: attempt 2 of 8 in 3600s")),
        (F.PARTNER_5XX, {"attempts": 8}, dead("retries exhausted: 8 of 8 attempts")),
        (F.PARTNER_5XX, {"attempts": 9}, dead("retries exhausted: 9 of 8 attempts")),
        (F.TIMEOUT, {"elapsed": 172770.0}, retry(30.0, "timeout: attempt 2 of 8 in 30s")),
        (F.TIMEOUT, {"elapsed": 172771.0}, dead(HORIZON)),
        (F.THROTTLED, {"elapsed": 172000.0, "retry_after": 1000.0}, dead(HORIZON)),
    ],
)
def test_decide_retryable(
    failure: FailureClass, kw: dict[str, float], expected: RetryDecision
) -> None:
    assert decide(failure, **kw) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("failure", "fragment"),
    [(F.AUTH, "auth (HTTP 401)"), (F.BLOCKED, "blocked (HTTP 403)"), (F.CONFIG, "config"),
     (F.GONE, "gone (HTTP 410)")],
)
@pytest.mark.parametrize("attempts", [1, 5])
def test_decide_not_retried(failure: FailureClass, fragment: str, attempts: int) -> None:
    result = decide(failure, attempts=attempts)
    assert result.action == "dead_letter"
    assert result.delay is None
    assert result.reason.startswith(fragment)
    assert "is not retried" in result.reason


@pytest.mark.parametrize(
    ("policy", "attempts", "expected"),
    [
        (RetryPolicy(max_attempts=1), 1, "retries exhausted: 1 of 1 attempts"),
        (RetryPolicy(max_attempts=3, jitter=0.0), 3, "retries exhausted: 3 of 3 attempts"),
        (RetryPolicy(horizon=600.0, base_delay=900.0), 1, "retry horizon of 10m exceeded"),
        (RetryPolicy(horizon=90.0, jitter=0.0), 3, "retry horizon of 90s exceeded"),
    ],
)
def test_decide_custom_policy(policy: RetryPolicy, attempts: int, expected: str) -> None:
    result = decide(F.PARTNER_5XX, attempts=attempts, policy=policy)
    assert result == RetryDecision("dead_letter", None, expected)


def test_decide_jitter_uses_rand() -> None:
    policy = RetryPolicy()
    low = policy.decide(F.TIMEOUT, attempts_made=2, first_attempt_at=START, now=START,
                        retry_after=None, rand=0.0)  # fmt: skip
    high = policy.decide(F.TIMEOUT, attempts_made=2, first_attempt_at=START, now=START,
                         retry_after=None, rand=0.99)  # fmt: skip
    assert low.delay == 30.0
    assert high.delay is not None and 59.0 < high.delay < 60.0
