"""Configuration audit against a real database with a fixed clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import insert
from support.helpers import NOW, add_offer, add_partner

from postback_worker.ops.security.audit import run_audit
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store

DAY = timedelta(days=1)
_seq = iter(range(10**6))


def _postbacks(store: Store, partner_id: str, outcomes: list[str], at: Any,
               is_test: bool = False) -> None:
    """One conversion+postback+attempt per outcome ("delivered" or a failure class)."""
    with store.engine.begin() as conn:
        for i, outcome in enumerate(outcomes):
            n = next(_seq)
            cid, pid = f"cv_{partner_id}_{n}", f"pb_{partner_id}_{n}"
            conn.execute(insert(t.conversions).values(
                id=cid, transaction_id=f"tx{i}", offer_id="o-ok", aff_id=partner_id, goal_id="",
                status="approved", occurred_at=at, received_at=at,
                state="test" if is_test else "attributed"))
            conn.execute(insert(t.postbacks).values(
                id=pid, conversion_id=cid, partner_id=partner_id, url="https://x/", method="GET",
                state="test" if is_test else
                ("delivered" if outcome == "delivered" else "dead_lettered"),
                attempts=1, received_at=at, created_at=at, updated_at=at,
                delivered_at=at if outcome == "delivered" else None))
            conn.execute(insert(t.attempts).values(
                postback_id=pid, attempt_no=1, started_at=at, duration_ms=5.0, url="https://x/",
                status_code=200 if outcome == "delivered" else 503, failure_class=outcome,
                is_test=is_test))


def _conversions(store: Store, offer_id: str, states: list[str]) -> None:
    with store.engine.begin() as conn:
        conn.execute(insert(t.conversions), [
            {"id": f"cv_{offer_id}_{i}", "transaction_id": f"t{i}", "offer_id": offer_id,
             "goal_id": "", "status": "approved", "occurred_at": NOW - DAY,
             "received_at": NOW - DAY, "state": s} for i, s in enumerate(states)])


def test_audit_finds_every_kind_of_problem(store: Store, settings: Settings) -> None:
    add_offer(store, "o-ok", "lead_gen")
    add_offer(store, "o-long", "lead_gen", lifespan_days=45)
    store.upsert_offer({**add_offer(store, "o-old", "ecommerce"),
                        "updated_at": NOW - 120 * DAY})
    add_offer(store, "o-expiring", "b2b_saas")
    _conversions(store, "o-expiring", ["expired_click"] * 6 + ["attributed"] * 24)

    add_partner(store, "p-ok", "https://ok.example")
    _postbacks(store, "p-ok", ["delivered"] * 30, NOW - DAY)
    bad = add_partner(store, "p-bad-template", "https://bad.example")
    store.upsert_partner({**bad, "postback_url": "https://bad.example/pb?tid=#tid#"})
    add_partner(store, "p-failing", "https://failing.example")
    _postbacks(store, "p-failing", ["delivered"] * 10 + ["partner_5xx"] * 20, NOW - DAY)
    add_partner(store, "p-silent", "https://silent.example")
    _postbacks(store, "p-silent", ["delivered"], NOW - 30 * DAY)
    _postbacks(store, "p-silent", ["timeout"] * 3, NOW - DAY)
    store.upsert_partner({**add_partner(store, "p-paused", "https://paused.example"),
                          "paused": True, "paused_at": NOW - 10 * DAY,
                          "paused_reason": "partner migration"})
    store.upsert_partner({**add_partner(store, "p-off", "https://off.example"),
                          "enabled": False, "updated_at": NOW - 20 * DAY})
    add_partner(store, "p-tests-only", "https://tests.example")
    _postbacks(store, "p-tests-only", ["delivered"] * 5, NOW - DAY, is_test=True)

    report = run_audit(store, settings, NOW)
    found = {(f.severity, f.object_id, f.check) for f in report.findings}
    assert found == {
        ("warning", "o-long", "lifespan"),
        ("warning", "o-expiring", "expired_clicks"),
        ("info", "o-old", "unchanged"),
        ("error", "p-bad-template", "template"),
        ("warning", "p-bad-template", "template"),  # no {transaction_id}
        ("warning", "p-bad-template", "no_delivery"),
        ("error", "p-failing", "failure_rate"),
        ("error", "p-silent", "no_delivery"),
        ("warning", "p-paused", "paused"),
        ("warning", "p-paused", "no_delivery"),
        ("warning", "p-off", "disabled"),
        ("warning", "p-tests-only", "no_delivery"),  # test fires are not deliveries
    }
    messages = {(f.object_id, f.check): f.message for f in report.findings
                if f.severity != "warning" or f.check != "template"}
    assert messages[("o-long", "lifespan")] == (
        "click session lifespan is 45 days; 7-14 days is recommended for lead_gen")
    assert messages[("o-expiring", "expired_clicks")].startswith(
        "6 of 30 conversions in the last 30 days (20%) came after the 90-day lifespan")
    assert messages[("p-failing", "failure_rate")] == (
        "20 of 30 attempts in the last 7 days failed (67%)")
    assert messages[("p-silent", "no_delivery")] == (
        "no successful delivery in 7 days (not for 30 days) despite 3 attempts")
    assert messages[("p-paused", "paused")] == (
        "paused for 10 days (partner migration); its postbacks are waiting")
    assert messages[("p-bad-template", "template")].startswith(
        "postback_url position 27: #tid# is another tracker's macro syntax")
    assert report.errors == 3
    assert [f.severity for f in report.findings] == sorted(
        (f.severity for f in report.findings), key=("error", "warning", "info").index)
    data = report.to_dict()
    assert data["counts"] == {"error": 3, "warning": 8, "info": 1}
    assert (data["offers"], data["partners"]) == (4, 7)


def test_clean_configuration_has_no_errors(store: Store, settings: Settings) -> None:
    add_offer(store, "o-ok", "ecommerce")
    add_partner(store, "p-ok", "https://ok.example")
    _postbacks(store, "p-ok", ["delivered"], NOW - DAY)
    report = run_audit(store, settings, NOW)
    assert report.findings == [] and report.errors == 0
    # 100 days later the same configuration is stale and the partner silent.
    later = run_audit(store, settings, NOW + 100 * DAY)
    assert {(f.object_id, f.check) for f in later.findings} == {
        ("o-ok", "unchanged"), ("p-ok", "unchanged"), ("p-ok", "no_delivery")}
    assert later.errors == 0
