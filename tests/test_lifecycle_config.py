"""Lifecycle options of offers and partners: parsing, CLI, API, validate, test-fire, audit."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from conftest import ADMIN
from support.helpers import NOW, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.cli import main
from postback_worker.domain.events import ValidationError
from postback_worker.ops.config import OFFER_FIELDS, PARTNER_FIELDS, parse_offer, parse_partner
from postback_worker.ops.security.audit import run_audit
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

URL = "https://p.example/pb?tid={transaction_id}&s={status}"


@pytest.mark.parametrize("given, expected", [
    ({}, {"duplicate_mode": "update", "allow_multiple": False, "hold_hours": None,
          "payout_rules": None}),
    ({"allow_multiple": True}, {"duplicate_mode": "separate", "allow_multiple": True}),
    ({"duplicate_mode": "ignore", "allow_multiple": True},
     {"duplicate_mode": "ignore", "allow_multiple": False}),
    ({"hold_hours": 24}, {"hold_hours": 24.0}),
    ({"payout_rules": {"*": "percent:40", "p1": "Fixed:2.50"}},
     {"payout_rules": '{"*": "percent:40", "p1": "fixed:2.5"}'}),
    ({"payout_rules": "p1=percent:10, *=advertiser"},
     {"payout_rules": '{"*": "advertiser", "p1": "percent:10"}'}),
])
def test_offer_options(given: dict[str, Any], expected: dict[str, Any]) -> None:
    row = parse_offer({"id": "o1", **given}, NOW)
    assert {k: row[k] for k in expected} == expected


@pytest.mark.parametrize("given, field, message", [
    ({"duplicate_mode": "increment"}, "duplicate_mode", "must be one of update, ignore, separate"),
    ({"hold_hours": -1}, "hold_hours", "must be between 0 and 2160"),
    ({"hold_hours": 5000}, "hold_hours", "must be between 0 and 2160"),
    ({"payout_rules": {"p1": "half"}}, "payout_rules", "p1: must be advertiser, fixed:AMOUNT"),
    ({"payout_rules": {"bad id": "fixed:1"}}, "payout_rules", "'bad id' is not a partner id"),
    ({"payout_rules": "p1"}, "payout_rules", "'p1' is not key=value"),
    ({"payout_rules": [1]}, "payout_rules", "must be an object of strings or key=value pairs"),
])
def test_offer_options_refused(given: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_offer({"id": "o1", **given}, NOW)
    assert any(e.field == field and e.message.startswith(message) for e in err.value.errors), \
        err.value.errors


@pytest.mark.parametrize("given, expected", [
    ({}, {"fire_events": "approved", "templates": None, "status_map": None,
          "payout_rule": None, "hold_hours": None}),
    ({"fire_events": "reversal, approved,adjustment"},
     {"fire_events": "adjustment,approved,reversal"}),
    ({"fire_events": ["status"]}, {"fire_events": "status"}),
    ({"templates": {"reversal": "https://p.example/rev?tid={transaction_id}&e={event}"}},
     {"templates": '{"reversal": "https://p.example/rev?tid={transaction_id}&e={event}"}'}),
    ({"status_map": "approved=sale pending=lead"},
     {"status_map": '{"approved": "sale", "pending": "lead"}'}),
    ({"status_map": {"rejected": "refund"}}, {"status_map": '{"rejected": "refund"}'}),
    ({"payout_rule": "percent:40"}, {"payout_rule": "percent:40"}),
    ({"hold_hours": 0}, {"hold_hours": 0.0}),
])
def test_partner_options(given: dict[str, Any], expected: dict[str, Any]) -> None:
    row = parse_partner({"id": "p1", "postback_url": URL, **given}, NOW)
    assert {k: row[k] for k in expected} == expected


@pytest.mark.parametrize("given, field, message", [
    ({"fire_events": "approved,refund"}, "fire_events", "unknown 'refund'"),
    ({"templates": {"refund": URL}}, "templates", "'refund' is not an event"),
    ({"templates": {"reversal": "https://p.example/r?t=[transaction_id]"}},
     "templates.reversal", "position 22: [transaction_id] is another tracker's macro syntax"),
    ({"status_map": "approved"}, "status_map", "'approved' is not key=value"),
    ({"status_map": {"Approved!": "sale"}}, "status_map", "'Approved!' is not a status"),
    ({"status_map": {"approved": ""}}, "status_map", "approved: the name must be 1 to 64"),
    ({"payout_rule": "percent:x"}, "payout_rule", "'x' is not a number"),
    ({"hold_hours": "soon"}, "hold_hours", "must be a number"),
])
def test_partner_options_refused(given: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_partner({"id": "p1", "postback_url": URL, **given}, NOW)
    assert any(e.field == field and e.message.startswith(message) for e in err.value.errors), \
        err.value.errors


def test_schemas_list_the_new_options() -> None:
    assert {"duplicate_mode", "hold_hours", "payout_rules"} <= OFFER_FIELDS
    assert {"fire_events", "templates", "status_map", "payout_rule", "hold_hours"} <= \
        PARTNER_FIELDS


# -- CLI ---------------------------------------------------------------------------------------

@pytest.fixture()
def cli(store: Store, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("POSTBACK_ALLOW_NETWORKS", "127.0.0.0/8,::1/128")
    return CliRunner()


def test_cli_offers_and_partners_add_lifecycle_options(cli: CliRunner, store: Store) -> None:
    r = cli.invoke(main, ["offers", "add", "--id", "o1", "--hold-hours", "24",
                          "--payout-rule", "*=percent:40", "--payout-rule", "p2=fixed:3"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "offer o1: ecommerce, lifespan 30 days, hold 24 h"
    offer = store.get_offer("o1")
    assert offer is not None
    assert json.loads(offer["payout_rules"]) == {"*": "percent:40", "p2": "fixed:3"}
    r = cli.invoke(main, [
        "partners", "add", "--id", "p1", "--url", URL,
        "--fire-events", "approved,reversal,adjustment",
        "--template", "reversal=https://p.example/refund?tid={transaction_id}&was={previous_status}",
        "--status-map", "approved=sale,rejected=refund", "--payout-rule", "percent:50",
        "--hold-hours", "0"])
    assert r.exit_code == 0, r.output
    row = store.get_partner("p1")
    assert row is not None
    assert (row["fire_events"], row["payout_rule"], row["hold_hours"]) == (
        "adjustment,approved,reversal", "percent:50", 0.0)
    assert json.loads(row["templates"]) == {
        "reversal": "https://p.example/refund?tid={transaction_id}&was={previous_status}"}
    assert json.loads(row["status_map"]) == {"approved": "sale", "rejected": "refund"}


@pytest.mark.parametrize("args, message", [
    (["offers", "add", "--id", "o1", "--payout-rule", "*=half"],
     "payout_rules: *: must be advertiser, fixed:AMOUNT or percent:P"),
    (["partners", "add", "--id", "p1", "--url", URL, "--fire-events", "refund"],
     "fire_events: unknown 'refund'"),
    (["partners", "add", "--id", "p1", "--url", URL, "--template", "reversal"],
     "--template 'reversal': write EVENT=URL"),
])
def test_cli_refuses_bad_options(cli: CliRunner, args: list[str], message: str) -> None:
    r = cli.invoke(main, args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_cli_validate_and_test_fire_per_event(cli: CliRunner, store: Store,
                                              partner: PartnerServer) -> None:
    add_partner(store, "p1", partner.url, path="/sale",
                fire_events="approved,reversal,adjustment",
                templates={"reversal": f"{partner.url}/refund?tid={{transaction_id}}"
                                       "&s={status}&was={previous_status}&e={event}"
                                       "&p={payout}&r={revenue}"},
                status_map="approved=sale,reversed=refund", payout_rule="percent:50")
    r = cli.invoke(main, ["partners", "validate", "p1", "--event", "reversal", "--no-dns"])
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith(f"{partner.url}/refund?")
    r = cli.invoke(main, ["partners", "test", "p1", "--event", "reversal", "--fire",
                          "--payout", "4"])
    assert r.exit_code == 0, r.output
    (got,) = partner.received()
    assert got.path == "/refund"
    assert {k: v[0] for k, v in got.query.items()} == {
        "tid": "tx_test_0001", "s": "refund", "was": "sale", "e": "reversal", "p": "5.00",
        "r": "4"}
    r = cli.invoke(main, ["partners", "test", "p1", "--event", "adjustment"])
    assert r.exit_code == 0 and f"GET {partner.url}/sale?" in r.output  # no own template


# -- API ---------------------------------------------------------------------------------------

@pytest.fixture()
def api(serve: Callable[[Settings], str], settings: Settings, store: Store) -> str:
    return serve(settings)


def test_api_offers_and_partners_with_lifecycle_options(api: str, store: Store) -> None:
    admin = requests.Session()
    admin.headers.update(ADMIN)
    r = admin.post(f"{api}/v1/offers", json={"id": "o1", "duplicate_mode": "separate",
                                             "hold_hours": 48, "payout_rules": {"*": "fixed:1"}})
    assert r.status_code == 201, r.text
    assert (r.json()["duplicate_mode"], r.json()["allow_multiple"], r.json()["hold_hours"]) == (
        "separate", True, 48.0)
    r = admin.post(f"{api}/v1/partners", json={
        "id": "p1", "postback_url": URL, "fire_events": ["approved", "reversal"],
        "templates": {"reversal": "https://p.example/r?tid={transaction_id}&secret=abc"},
        "status_map": {"approved": "sale"}, "payout_rule": "percent:30", "hold_hours": 12})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["fire_events"] == "approved,reversal" and body["hold_hours"] == 12.0
    assert "abc" not in body["templates"]  # secrets in templates are masked like the URL
    r = admin.post(f"{api}/v1/partners", json={"id": "p2", "postback_url": URL,
                                               "fire_events": "sale", "payout_rule": "all"})
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["errors"]}
    assert fields == {"fire_events", "payout_rule"}
    r = admin.get(f"{api}/v1/partners/p1/validate", params={"event": "reversal"})
    assert r.status_code == 200 and r.json()["url"].startswith("https://p.example/r?")
    r = admin.get(f"{api}/v1/partners/p1/validate", params={"event": "refund"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "event"
    r = admin.post(f"{api}/v1/partners/p1/test", json={"event": "approved"})
    assert r.status_code == 200
    assert r.json()["values"]["status"] == "sale" and r.json()["values"]["event"] == "approved"
    schema = requests.get(f"{api}/openapi.json").json()
    props = schema["paths"]["/v1/partners"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]
    assert {"fire_events", "templates", "status_map", "payout_rule", "hold_hours"} <= set(props)


# -- audit -------------------------------------------------------------------------------------

def test_audit_knows_lifecycle_options(store: Store, settings: Settings) -> None:
    add_offer(store, "o1", payout_rules={"ghost": "fixed:1", "p1": "fixed:2"})
    add_partner(store, "p1", "https://p.example", fire_events="approved,reversal",
                status_map="approved=sale")  # no {status}/{event}, no reversal template
    add_partner(store, "p2", "https://p.example", fire_events="approved,adjustment",
                templates={"adjustment": "http://p.example/adj?tid={transaction_id}&x={event}"})
    report = run_audit(store, settings, NOW)
    found = {(f.object_id, f.check, f.severity): f.message for f in report.findings
             if f.check in {"payout_rules", "events", "status_map", "template"}}
    assert found[("o1", "payout_rules", "warning")] == (
        "payout rule for partner 'ghost', which does not exist")
    assert found[("p1", "events", "warning")] == (
        "fires on reversal but its postback_url has no {event} or {status} and there is no "
        "reversal template: the partner cannot tell it from an approved conversion")
    assert found[("p1", "status_map", "info")] == (
        "status_map is set but no template uses {status} or {previous_status}")
    assert found[("p2", "template", "warning")].startswith(
        "templates.adjustment position 0: plain http")
    assert ("p2", "events", "warning") not in found


def test_config_history_masks_template_secrets(store: Store) -> None:
    add_partner(store, "p1", "https://p.example",
                templates={"reversal": "https://p.example/r?tid={transaction_id}&token=s3cr3t"})
    (saved,) = store.config_history("partner", "p1")
    assert "s3cr3t" not in saved["snapshot"]
    assert "reversal" in json.loads(json.loads(saved["snapshot"])["templates"])
