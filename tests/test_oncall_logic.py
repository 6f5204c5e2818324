"""Pure on-call logic: breaker state machine, token bucket maths, most likely cause."""

from __future__ import annotations

import pytest

from postback_worker.domain import diagnosis as d
from postback_worker.domain import guards as g

CFG = g.BreakerConfig(min_attempts=20, failure_ratio=0.5, window=60, cooldown=5,
                      max_cooldown=40, probe_timeout=30)
OPEN_AT_100 = g.Circuit(state=g.OPEN, opened_at=100, retry_at=105, cooldown=5, reason="x")


@pytest.mark.parametrize(
    ("total", "failed", "opens"),
    [
        (19, 19, False),   # too few attempts, however bad
        (20, 9, False),    # 45 %
        (20, 10, True),    # 50 %
        (40, 39, True),
        (0, 0, False),
        (1000, 499, False),
    ],
)
def test_should_open(total: int, failed: int, opens: bool) -> None:
    assert g.should_open(total, failed, CFG) is opens


@pytest.mark.parametrize(
    ("circuit", "now", "verdict", "wait", "state_after"),
    [
        (g.Circuit(), 100, "all", 0, g.CLOSED),
        (OPEN_AT_100, 101, "none", 4, g.OPEN),
        (OPEN_AT_100, 105, "probe", 0, g.HALF_OPEN),          # cool-down over: one probe
        (g.Circuit(state=g.HALF_OPEN, probe_until=130), 110, "none", 20, g.HALF_OPEN),
        (g.Circuit(state=g.HALF_OPEN, probe_until=130), 131, "probe", 0, g.HALF_OPEN),  # lost
        (g.Circuit(hold_until=160), 100, "none", 60, g.CLOSED),  # Retry-After holds all
        (g.Circuit(hold_until=99), 100, "all", 0, g.CLOSED),
    ],
)
def test_admit(circuit: g.Circuit, now: float, verdict: str, wait: float,
               state_after: str) -> None:
    after, admission = g.admit(circuit, now, CFG)
    assert (admission.verdict, admission.wait, after.state) == (verdict, wait, state_after)
    if verdict == "probe":
        assert after.probe_until == now + CFG.probe_timeout


@pytest.mark.parametrize(
    ("circuit", "total", "failed", "probe_ok", "state", "retry_at", "cooldown"),
    [
        (g.Circuit(), 25, 20, None, g.OPEN, 205, 5),               # opens
        (g.Circuit(), 25, 5, None, g.CLOSED, 0, 0),                # stays closed
        (g.Circuit(state=g.HALF_OPEN, cooldown=5), 1, 0, True, g.CLOSED, 0, 0),
        (g.Circuit(state=g.HALF_OPEN, cooldown=5), 1, 1, False, g.OPEN, 210, 10),  # doubles
        (g.Circuit(state=g.HALF_OPEN, cooldown=30), 1, 1, False, g.OPEN, 240, 40),  # capped
        (g.Circuit(state=g.HALF_OPEN, cooldown=5), 30, 30, None, g.HALF_OPEN, 0, 5),  # stragglers
        (OPEN_AT_100, 50, 50, None, g.OPEN, 105, 5),               # open stays as it is
    ],
)
def test_after_results(circuit: g.Circuit, total: int, failed: int, probe_ok: bool | None,
                       state: str, retry_at: float, cooldown: float) -> None:
    after = g.after_results(circuit, now=200, total=total, failed=failed, probe_ok=probe_ok,
                            config=CFG)
    assert (after.state, after.retry_at, after.cooldown) == (state, retry_at, cooldown)


def test_hold_never_shortens() -> None:
    assert g.hold(g.Circuit(hold_until=50), 40).hold_until == 50
    assert g.hold(g.Circuit(hold_until=50), 70).hold_until == 70


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (100.0, (30, 12)),   # every bucket from 45 s to 100 s
        (150.0, (10, 2)),    # only the newest bucket is still inside the window
        (500.0, (0, 0)),
    ],
)
def test_window_counts(now: float, expected: tuple[int, int]) -> None:
    b = CFG.bucket_seconds  # 5 s
    buckets = {int(45 // b): (10, 5), int(75 // b): (10, 5), int(100 // b): (10, 2)}
    assert g.window_counts(buckets, now, CFG) == expected


@pytest.mark.parametrize(
    ("bucket", "now", "rate", "want", "granted", "tokens_after"),
    [
        (None, 10.0, 5.0, 3, 3, 2.0),                       # new bucket starts full (burst 5)
        (None, 10.0, 5.0, 9, 5, 0.0),
        (g.Bucket(0.0, 10.0), 10.0, 5.0, 1, 0, 0.0),         # empty
        (g.Bucket(0.0, 10.0), 10.2, 5.0, 2, 1, 0.0),         # 0.2 s refills one token
        (g.Bucket(0.0, 10.0), 20.0, 5.0, 9, 5, 0.0),         # refill caps at the burst
        (g.Bucket(0.5, 10.0), 10.0, 0.5, 1, 0, 0.5),         # slow rate: burst is one request
        (g.Bucket(0.5, 10.0), 11.0, 0.5, 1, 1, 0.0),
        (g.Bucket(2.0, 12.0), 11.0, 5.0, 1, 1, 1.0),         # clock behind: no refill
    ],
)
def test_token_bucket(bucket: g.Bucket | None, now: float, rate: float, want: int,
                      granted: int, tokens_after: float) -> None:
    got, after = g.take(bucket, now=now, rate=rate, want=want)
    assert got == granted
    assert after.tokens == pytest.approx(tokens_after)


@pytest.mark.parametrize(
    ("tokens", "position", "rate", "wait"),
    [(0.0, 1, 5.0, 0.2), (0.0, 5, 5.0, 1.0), (0.5, 1, 1.0, 0.5), (3.0, 2, 1.0, 0.0)],
)
def test_wait_for(tokens: float, position: int, rate: float, wait: float) -> None:
    assert g.wait_for(g.Bucket(tokens, 0.0), position, rate) == pytest.approx(wait)


@pytest.mark.parametrize(
    ("failed", "expired", "cause"),
    [
        ({}, 0, d.NONE),
        ({}, 3, d.EXPIRED_CLICK),
        ({("partner_5xx", 503): 10, ("timeout", None): 4}, 2, d.PARTNER_DOWN),
        ({("blocked", 403): 7, ("partner_5xx", 500): 2}, 0, d.FIREWALL),
        ({("dns", None): 5, ("network", None): 1}, 0, d.NETWORK),
        ({("auth", 401): 3}, 0, d.PROVIDER),
        ({("throttled", 429): 9, ("partner_5xx", 503): 8}, 0, d.PROVIDER),
        ({("config", 404): 6}, 0, d.PROVIDER),          # endpoint moved: a provider change
        ({("config", 400): 6, ("config", None): 1}, 0, d.URL_CONFIG),
        ({("config", 400): 2}, 2, d.EXPIRED_CLICK),     # a tie goes to the earlier cause
        ({("delivered", 200): 5}, 0, d.NONE),
    ],
)
def test_most_likely_cause(failed: dict[tuple[str, int | None], int], expired: int,
                           cause: str) -> None:
    result = d.diagnose(failed, expired)
    assert result.cause == cause
    summary = result.summary()
    assert summary.startswith(f"Most likely cause: {d.TITLES[cause]}.")
    assert d.ACTIONS[cause] in summary
