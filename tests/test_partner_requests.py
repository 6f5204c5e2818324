"""Methods, bodies and custom headers end to end: the pipeline against a real local partner,
the admin API, test-fire, audit, dlq show and the support bundle; secrets never shown."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import redis
import requests
from click.testing import CliRunner
from conftest import ADMIN
from support.helpers import NOW, Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.cli import main
from postback_worker.delivery.sender import Sender
from postback_worker.ops.config import redact_partner
from postback_worker.ops.oncall import bundle
from postback_worker.ops.oncall import deadletters as dlq_ops
from postback_worker.ops.security.audit import run_audit
from postback_worker.ops.security.testfire import run_test_fire
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

API_KEY = "k-very-secret-123"
JSON_BODY = ('{"click_id": "{transaction_id}", "amount": "{payout}", "sub": "{aff_sub}", '
             '"api_key": "body-secret-456", "meta": {"source": "postback-worker"}}')


@pytest.fixture()
def pipeline(settings: Settings, store: Store, clock: Clock) -> Iterator[Pipeline]:
    sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=8)
    yield Pipeline(settings, store, sender, clock=clock, rand=lambda: 0.5, worker_name="test")
    sender.close()


def _json_partner(store: Store, partner: PartnerServer, **extra: object) -> None:
    add_partner(store, "p1", partner.url, method="POST", body_format="json",
                body_template=JSON_BODY, headers={"X-Api-Key": API_KEY}, **extra)


def test_json_post_carries_the_rendered_body_and_headers(
        pipeline: Pipeline, store: Store, partner: PartnerServer) -> None:
    add_offer(store)
    _json_partner(store, partner)
    add_click(store, "tx1", aff_sub='quote" brace} amp&')
    event = conversion("tx1", payout="2.50")
    pipeline.process_conversions(messages(event))
    (pb,) = store.postbacks_for(event.id)
    assert pb["state"] == "delivered"
    (got,) = partner.requests
    assert got.method == "POST" and got.header("Content-Type") == "application/json"
    assert got.header("X-Api-Key") == API_KEY and got.header("X-Postback-Id") == pb["id"]
    assert json.loads(got.body) == {"click_id": "tx1", "amount": "2.50",
                                    "sub": 'quote" brace} amp&', "api_key": "body-secret-456",
                                    "meta": {"source": "postback-worker"}}
    assert parse_qs(got.path) == {} and got.query["tid"] == ["tx1"]  # the URL is rendered too
    attempts = store.attempts_for([pb["id"]])
    assert API_KEY not in json.dumps(attempts, default=str)


def test_form_post_body(pipeline: Pipeline, store: Store, partner: PartnerServer) -> None:
    add_offer(store)
    add_partner(store, "p1", partner.url, method="POST", body_format="form",
                body_template="click={transaction_id}&amount={payout}&sub={aff_sub}")
    add_click(store, "tx1", aff_sub="a&b=c")
    pipeline.process_conversions(messages(conversion("tx1", payout="1")))
    (got,) = partner.requests
    assert got.header("Content-Type") == "application/x-www-form-urlencoded"
    assert parse_qs(got.body.decode()) == {"click": ["tx1"], "amount": ["1"], "sub": ["a&b=c"]}


def test_secrets_are_masked_in_dlq_show_history_bundle_and_listings(
        pipeline: Pipeline, store: Store, partner: PartnerServer, settings: Settings) -> None:
    add_offer(store)
    _json_partner(store, partner)
    add_click(store, "tx1")
    partner.set_response(status=401, body=b"bad key")
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    (pb,) = store.postbacks_for(event.id)
    shown = dlq_ops.show(store, pb["id"])
    assert shown is not None
    p = shown["postback"]
    assert p["headers"] == {"X-Api-Key": "***"} and p["body_format"] == "json"
    assert json.loads(p["body"])["api_key"] == "***" and json.loads(p["body"])["click_id"] == "tx1"
    files = bundle.collect(store, settings, "p1", NOW.replace(year=2020), NOW.replace(year=2030),
                           NOW)
    row = store.get_partner("p1") or {}
    history = store.config_history("partner", "p1")
    for text in (json.dumps(shown, default=str), *files.values(),
                 json.dumps(redact_partner(row), default=str), json.dumps(history, default=str)):
        assert API_KEY not in text and "body-secret-456" not in text
    assert redact_partner(row)["headers"] == {"X-Api-Key": "***"}
    # Saving the partner again without headers keeps them (they are given once).
    add_partner(store, "p1", partner.url, method="POST")
    assert "X-Api-Key" in (store.get_partner("p1") or {})["custom_headers"]


def test_test_fire_and_audit_cover_bodies_and_headers(
        store: Store, partner: PartnerServer, settings: Settings) -> None:
    _json_partner(store, partner)
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        report = run_test_fire(store, store.get_partner("p1") or {}, NOW, sender=sender,
                               fire=True, transaction_id="tx-test")
    assert report.fired and report.failure_class == "delivered"
    assert report.headers == {"X-Api-Key": "***"}
    assert report.body is not None and json.loads(report.body)["api_key"] == "***"
    assert API_KEY not in json.dumps(report.to_dict())
    (got,) = partner.requests
    assert got.header("X-Api-Key") == API_KEY and json.loads(got.body)["click_id"] == "tx-test"
    # The audit names a broken body and a secret riding in the URL.
    store.upsert_partner({**(store.get_partner("p1") or {}), "method": "GET",
                          "postback_url": partner.url + "/pb?tid={transaction_id}&token=abc",
                          "body_template": '{"tid": {transaction_id}}'})
    findings = {(f.check, f.severity) for f in run_audit(store, settings, NOW).findings
                if f.object_id == "p1"}
    assert {("body_template", "error"), ("secret_in_url", "warning")} <= findings


def test_api_refuses_bad_bodies_and_headers_naming_the_field(
        serve: Callable[[Settings], str], settings: Settings, store: Store,
        redis_client: redis.Redis) -> None:
    api = serve(settings)
    admin = requests.Session()
    admin.headers.update(ADMIN)
    base = {"id": "p1", "postback_url": "https://p.example/pb?tid={transaction_id}"}
    cases = [
        ({"method": "POST", "body_format": "json", "body_template": '{"a": {payout}}'},
         "body_template"),
        ({"method": "GET", "body_format": "json", "body_template": '{"a": "{payout}"}'},
         "body_format"),
        ({"method": "POST", "body_format": "xml", "body_template": "<a/>"}, "body_format"),
        ({"headers": {"Host": "evil"}}, "headers"),
        ({"headers": {"X-Key": "a\r\nInjected: 1"}}, "headers"),
        ({"headers": "X-Key: 1"}, "headers"),
        ({"egress_proxy": "socks5://p:1080"}, "egress_proxy"),
    ]
    for extra, field in cases:
        r = admin.post(f"{api}/v1/partners", json={**base, **extra})
        assert r.status_code == 422, extra
        assert field in {e["field"] for e in r.json()["errors"]}, (extra, r.json())
    r = admin.post(f"{api}/v1/partners", json={
        **base, "method": "POST", "body_format": "json",
        "body_template": '{"tid": "{transaction_id}"}', "headers": {"X-Api-Key": API_KEY}})
    assert r.status_code == 201
    listing = admin.get(f"{api}/v1/partners").json()["partners"]
    assert listing[0]["headers"] == {"X-Api-Key": "***"} and API_KEY not in json.dumps(listing)
    r = admin.post(f"{api}/v1/templates/validate", json={
        "url": base["postback_url"], "body_format": "json", "body_template": '{"a": "{tid}"}'})
    assert r.json()["valid"] is False
    assert r.json()["body_problems"][0]["code"] == "unknown_macro"


def test_cli_bodies_headers_validate_dlq_show_and_page_link(
        store: Store, pg_url: str, settings: Settings, partner: PartnerServer,
        pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("POSTBACK_ADMIN_TOKEN", "t0ken")
    cli = CliRunner()
    body = tmp_path / "body.json"
    body.write_text(JSON_BODY)
    r = cli.invoke(main, ["partners", "add", "--id", "p1", "--url", partner.url + "/pb",
                          "--method", "POST", "--body-format", "json", "--body", f"@{body}",
                          "--header", f"X-Api-Key: {API_KEY}"])
    assert r.exit_code == 0, r.output
    r = cli.invoke(main, ["partners", "add", "--id", "p2", "--url", partner.url + "/pb",
                          "--method", "POST", "--body-format", "json", "--body",
                          '{"tid": {transaction_id}}'])
    assert r.exit_code == 2 and "error: body_template: position 8:" in r.output, r.output
    r = cli.invoke(main, ["partners", "validate", "--no-dns", "--url",
                          "https://p.example/pb?tid={transaction_id}", "--body",
                          '{"tid": "{tid}"}'])
    assert r.exit_code == 1 and "body error: position 9: unknown macro {tid}" in r.output
    r = cli.invoke(main, ["partners", "test", "p1"])
    assert "X-Api-Key: ***" in r.output and '"api_key": "***"' in r.output
    assert API_KEY not in r.output and "body-secret-456" not in r.output
    add_offer(store)
    add_click(store, "tx1")
    partner.set_response(status=500)
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    (pb,) = store.postbacks_for(event.id)
    r = cli.invoke(main, ["dlq", "show", pb["id"]])
    assert r.exit_code == 0, r.output
    assert "X-Api-Key: ***" in r.output and 'body (json): {"click_id": "tx1"' in r.output
    assert API_KEY not in r.output
    r = cli.invoke(main, ["partners", "page-link", "p1", "--base-url", "https://pb.example",
                          "--days", "3"])
    assert r.exit_code == 0 and r.output.startswith("https://pb.example/partner-page/p1?t=")
    r = cli.invoke(main, ["partners", "page-link", "nobody"])
    assert r.exit_code != 0 and "no partner 'nobody'" in r.output
