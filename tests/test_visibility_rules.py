"""Pure pieces of the visibility features, table-driven: alert rules and transitions, time
ranges, percentiles, chart buckets, dashboard link signing, Flower's launch rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postback_worker.ops.visibility import alert_rules as ar
from postback_worker.ops.visibility.dashboard import bucket_seconds, duration
from postback_worker.ops.visibility.dashboard_auth import check_token, dashboard_link, make_token
from postback_worker.ops.visibility.figures import nearest_rank
from postback_worker.ops.visibility.flower import FlowerConfigError, flower_command
from postback_worker.ops.visibility.timerange import RangeError, parse_range
from postback_worker.settings import Settings

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
TH = ar.Thresholds(failure_rate=0.05, min_volume=20, clear_ratio=0.5, window_seconds=900,
                   dead_letter_growth=10, retry_overdue_seconds=600, lost_rate=0.05,
                   lost_min_volume=20, egress_ips=("203.0.113.7", "203.0.113.8"))


def partner_window(attempts: int, failed: int, code: str = "503",
                   cls: str = "partner_5xx") -> ar.PartnerWindow:
    return ar.PartnerWindow("aff-42", attempts, failed, {code: failed} if failed else {},
                            {cls: failed} if failed else {})


@pytest.mark.parametrize(
    ("attempts", "failed", "expected"),
    [
        (100, 5, True),     # exactly the threshold fires
        (100, 4, None),     # between 2.5% and 5%: hysteresis band, nothing changes
        (100, 2, False),    # under half the threshold: clears
        (19, 19, None),     # under the minimum volume nothing new fires...
        (19, 0, False),     # ...but a low rate still clears an open alert
        (20, 20, True),
    ],
)
def test_failure_rate_band(attempts: int, failed: int, expected: bool | None) -> None:
    (c,) = [c for c in ar.conditions(ar.Snapshot(NOW, [partner_window(attempts, failed)]), TH)
            if c.kind == ar.FAILURE_RATE]
    assert c.active is expected
    assert c.key == "failure_rate:aff-42" and c.partner_id == "aff-42"


@pytest.mark.parametrize(
    ("code", "cls", "next_step"),
    [
        ("403", "blocked", "ask the partner to allowlist our egress IPs: 203.0.113.7, "
                           "203.0.113.8"),
        ("404", "config", "check the partner's postback URL template"),
        ("400", "config", "check the partner's postback URL template"),
        ("none", "timeout", "contact the partner: their endpoint does not answer within the "
                            "timeout"),
        ("503", "partner_5xx", "contact the partner: their endpoint returns server errors"),
        ("401", "auth", "update the token in the postback URL"),
        ("429", "throttled", "rate limiting us"),
        ("none", "dns", "does not resolve"),
    ],
)
def test_failure_alert_text_names_partner_rate_codes_and_next_step(
    code: str, cls: str, next_step: str,
) -> None:
    snap = ar.Snapshot(NOW, [partner_window(40, 10, code, cls)])
    (c,) = [c for c in ar.conditions(snap, TH) if c.kind == ar.FAILURE_RATE]
    assert c.message.startswith(
        f"Partner aff-42: 25.0% of 40 postback attempts failed in the last 15 min "
        f"(threshold 5.0%). Top status codes: {code} x10. Top failure classes: {cls} x10. "
        "Next step: ")
    assert next_step in c.message


def test_egress_ips_missing_says_how_to_set_them() -> None:
    th = ar.Thresholds(egress_ips=())
    assert "set POSTBACK_EGRESS_IPS" in ar.next_step("blocked", "403", th.egress_ips)


@pytest.mark.parametrize(
    ("snapshot", "key", "expected"),
    [
        (ar.Snapshot(NOW, new_dead_letters=10), ar.DEAD_LETTERS, True),
        (ar.Snapshot(NOW, new_dead_letters=7), ar.DEAD_LETTERS, None),
        (ar.Snapshot(NOW, new_dead_letters=4), ar.DEAD_LETTERS, False),
        (ar.Snapshot(NOW, retry_backlog=3, oldest_due=NOW - timedelta(seconds=600)),
         ar.RETRY_BACKLOG, True),
        (ar.Snapshot(NOW, retry_backlog=3, oldest_due=NOW - timedelta(seconds=400)),
         ar.RETRY_BACKLOG, None),
        (ar.Snapshot(NOW, retry_backlog=3, oldest_due=NOW + timedelta(seconds=60)),
         ar.RETRY_BACKLOG, False),
        (ar.Snapshot(NOW, retry_backlog=0, oldest_due=None), ar.RETRY_BACKLOG, False),
        (ar.Snapshot(NOW, circuits={"p1": "open"}), "circuit_open:p1", True),
        (ar.Snapshot(NOW, circuits={"p1": "half_open"}), "circuit_open:p1", None),
        (ar.Snapshot(NOW, circuits={"p1": "closed"}), "circuit_open:p1", False),
        (ar.Snapshot(NOW, lost=[ar.OfferLost("o1", 100, 4, 1)]), "lost_conversions:o1", True),
        (ar.Snapshot(NOW, lost=[ar.OfferLost("o1", 100, 3, 0)]), "lost_conversions:o1", None),
        (ar.Snapshot(NOW, lost=[ar.OfferLost("o1", 100, 2, 0)]), "lost_conversions:o1", False),
        (ar.Snapshot(NOW, lost=[ar.OfferLost("o1", 10, 10, 0)]), "lost_conversions:o1", None),
        (ar.Snapshot(NOW, lost=[ar.OfferLost(None, 50, 0, 50)]),
         "lost_conversions:(no offer)", True),
    ],
)
def test_other_conditions(snapshot: ar.Snapshot, key: str, expected: bool | None) -> None:
    by_key = {c.key: c for c in ar.conditions(snapshot, TH)}
    assert by_key[key].active is expected


def test_texts_of_other_conditions() -> None:
    snap = ar.Snapshot(
        NOW, new_dead_letters=12, dead_letters_by_partner={"p1": 9, "p2": 3},
        dead_letters_by_class={"blocked": 9, "timeout": 3}, retry_backlog=4,
        oldest_due=NOW - timedelta(seconds=1200), circuits={"p1": "open"},
        lost=[ar.OfferLost("o1", 40, 6, 1)])
    msgs = {c.kind: c.message for c in ar.conditions(snap, TH)}
    assert msgs[ar.DEAD_LETTERS] == (
        "Dead letters growing: 12 new in the last 15 min (threshold 10). Top partners: p1 x9, "
        "p2 x3. Top failure classes: blocked x9, timeout x3. Next step: ask the partner to "
        "allowlist our egress IPs: 203.0.113.7, 203.0.113.8; replay once fixed.")
    assert msgs[ar.RETRY_BACKLOG].startswith(
        "Retry backlog overdue: 4 postbacks wait for a retry and the oldest was due 20 min ago "
        "(bound 10 min).")
    assert msgs[ar.CIRCUIT_OPEN].startswith("Circuit opened for partner p1:")
    assert msgs[ar.LOST_CONVERSIONS].startswith(
        "Lost conversions for offer o1: 7 of 40 (17.5%) in the last 15 min (threshold 5.0%): "
        "expired_click x6, unknown_click x1. Next step: conversions arrive after the click "
        "lifespan")


def cond(key: str, active: bool | None) -> ar.Condition:
    return ar.Condition(key=key, kind="k", active=active, message=key)


@pytest.mark.parametrize(
    ("observed", "open_keys", "expected"),
    [
        ([cond("a", True)], set(), [("fire", "a")]),
        ([cond("a", True)], {"a"}, []),                 # still firing: no second message
        ([cond("a", None)], {"a"}, []),                 # hysteresis band: stays open
        ([cond("a", None)], set(), []),                 # ... and does not fire
        ([cond("a", False)], {"a"}, [("resolve", "a")]),
        ([cond("a", False)], set(), []),
        ([], {"gone"}, [("resolve", "gone")]),          # no longer observed: resolves
        ([cond("a", True), cond("b", False)], {"b", "c"},
         [("fire", "a"), ("resolve", "b"), ("resolve", "c")]),
    ],
)
def test_transitions(observed: list[ar.Condition], open_keys: set[str],
                     expected: list[tuple[str, str]]) -> None:
    assert [(t.action, t.key) for t in ar.transitions(observed, open_keys)] == expected


def test_an_episode_fires_once_and_resolves_once_across_a_noisy_series() -> None:
    """A rate hovering around the threshold: one fire, one resolve, no storm."""
    rates = [0, 6, 4, 6, 3, 5, 4, 3, 2, 3, 1, 0, 6]
    open_keys: set[str] = set()
    actions = []
    for i, pct in enumerate(rates):
        snap = ar.Snapshot(NOW + timedelta(minutes=i), [partner_window(100, pct)])
        observed = [c for c in ar.conditions(snap, TH) if c.kind == ar.FAILURE_RATE]
        for t in ar.transitions(observed, open_keys):
            actions.append((i, t.action))
            (open_keys.add if t.action == "fire" else open_keys.discard)(t.key)
    assert actions == [(1, "fire"), (8, "resolve"), (12, "fire")]


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        (None, None, (NOW - timedelta(hours=24), NOW)),
        ("2026-11-25", "2026-11-26", (datetime(2026, 11, 25, tzinfo=UTC),
                                      datetime(2026, 11, 26, tzinfo=UTC))),
        ("2026-11-25T10:00", None, (datetime(2026, 11, 25, 10, tzinfo=UTC), NOW)),
        ("2026-11-25T10:00+01:00", None, (datetime(2026, 11, 25, 9, tzinfo=UTC), NOW)),
        ("2026-11-25T10:00:00Z", "now", (datetime(2026, 11, 25, 10, tzinfo=UTC), NOW)),
        ("30m", None, (NOW - timedelta(minutes=30), NOW)),
        ("7d", "1d", (NOW - timedelta(days=7), NOW - timedelta(days=1))),
        ("2w", None, (NOW - timedelta(weeks=2), NOW)),
        (None, "2026-11-20", (datetime(2026, 11, 19, tzinfo=UTC),
                              datetime(2026, 11, 20, tzinfo=UTC))),
    ],
)
def test_parse_range(since: str | None, until: str | None,
                     expected: tuple[datetime, datetime]) -> None:
    rng = parse_range(since, until, NOW)
    assert (rng.since, rng.until) == expected


@pytest.mark.parametrize(
    ("since", "until", "field", "message"),
    [
        ("yesterday", None, "since", "'yesterday' is not a date (2026-11-25), a time "
                                     "(2026-11-25T10:00) or a duration ago (30m, 24h, 7d)"),
        (None, "5y", "until", "'5y' is not a date"),
        ("1h", "2h", "since", "must be earlier than until"),
    ],
)
def test_parse_range_errors(since: str | None, until: str | None, field: str,
                            message: str) -> None:
    with pytest.raises(RangeError) as info:
        parse_range(since, until, NOW)
    assert info.value.field == field and info.value.errors[0].message.startswith(message)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([7.0], 0.99, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 0.95, 4.0),
        ([float(i) for i in range(1, 101)], 0.95, 95.0),
        ([float(i) for i in range(1, 101)], 0.99, 99.0),
    ],
)
def test_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert nearest_rank(values, q) == expected


@pytest.mark.parametrize(
    ("span", "step"),
    [(3600, 300), (6 * 3600, 900), (24 * 3600, 1800), (7 * 86400, 6 * 3600),
     (30 * 86400, 86400), (400 * 86400, 7 * 86400), (600, 60)],
)
def test_bucket_seconds(span: int, step: int) -> None:
    assert bucket_seconds(span) == step


def test_dashboard_tokens() -> None:
    s = Settings.build(admin_token="admin-secret")
    link = dashboard_link(s, "http://h:8000/", NOW)
    assert link.startswith("http://h:8000/dashboard/session?t=")
    token = link.split("t=", 1)[1]
    assert check_token(s, "link", token, NOW + timedelta(seconds=599))
    assert not check_token(s, "link", token, NOW + timedelta(seconds=601))  # expired
    assert not check_token(s, "session", token, NOW)  # a link is not a session
    assert not check_token(Settings.build(admin_token="other"), "link", token, NOW)
    forged = str(int(NOW.timestamp()) + 10**6) + "." + token.split(".")[1]
    assert not check_token(s, "link", forged, NOW)
    session = make_token(s.with_overrides(dashboard_secret="dash"), "session", NOW, 60)
    assert check_token(s.with_overrides(dashboard_secret="dash"), "session", session, NOW)
    assert not check_token(s, "session", session, NOW)
    assert not check_token(Settings(), "session", "1.abc", NOW)  # no key: nothing is valid


@pytest.mark.parametrize(
    ("settings", "env", "address", "dev", "expected_env"),
    [
        (Settings.build(flower_basic_auth=("ops:pw",)), {}, "0.0.0.0", False,
         {"FLOWER_BASIC_AUTH": "ops:pw"}),
        (Settings.build(flower_basic_auth=("a:1", "b:2")), {}, "0.0.0.0", False,
         {"FLOWER_BASIC_AUTH": "a:1,b:2"}),
        (Settings(), {"FLOWER_BASIC_AUTH": "x:y"}, "0.0.0.0", False,
         {"FLOWER_BASIC_AUTH": "x:y"}),
        (Settings.build(flower_auth=r".*@example\.com", flower_auth_provider="flower.views.auth."
                  "GoogleAuth2LoginHandler", flower_oauth2_key="k", flower_oauth2_secret="s",
                  flower_oauth2_redirect_uri="https://f.example/login"), {}, "0.0.0.0", False,
         {"FLOWER_AUTH": r".*@example\.com",
          "FLOWER_AUTH_PROVIDER": "flower.views.auth.GoogleAuth2LoginHandler",
          "FLOWER_OAUTH2_KEY": "k", "FLOWER_OAUTH2_SECRET": "s",
          "FLOWER_OAUTH2_REDIRECT_URI": "https://f.example/login"}),
        (Settings(), {}, "127.0.0.1", True, {"FLOWER_UNAUTHENTICATED_API": "true"}),
    ],
)
def test_flower_command(settings: Settings, env: dict[str, str], address: str, dev: bool,
                        expected_env: dict[str, str]) -> None:
    argv, extra = flower_command(settings, env, address=address, port=5555, dev=dev)
    assert argv[-3:] == ["flower", f"--address={address}", "--port=5555"]
    assert extra == expected_env
    assert not any("pw" in a or "secret" in a for a in argv)  # credentials never in argv


@pytest.mark.parametrize(
    ("settings", "address", "dev", "message"),
    [
        (Settings(), "0.0.0.0", False, "Flower needs authentication"),
        (Settings(), "127.0.0.1", False, "Flower needs authentication"),
        (Settings(), "0.0.0.0", True, "--dev without authentication listens on loopback only"),
        (Settings.build(flower_basic_auth=("nopassword",)), "0.0.0.0", False,
         "user:password pairs"),
        (Settings.build(flower_auth=".*"), "0.0.0.0", False,
         "Flower OAuth needs POSTBACK_FLOWER_AUTH_PROVIDER, POSTBACK_FLOWER_OAUTH2_KEY"),
    ],
)
def test_flower_refuses_to_run_open(settings: Settings, address: str, dev: bool,
                                    message: str) -> None:
    with pytest.raises(FlowerConfigError) as info:
        flower_command(settings, {}, address=address, port=5555, dev=dev)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59.9, "59 s"), (60, "1 min"), (3599, "59 min"), (32448, "9 h 0 min"),
     (90000, "1 d 1 h")],
)
def test_duration_text(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("age", "expected", "severity"),
    [
        (1800.0, True, "warning"),     # the bound fires
        (3600.0, True, "critical"),    # twice the bound is critical
        (1200.0, None, "warning"),     # between half the bound and the bound: nothing changes
        (899.0, False, "warning"),     # under half the bound: clears
    ],
)
def test_backlog_age_band(age: float, expected: bool | None, severity: str) -> None:
    snap = ar.Snapshot(NOW, backlog_age={"aff-42": (7, age)})
    (c,) = [c for c in ar.conditions(snap, TH) if c.kind == ar.BACKLOG_AGE]
    assert (c.active, c.severity, c.key, c.partner_id) == (expected, severity,
                                                           "backlog_age:aff-42", "aff-42")
    assert c.details == {"postbacks": 7, "age_seconds": age}
    assert "partners health" in c.message


def test_no_backlog_no_backlog_alert() -> None:
    assert [c for c in ar.conditions(ar.Snapshot(NOW), TH) if c.kind == ar.BACKLOG_AGE] == []
