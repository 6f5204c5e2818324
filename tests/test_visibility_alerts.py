"""Alert evaluation against PostgreSQL and Redis, a local HTTP server as the webhook, the
history (CLI and API), and the beat task in real Celery worker and beat processes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis
import requests
from click.testing import CliRunner
from conftest import ADMIN, Proc, wait_until
from support.helpers import add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer
from support.visibility_seed import Clock, Scenario, Served, seed

from postback_worker.cli import main
from postback_worker.ops.visibility.alerts import evaluate, list_alerts
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

EGRESS = ("203.0.113.7", "203.0.113.8")


@pytest.fixture()
def webhook() -> Iterator[PartnerServer]:
    with PartnerServer() as server:
        yield server


@pytest.fixture()
def alert_settings(settings: Settings, webhook: PartnerServer) -> Settings:
    return settings.with_overrides(
        alert_min_volume=2, alert_dead_letter_growth=5, alert_lost_rate=0.10,
        alert_lost_min_volume=2, alert_webhook_url=f"{webhook.url}/hooks/T000/B000/secret",
        egress_ips=EGRESS)


@pytest.fixture()
def scenario(store: Store, partner: PartnerServer, pipeline: Pipeline,
             clock: Clock) -> Scenario:
    return seed(store, partner, pipeline, clock)


def posted_texts(webhook: PartnerServer) -> list[str]:
    out = []
    for r in webhook.received():
        assert r.method == "POST" and r.header("Content-Type") == "application/json"
        body = json.loads(r.body)
        assert set(body) == {"text"}
        out.append(body["text"])
    return out


def test_alerts_fire_once_resolve_once_and_reach_the_webhook(
    alert_settings: Settings, store: Store, partner: PartnerServer, webhook: PartnerServer,
    scenario: Scenario, clock: Clock, pipeline: Pipeline, redis_client: redis.Redis,
) -> None:
    redis_client.hset("pbw:circuit:p-down", "state", "open")
    fired_at = clock()
    events = evaluate(alert_settings, store, redis_client, now=fired_at)
    fired = {e.key: e for e in events}
    assert all(e.action == "fire" for e in events)
    assert set(fired) == {"failure_rate:p-down", "failure_rate:p-blocked", "dead_letters_growing",
                          "circuit_open:p-down", "lost_conversions:o2"}
    # p-gone (1 attempt) is under the minimum volume; o1 loses 1 of 14 (under 10%).
    assert fired["failure_rate:p-down"].text == (
        "FIRING (critical): Partner p-down: 100.0% of 13 postback attempts failed in the last "
        "15 min (threshold 5.0%). Top status codes: 503 x13. Top failure classes: partner_5xx "
        "x13. Next step: contact the partner: their endpoint returns server errors; retries "
        "continue.")
    assert "Top status codes: 403 x2" in fired["failure_rate:p-blocked"].text
    assert ("Next step: ask the partner to allowlist our egress IPs: 203.0.113.7, 203.0.113.8."
            in fired["failure_rate:p-blocked"].text)
    assert "6 new in the last 15 min" in fired["dead_letters_growing"].text
    texts = posted_texts(webhook)
    assert sorted(texts) == sorted(e.text for e in events)
    assert {r.path for r in webhook.received()} == {"/hooks/T000/B000/secret"}

    # Evaluating again, and again a minute later: nothing new (no storm), history unchanged.
    assert evaluate(alert_settings, store, redis_client, now=clock()) == []
    clock.advance(60)
    assert evaluate(alert_settings, store, redis_client, now=clock()) == []
    assert len(webhook.received()) == len(events)
    open_rows = list_alerts(store, state="open")
    assert len(open_rows) == len(events)
    assert all(r["last_evaluated_at"] == clock() for r in open_rows)

    # Recovery: the circuit closes, the old failures leave the window, p-down answers 200.
    redis_client.hset("pbw:circuit:p-down", "state", "closed")
    clock.advance(alert_settings.alerts.window_seconds)
    partner.route("/down", 200)
    pipeline.deliver(pipeline.sweep())  # the late p-down postback, now delivered
    recovered = []
    for i in range(3):
        add_click(store, f"tx-p-down-ok-{i}", aff_id="p-down")
        recovered.append(conversion(f"tx-p-down-ok-{i}", now=clock()))
    pipeline.process_conversions(messages(*recovered))
    events = evaluate(alert_settings, store, redis_client, now=clock())
    resolved = {e.key: e for e in events}
    assert all(e.action == "resolve" for e in events)
    assert set(resolved) == set(fired)
    assert resolved["failure_rate:p-down"].text == (
        "RESOLVED: failure_rate:p-down (firing since 2026-11-26 12:00 UTC): now partner p-down "
        "failure rate 0.0% of 4 attempts in the last 15 min.")
    assert resolved["failure_rate:p-blocked"].text.endswith(
        "): no longer observed (no traffic in the window).")
    assert evaluate(alert_settings, store, redis_client, now=clock()) == []
    assert len(webhook.received()) == 2 * len(fired)
    history = list_alerts(store)
    assert len(history) == len(fired) and {r["state"] for r in history} == {"resolved"}
    row = next(r for r in history if r["key"] == "failure_rate:p-down")
    assert row["started_at"] == fired_at and row["resolved_at"] == clock()
    assert row["details"]["status_codes"] == {"503": 13}


def test_webhook_failure_is_logged_and_the_alert_still_recorded(
    alert_settings: Settings, store: Store, scenario: Scenario, clock: Clock,
    redis_client: redis.Redis, webhook: PartnerServer, caplog: pytest.LogCaptureFixture,
) -> None:
    webhook.set_response(500)
    events = evaluate(alert_settings, store, redis_client, now=clock())
    assert events and len(list_alerts(store, state="open")) == len(events)
    assert f"alert webhook at 127.0.0.1:{webhook.port} answered HTTP 500" in caplog.text
    assert "B000" not in caplog.text  # the webhook's secret path is never logged


def test_alerts_list_cli_and_api(alert_settings: Settings, store: Store, scenario: Scenario,
                                 clock: Clock, redis_client: redis.Redis) -> None:
    evaluate(alert_settings, store, redis_client, now=clock())
    out = CliRunner().invoke(main, ["alerts", "list", "--state", "open"],
                             env=alert_settings.to_env())
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0].split() == ["ID", "STATE", "SEVERITY", "KIND",
                                                  "PARTNER_ID", "STARTED_AT", "RESOLVED_AT",
                                                  "MESSAGE"]
    assert "Partner p-blocked: 100.0% of 2 postback attempts failed" in out.output
    out = CliRunner().invoke(main, ["alerts", "list", "--format", "json", "--partner",
                                    "p-down"], env=alert_settings.to_env())
    assert {r["kind"] for r in json.loads(out.output)} == {"failure_rate"}
    out = CliRunner().invoke(main, ["alerts", "list", "--state", "closed"],
                             env=alert_settings.to_env())
    assert out.exit_code == 2
    with Served(alert_settings) as api:
        assert requests.get(f"{api}/v1/alerts").status_code == 401
        r = requests.get(f"{api}/v1/alerts", params={"state": "open"}, headers=ADMIN)
        assert r.status_code == 200
        assert {a["key"] for a in r.json()["alerts"]} == {
            "failure_rate:p-down", "failure_rate:p-blocked", "dead_letters_growing",
            "lost_conversions:o2"}
        r = requests.get(f"{api}/v1/alerts", params={"state": "closed", "limit": "0"},
                         headers=ADMIN)
        assert r.status_code == 422
        assert {e["field"] for e in r.json()["errors"]} == {"state", "limit"}


@pytest.mark.e2e
def test_beat_task_evaluates_alerts_in_real_processes(
    settings: Settings, store: Store, partner: PartnerServer, webhook: PartnerServer,
    celery_procs: Callable[..., Proc], make_pipeline: Callable[..., Pipeline],
) -> None:
    """Beat schedules the evaluation every half second; the alert fires once, not each time."""
    add_offer(store, "o1")
    add_partner(store, "p-blocked", partner.url, path="/blocked")
    partner.route("/blocked", 403)
    live = Clock(datetime.now(UTC))
    p = make_pipeline(settings, clock=lambda: datetime.now(UTC))
    for i in range(3):
        add_click(store, f"tx-live-{i}", aff_id="p-blocked")
    p.process_conversions(messages(*[conversion(f"tx-live-{i}", now=live()) for i in range(3)]))
    overrides = {"alert_interval": 0.5, "alert_min_volume": 3, "egress_ips": EGRESS,
                 "alert_webhook_url": f"{webhook.url}/hook"}
    celery_procs("worker", **overrides)
    celery_procs("beat", **overrides)
    wait_until(lambda: webhook.count() >= 1, 60, message="the alert webhook to be called")
    first = list_alerts(store, state="open")
    assert [r["key"] for r in first] == ["failure_rate:p-blocked"]
    seen = first[0]["last_evaluated_at"]
    # Several more evaluations happen; the alert is neither fired again nor duplicated.
    for _ in range(2):
        wait_until(lambda s=seen: list_alerts(store)[0]["last_evaluated_at"] > s, 60,
                   message="another evaluation")
        seen = list_alerts(store)[0]["last_evaluated_at"]
    assert len(list_alerts(store)) == 1 and webhook.count() == 1
    (text,) = posted_texts(webhook)
    assert text.startswith("FIRING (critical): Partner p-blocked: 100.0% of 3 postback "
                           "attempts failed") and "203.0.113.7, 203.0.113.8" in text


def test_backlog_age_alert_fires_for_the_waiting_partner_and_resolves_when_delivered(
    alert_settings: Settings, store: Store, partner: PartnerServer, webhook: PartnerServer,
    scenario: Scenario, clock: Clock, pipeline: Pipeline, redis_client: redis.Redis,
) -> None:
    th = alert_settings.with_overrides(alert_backlog_age_seconds=120)
    assert not [e for e in evaluate(th, store, redis_client, now=clock())
                if e.kind == "backlog_age"]  # p-down's late postback is new
    clock.advance(121)
    events = [e for e in evaluate(th, store, redis_client, now=clock()) if e.kind == "backlog_age"]
    assert [(e.action, e.key, e.partner_id) for e in events] == [
        ("fire", "backlog_age:p-down", "p-down")]
    assert "the oldest of its 1 undelivered postbacks was created 2 min ago" in events[0].text
    assert events[0].text in posted_texts(webhook)
    partner.route("/down", 200)
    clock.advance(60)
    pipeline.deliver(pipeline.sweep())
    events = [e for e in evaluate(th, store, redis_client, now=clock()) if e.kind == "backlog_age"]
    assert [(e.action, e.key) for e in events] == [("resolve", "backlog_age:p-down")]
    assert events[0].text.endswith("no longer observed (no traffic in the window).")
