"""Classify delivery outcomes and decide retry or dead letter (a pure policy).

What each failure class means (retried or not, and why) is the table in `domain.failures`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

from postback_worker.domain.failures import FACTS, RETRYABLE, FailureClass

__all__ = [
    "RETRYABLE", "ErrorKind", "FailureClass", "Outcome", "RetryDecision", "RetryPolicy",
    "classify", "describe", "parse_retry_after",
]


class ErrorKind(StrEnum):
    """Transport-level error reported by the HTTP sender."""

    TIMEOUT = "timeout"
    DNS = "dns"
    REFUSED = "refused"
    RESET = "reset"
    TLS = "tls"
    BLOCKED_ADDRESS = "blocked_address"
    INVALID_URL = "invalid_url"
    PROXY = "proxy"
    OTHER = "other"


@dataclass(frozen=True)
class Outcome:
    """Result of one HTTP attempt (either a status code or an error)."""

    status_code: int | None = None
    error: ErrorKind | None = None
    error_message: str = ""
    duration_ms: float = 0.0
    body_excerpt: str = ""
    retry_after: str | None = None  # raw Retry-After header


_ERROR_CLASS = {
    ErrorKind.TIMEOUT: FailureClass.TIMEOUT,
    ErrorKind.DNS: FailureClass.DNS,
    ErrorKind.REFUSED: FailureClass.NETWORK,
    ErrorKind.RESET: FailureClass.NETWORK,
    ErrorKind.TLS: FailureClass.NETWORK,
    ErrorKind.OTHER: FailureClass.NETWORK,
    ErrorKind.BLOCKED_ADDRESS: FailureClass.CONFIG,
    ErrorKind.INVALID_URL: FailureClass.CONFIG,
    ErrorKind.PROXY: FailureClass.PROXY,
}

_STATUS_CLASS = {
    408: FailureClass.TIMEOUT,
    429: FailureClass.THROTTLED,
    401: FailureClass.AUTH,
    403: FailureClass.BLOCKED,
    410: FailureClass.GONE,
}

_ERROR_TEXT = {
    ErrorKind.TIMEOUT: "request timed out",
    ErrorKind.DNS: "DNS lookup failed",
    ErrorKind.REFUSED: "connection refused",
    ErrorKind.RESET: "connection reset",
    ErrorKind.TLS: "TLS failure",
    ErrorKind.BLOCKED_ADDRESS: "destination address is blocked by the egress guard",
    ErrorKind.INVALID_URL: "invalid URL",
    ErrorKind.PROXY: "the egress proxy failed",
    ErrorKind.OTHER: "request failed",
}

def classify(outcome: Outcome, success_check: str | None = None) -> FailureClass:
    """Map an attempt outcome to its failure class."""
    if outcome.error is not None:
        return _ERROR_CLASS[outcome.error]
    code = outcome.status_code
    if code is None:
        return FailureClass.NETWORK
    if 200 <= code < 300:
        if success_check and success_check.lower() not in outcome.body_excerpt.lower():
            return FailureClass.CONFIG
        return FailureClass.DELIVERED
    if code in _STATUS_CLASS:
        return _STATUS_CLASS[code]
    if 500 <= code < 600:
        return FailureClass.PARTNER_5XX
    return FailureClass.CONFIG


def describe(outcome: Outcome, failure: FailureClass) -> str:
    """One-line human description of an outcome, e.g. ``HTTP 503 from partner (partner_5xx)``."""
    if outcome.error is not None:
        text = _ERROR_TEXT[outcome.error]
        detail = " ".join(outcome.error_message.split())
        if detail:
            text += f": {detail}"
        if outcome.error is ErrorKind.TIMEOUT and outcome.duration_ms:
            text += f" after {outcome.duration_ms:.0f} ms"
        return f"{text} ({failure})"
    code = outcome.status_code
    if code is None:
        return f"no response from partner ({failure})"
    if 200 <= code < 300 and failure is FailureClass.CONFIG:
        return f"HTTP {code} from partner, but the body failed the success check ({failure})"
    return f"HTTP {code} from partner ({failure})"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if invalid."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, (_utc(when) - _utc(now)).total_seconds())


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class RetryDecision:
    """What to do after an attempt: "delivered", "retry" (after ``delay`` s) or "dead_letter"."""

    action: str  # "delivered" | "retry" | "dead_letter"
    delay: float | None
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    """Capped, jittered exponential backoff bounded by attempts and a time horizon."""

    max_attempts: int = 8
    base_delay: float = 30.0
    max_delay: float = 3600.0
    horizon: float = 172800.0
    jitter: float = 0.5
    max_retry_after: float = 3600.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError("max_attempts must be an integer")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for name in ("base_delay", "max_delay", "horizon", "max_retry_after"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if not (isinstance(self.jitter, int | float) and 0 <= self.jitter <= 1):
            raise ValueError("jitter must be between 0 and 1")

    def with_overrides(self, **values: float | int | None) -> RetryPolicy:
        """Copy with the given non-None fields replaced (e.g. per-partner overrides)."""
        fields = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, float | int] = {}
        for name, value in values.items():
            if name not in fields:
                raise ValueError(f"unknown retry policy field: {name}")
            if value is None:
                continue
            if name == "max_attempts" and isinstance(value, float) and value.is_integer():
                value = int(value)
            changes[name] = value
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def backoff(self, attempts_made: int, rand: float) -> float:
        """Delay before the next attempt; ``rand`` in [0, 1) spreads it by ``jitter``."""
        exponent = min(max(attempts_made, 1) - 1, 1000)
        raw = min(self.max_delay, self.base_delay * 2.0**exponent)
        rand = min(max(rand, 0.0), 1.0)
        return min(self.max_delay, raw * (1 - self.jitter + self.jitter * rand))

    def decide(
        self,
        failure: FailureClass,
        *,
        attempts_made: int,
        first_attempt_at: datetime,
        now: datetime,
        retry_after: float | None,
        rand: float,
    ) -> RetryDecision:
        """Decide what happens after ``attempts_made`` attempts ending in ``failure``."""
        if failure is FailureClass.DELIVERED:
            return RetryDecision("delivered", None, "delivered")
        if failure not in RETRYABLE:
            return RetryDecision("dead_letter", None, FACTS[failure].not_retried or str(failure))
        if attempts_made >= self.max_attempts:
            return RetryDecision(
                "dead_letter",
                None,
                f"retries exhausted: {attempts_made} of {self.max_attempts} attempts",
            )
        delay = self.backoff(attempts_made, rand)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        elapsed = (_utc(now) - _utc(first_attempt_at)).total_seconds()
        if elapsed + delay > self.horizon:
            return RetryDecision(
                "dead_letter", None, f"retry horizon of {_duration(self.horizon)} exceeded"
            )
        return RetryDecision(
            "retry",
            delay,
            f"{failure}: attempt {attempts_made + 1} of {self.max_attempts} in {delay:.0f}s",
        )
