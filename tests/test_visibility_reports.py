"""Delivery reports and the failed-postback export, compared with what the partner server
received and what PostgreSQL holds (real pipeline, real partner, injected clock)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import timedelta

import pytest
import requests
from click.testing import CliRunner
from conftest import ADMIN
from sqlalchemy import select
from support.helpers import NOW
from support.partner import PartnerServer
from support.visibility_seed import PARTNERS, Clock, Scenario, Served, seed

from postback_worker.cli import main
from postback_worker.ops.visibility import figures
from postback_worker.ops.visibility.reports import Scope, delivery_report, failed_postbacks
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import schema
from postback_worker.store.figures import duration_bucket
from postback_worker.store.repo import Store

RANGE = TimeRange(NOW - timedelta(hours=1), NOW + timedelta(hours=1))


@pytest.fixture()
def scenario(store: Store, partner: PartnerServer, pipeline: Pipeline,
             clock: Clock) -> Scenario:
    return seed(store, partner, pipeline, clock)


def db_postbacks(store: Store) -> list[dict[str, object]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(schema.postbacks).where(schema.postbacks.c.id != "pb-testfire")).mappings()]


def db_durations(store: Store) -> list[float]:
    with store.engine.connect() as conn:
        return sorted(float(r[0]) for r in conn.execute(
            select(schema.attempts.c.duration_ms).where(schema.attempts.c.is_test.is_(False))))


def test_delivery_report_matches_partner_and_database(
    store: Store, partner: PartnerServer, scenario: Scenario,
) -> None:
    report = delivery_report(store, Scope(RANGE))
    s = report["summary"]
    received = partner.received()
    rows = db_postbacks(store)
    delivered_ids = {r["id"] for r in rows if r["state"] == "delivered"}
    # Delivered: exactly the postbacks the healthy partner answered 200 for.
    ok_ids = {r.header("X-Postback-Id") for r in received if r.path == "/ok"}
    assert delivered_ids == ok_ids and s["delivered"] == len(ok_ids) == 6
    dead = [r for r in rows if r["state"] == "dead_lettered"]
    assert s["failed"] == len(dead) == 3 + 2 + 1
    assert s["pending"] == 1 and s["skipped"] == 0 and s["postbacks"] == len(rows) == 13
    assert s["success_rate"] == pytest.approx(6 / 12)
    # Attempts and status codes: exactly the requests the partner server answered.
    assert s["attempts"] == len(received)
    assert {r["status_code"]: r["attempts"] for r in report["status_codes"]} == dict(
        scenario.received_status_codes(partner))
    assert s["failed_attempts"] == sum(1 for r in received if r.path != "/ok")
    classes = {r["failure_class"]: r for r in report["failure_classes"]}
    assert classes["partner_5xx"]["attempts"] == sum(1 for r in received if r.path == "/down")
    assert classes["partner_5xx"]["failed_postbacks"] == 3
    assert classes["blocked"]["failed_postbacks"] == 2
    assert classes["config"]["failed_postbacks"] == 1
    assert classes["delivered"]["attempts"] == 6
    # Response times: nearest-rank percentiles of the recorded (non-test) durations, each
    # rounded up to two significant digits (the rollups' histogram buckets).
    durations = db_durations(store)
    bucketed = sorted(duration_bucket(d) for d in durations)
    assert s["response_ms"] == {
        "p50": figures.nearest_rank(bucketed, 0.5),
        "p95": figures.nearest_rank(bucketed, 0.95),
        "p99": figures.nearest_rank(bucketed, 0.99),
    }
    assert max(durations) < 9999.0  # the test fire's duration is not among them
    # Partners, worst first; every figure per partner matches the partner server.
    order = [p["partner_id"] for p in report["partners"]]
    assert order == ["p-down", "p-blocked", "p-gone", "p-ok"]
    for p in report["partners"]:
        path = PARTNERS[p["partner_id"]][0]
        assert p["attempts"] == sum(1 for r in received if r.path == path)
    by_id = {p["partner_id"]: p for p in report["partners"]}
    assert by_id["p-ok"]["failure_rate"] == 0.0 and by_id["p-ok"]["delivered"] == 6
    assert by_id["p-down"]["failed"] == 3 and by_id["p-down"]["pending"] == 1
    assert by_id["p-blocked"]["status_codes"] == {"403": 2}
    # Lost conversions per offer (the test fire's conversion is not counted).
    lost = {r["offer_id"]: r for r in report["lost_conversions"]}
    assert lost["o2"] == {"offer_id": "o2", "conversions": 2, "expired_click": 2,
                          "unknown_click": 0, "lost": 2, "lost_rate": 1.0, "too_soon": 0,
                          "too_late": 0, "capped": 0, "ip_not_allowed": 0, "refused": 0}
    assert lost["o1"]["unknown_click"] == 1 and lost["o1"]["conversions"] == 6 + 3 + 2 + 1 + 1 + 1


def test_report_filters_by_partner_offer_and_range(store: Store, scenario: Scenario) -> None:
    only = delivery_report(store, Scope(RANGE, partner_id="p-blocked"))
    assert only["summary"]["postbacks"] == 2 and only["summary"]["failed"] == 2
    assert [p["partner_id"] for p in only["partners"]] == ["p-blocked"]
    o2 = delivery_report(store, Scope(RANGE, offer_id="o2"))
    assert o2["summary"]["postbacks"] == 0
    assert [r["offer_id"] for r in o2["lost_conversions"]] == ["o2"]
    later = delivery_report(store, Scope(TimeRange(NOW + timedelta(hours=1),
                                                   NOW + timedelta(hours=2))))
    assert later["summary"]["postbacks"] == 0 and later["summary"]["success_rate"] is None


def test_failed_export_lists_every_dead_letter_with_what_the_partner_saw(
    store: Store, partner: PartnerServer, scenario: Scenario,
) -> None:
    rows = list(failed_postbacks(store, Scope(RANGE)))
    dead = {r["id"]: r for r in db_postbacks(store) if r["state"] == "dead_lettered"}
    assert {r["postback_id"] for r in rows} == set(dead)
    requests_per_postback = Counter(partner.postback_ids())
    for row in rows:
        pb = dead[row["postback_id"]]
        assert row["attempts"] == requests_per_postback[row["postback_id"]] == pb["attempts"]
        assert row["last_status"] == pb["last_status"]
        assert row["transaction_id"] == f"tx-{row['partner_id']}-" + row["transaction_id"][-1]
        assert row["conversion_id"] == pb["conversion_id"] and row["error"] == pb["reason"]
    by_partner = Counter(r["partner_id"] for r in rows)
    assert by_partner == {"p-down": 3, "p-blocked": 2, "p-gone": 1}
    assert {r["last_class"] for r in rows if r["partner_id"] == "p-gone"} == {"config"}


def test_cli_report_and_failed_csv(settings: Settings, store: Store, partner: PartnerServer,
                                   scenario: Scenario) -> None:
    env = settings.to_env()
    args = ["--since", RANGE.since.isoformat(), "--until", RANGE.until.isoformat()]
    runner = CliRunner()
    out = runner.invoke(main, ["report", "failed", *args, "--format", "csv"], env=env)
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert len(rows) == 6
    assert set(rows[0]) == {"postback_id", "conversion_id", "transaction_id", "offer_id",
                            "partner_id", "last_status", "last_class", "attempts",
                            "created_at", "last_attempt_at", "error", "url"}
    down = [r for r in rows if r["partner_id"] == "p-down"]
    assert {r["attempts"] for r in down} == {"4"} and {r["last_status"] for r in down} == {"503"}
    assert "HTTP 503 from partner" in down[0]["error"]
    out = runner.invoke(main, ["report", *args, "--format", "json"], env=env)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["summary"]["delivered"] == 6 and data["summary"]["failed"] == 6
    out = runner.invoke(main, ["report", *args], env=env)
    assert out.exit_code == 0, out.output
    assert "postbacks 13: delivered 6, failed 6, pending 1, skipped 0; success rate 50.0%" \
        in out.output
    assert out.output.index("p-down") < out.output.index("p-ok")
    out = runner.invoke(main, ["report", *args, "--format", "csv"], env=env)
    tidy = list(csv.DictReader(io.StringIO(out.output)))
    assert {"section": "summary", "key": "", "metric": "delivered", "value": "6"} in tidy
    assert {"section": "status_code", "key": "403", "metric": "attempts", "value": "2"} in tidy


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--since", "yesterday"], "error: --since: 'yesterday' is not a date"),
        (["report", "failed", "--until", "2026-13-01"], "error: --until: '2026-13-01' is not"),
        (["report", "--since", "2026-11-26", "--until", "2026-11-25"],
         "error: --since: must be earlier than until"),
    ],
)
def test_cli_bad_range_exits_2(settings: Settings, args: list[str], message: str) -> None:
    out = CliRunner().invoke(main, args, env=settings.to_env())
    assert out.exit_code == 2
    assert message in out.stderr and out.stdout == ""


def test_api_reports(settings: Settings, store: Store, partner: PartnerServer,
                     scenario: Scenario) -> None:
    params = {"since": RANGE.since.isoformat(), "until": RANGE.until.isoformat()}
    with Served(settings) as api:
        assert requests.get(f"{api}/v1/reports/delivery", params=params).status_code == 401
        r = requests.get(f"{api}/v1/reports/delivery", params=params, headers=ADMIN)
        assert r.status_code == 200
        assert r.json() == json.loads(json.dumps(delivery_report(store, Scope(RANGE)),
                                                 default=_iso))
        r = requests.get(f"{api}/v1/reports/failed", headers=ADMIN,
                         params={**params, "partner": "p-blocked", "format": "csv"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert len(rows) == 2 and {x["last_status"] for x in rows} == {"403"}
        r = requests.get(f"{api}/v1/reports/failed", headers=ADMIN, params=params)
        assert r.json()["count"] == 6 and r.json()["truncated"] is False
        r = requests.get(f"{api}/v1/reports/failed", headers=ADMIN, params={**params,
                                                                            "limit": "2"})
        assert r.json()["count"] == 2 and r.json()["truncated"] is True
        r = requests.get(f"{api}/v1/reports/delivery", headers=ADMIN,
                         params={"since": "soon", "format": "xml", "color": "red"})
        assert r.status_code == 422
        assert {e["field"] for e in r.json()["errors"]} == {"color"}
        r = requests.get(f"{api}/v1/reports/delivery", headers=ADMIN,
                         params={"since": "soon"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "since"
        r = requests.get(f"{api}/v1/reports/failed", headers=ADMIN, params={"format": "xml"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "format"


def _iso(value: object) -> str:
    from datetime import datetime

    assert isinstance(value, datetime)
    return value.isoformat().replace("+00:00", "Z")
