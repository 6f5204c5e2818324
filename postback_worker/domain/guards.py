"""Per-partner guardrails as pure functions: circuit breaker state machine and token bucket.

Times are seconds (floats, e.g. epoch seconds) passed in by the caller; nothing here reads a
clock. `pipeline.guardrails` stores these states in Redis so every worker shares them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN)

# The failure window is kept as this many buckets (counts per slice of the window).
WINDOW_BUCKETS = 12


@dataclass(frozen=True)
class BreakerConfig:
    """When a circuit opens and how it probes."""

    min_attempts: int = 20
    failure_ratio: float = 0.5
    window: float = 60.0
    cooldown: float = 5.0
    max_cooldown: float = 300.0
    probe_timeout: float = 30.0

    @property
    def bucket_seconds(self) -> float:
        return max(self.window / WINDOW_BUCKETS, 0.001)


@dataclass(frozen=True)
class Circuit:
    """A partner's circuit. `retry_at`: when an open circuit lets one probe through."""

    state: str = CLOSED
    opened_at: float = 0.0
    retry_at: float = 0.0
    cooldown: float = 0.0
    probe_until: float = 0.0
    hold_until: float = 0.0  # the partner's Retry-After, for every postback to it
    reason: str = ""


@dataclass(frozen=True)
class Admission:
    """What may be fired now: "all", "probe" (exactly one) or "none" (wait `wait` seconds)."""

    verdict: str
    wait: float = 0.0
    reason: str = ""


def bucket_of(now: float, config: BreakerConfig) -> int:
    """Index of the window bucket `now` falls in."""
    return math.floor(now / config.bucket_seconds)


def window_counts(buckets: Mapping[int, tuple[int, int]], now: float,
                  config: BreakerConfig) -> tuple[int, int]:
    """(attempts, retryable failures) over the buckets still inside the window at `now`."""
    newest = bucket_of(now, config)
    oldest = newest - WINDOW_BUCKETS + 1
    total = failed = 0
    for index, (t, f) in buckets.items():
        if oldest <= index <= newest:
            total += t
            failed += f
    return total, failed


def should_open(total: int, failed: int, config: BreakerConfig) -> bool:
    """True when enough attempts were made and enough of them failed."""
    return total >= config.min_attempts and total > 0 and failed / total >= config.failure_ratio


def holding(circuit: Circuit, now: float) -> Admission | None:
    """A "none" admission while the partner's Retry-After runs (breaker or not), else None."""
    if circuit.hold_until > now:
        wait = circuit.hold_until - now
        return Admission("none", wait, f"partner asked to retry after {wait:.0f}s")
    return None


def admit(circuit: Circuit, now: float, config: BreakerConfig) -> tuple[Circuit, Admission]:
    """Decide what may be fired to the partner now; returns the (possibly changed) circuit."""
    held = holding(circuit, now)
    if held is not None:
        return circuit, held
    if circuit.state == CLOSED:
        return circuit, Admission("all")
    if circuit.state == OPEN:
        if now < circuit.retry_at:
            return circuit, Admission("none", circuit.retry_at - now,
                                      f"circuit open: {circuit.reason}")
        probing = replace(circuit, state=HALF_OPEN, probe_until=now + config.probe_timeout)
        return probing, Admission("probe", 0.0, "circuit half-open: one probe")
    # half-open: one probe at a time; a probe lost with its worker is replaced after a timeout
    if now < circuit.probe_until:
        return circuit, Admission("none", circuit.probe_until - now,
                                  "circuit half-open: waiting for the probe's answer")
    return replace(circuit, probe_until=now + config.probe_timeout), Admission(
        "probe", 0.0, "circuit half-open: one probe (the previous one was not answered)")


def after_results(circuit: Circuit, *, now: float, total: int, failed: int,
                  probe_ok: bool | None, config: BreakerConfig) -> Circuit:
    """The circuit after results: window counts (`total`, `failed`) and a probe's outcome.

    `probe_ok` is None when no probe answered in these results.
    """
    if circuit.state == HALF_OPEN and probe_ok is not None:
        if probe_ok:
            return Circuit(hold_until=circuit.hold_until)
        cooldown = min(config.max_cooldown, max(config.cooldown, circuit.cooldown * 2))
        return replace(circuit, state=OPEN, retry_at=now + cooldown, cooldown=cooldown,
                       probe_until=0.0, reason=f"probe failed; next probe in {cooldown:g}s")
    if circuit.state == CLOSED and should_open(total, failed, config):
        return replace(
            circuit, state=OPEN, opened_at=now, retry_at=now + config.cooldown,
            cooldown=config.cooldown, probe_until=0.0,
            reason=f"{failed} of {total} attempts in the last {config.window:g}s failed",
        )
    return circuit


def hold(circuit: Circuit, until: float) -> Circuit:
    """Hold every postback to the partner until `until` (its Retry-After), never shortening."""
    return replace(circuit, hold_until=max(circuit.hold_until, until))


# -- token bucket ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """Tokens left at time `at`; refills at `rate` per second up to `burst`."""

    tokens: float
    at: float


# Tolerance for float refill sums such as 0.2 s x 5/s = 0.9999999999999964 tokens.
EPSILON = 1e-9


def burst_for(rate: float) -> float:
    """Bucket size for a rate: one second's worth, at least one request."""
    return max(1.0, rate)


def take(bucket: Bucket | None, *, now: float, rate: float, want: int) -> tuple[int, Bucket]:
    """Take up to `want` whole tokens; returns (granted, bucket after)."""
    burst = burst_for(rate)
    if bucket is None:
        bucket = Bucket(burst, now)
    tokens, at = bucket.tokens, bucket.at
    if now > at:
        tokens = min(burst, tokens + (now - at) * rate)
        at = now
    granted = max(0, min(want, math.floor(tokens + EPSILON)))
    return granted, Bucket(max(0.0, tokens - granted), at)


def wait_for(bucket: Bucket, position: int, rate: float) -> float:
    """Seconds until the `position`-th (1-based) further token exists."""
    return max(0.0, (position - bucket.tokens) / rate)
