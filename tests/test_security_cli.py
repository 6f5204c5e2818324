"""Security commands: partners validate / test / signing, offers token, audit, keys."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from support.helpers import add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.cli import main
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store


@pytest.fixture()
def cli(store: Store, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("POSTBACK_ALLOW_NETWORKS", "127.0.0.0/8,::1/128")
    return CliRunner()


def test_validate_url_shows_positions_and_fixes(cli: CliRunner) -> None:
    r = cli.invoke(main, ["partners", "validate", "--no-dns", "--url",
                          "http://p.example/pb?tid=[transaction_id]&s=#s2#"])
    assert r.exit_code == 1
    assert r.output.splitlines() == [
        "http://p.example/pb?tid=[transaction_id]&s=#s2#",
        "                        ^",
        "error: position 24: [transaction_id] is another tracker's macro syntax; use "
        "{transaction_id} (fix: {transaction_id})",
        "                                           ^",
        "error: position 43: #s2# is another tracker's macro syntax; use {aff_sub2} "
        "(fix: {aff_sub2})",
        "^",
        "warning: position 0: plain http sends the postback unencrypted (fix: https://)",
        "^",
        "warning: position 0: no {transaction_id} macro; the partner cannot match the postback "
        "to its click (fix: add a parameter such as &tid={transaction_id})",
        "2 error(s), 2 warning(s)",
    ]


def test_validate_saved_partner_with_dns(cli: CliRunner, store: Store) -> None:
    add_partner(store, "p1", "https://no-such-host.invalid")
    r = cli.invoke(main, ["partners", "validate", "p1", "--format", "json"])
    assert r.exit_code == 0, r.output  # a DNS failure is a warning
    body = json.loads(r.output)
    assert body["valid"] is True
    assert [p["code"] for p in body["problems"]] == ["dns"]
    r = cli.invoke(main, ["partners", "validate", "p1", "--no-dns"])
    assert r.exit_code == 0 and r.output.splitlines()[-1] == "template OK"
    assert cli.invoke(main, ["partners", "validate"]).exit_code == 2
    r = cli.invoke(main, ["partners", "validate", "nope", "--no-dns"])
    assert r.exit_code == 3 and "error: no partner 'nope'" in r.output


def test_add_refuses_invalid_template_listing_every_problem(cli: CliRunner) -> None:
    r = cli.invoke(main, ["partners", "add", "--id", "p1", "--url",
                          "https://p.example/pb?cid=REPLACE&payout=OPTIONAL&x=a|b"])
    assert r.exit_code == 2
    assert [ln for ln in r.output.splitlines() if ln.startswith("error:")] == [
        "error: postback_url: position 25: REPLACE is a placeholder to replace with a macro; "
        "use {transaction_id} (fix: {transaction_id})",
        "error: postback_url: position 40: OPTIONAL is a placeholder to replace with a macro; "
        "use {payout} (fix: {payout})",
        "error: postback_url: position 52: '|' must be percent-encoded as %7C (fix: %7C)",
    ]


def test_test_fire(cli: CliRunner, store: Store, partner: PartnerServer) -> None:
    add_partner(store, "p1", partner.url)
    r = cli.invoke(main, ["partners", "test", "p1", "--transaction-id", "tx 1"])
    assert r.exit_code == 0, r.output
    assert f"GET {partner.url}/pb?tid=tx%201&payout=1.00&sub=sub1&pb=pb_test_" in r.output
    assert r.output.splitlines()[-1] == "not sent (add --fire to send it once)"
    assert partner.count() == 0
    partner.set_response(403, b"forbidden by firewall")
    r = cli.invoke(main, ["partners", "test", "p1", "--fire", "--payout", "7.5"])
    assert r.exit_code == 1
    lines = dict(ln.split(":", 1) for ln in r.output.splitlines()[1:] if ":" in ln)
    assert lines["status"].strip() == "403"
    assert lines["response"].strip() == "forbidden by firewall"
    assert lines["class"].strip() == "blocked - HTTP 403 from partner (blocked)"
    assert lines["cause"].strip() == "firewall or security restrictions"
    assert lines["advice"].strip().startswith("The partner's firewall refused us (403).")
    assert partner.received()[0].query["payout"] == ["7.5"]
    with store.engine.connect() as conn:
        rows = conn.execute(select(t.attempts.c.is_test, t.attempts.c.failure_class)).all()
        states = conn.execute(select(t.postbacks.c.state)).scalars().all()
    assert [tuple(r) for r in rows] == [(True, "blocked")]
    assert states == ["test"]


def test_ipv6_literal_partner_is_validated_saved_and_fired(cli: CliRunner) -> None:
    with PartnerServer(host="::1") as v6:
        v6.set_response(body=b"success=true")
        url = f"{v6.url}/pb?tid={{transaction_id}}"
        assert url.startswith("http://[::1]:")
        r = cli.invoke(main, ["partners", "validate", "--no-dns", "--url", url])
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[-3:] == [
            "^", "warning: position 0: plain http sends the postback unencrypted (fix: https://)",
            "0 error(s), 1 warning(s)"], r.output
        r = cli.invoke(main, ["partners", "add", "--id", "v6", "--url", url,
                              "--success-check", "success=true"])
        assert r.exit_code == 0, r.output
        r = cli.invoke(main, ["partners", "test", "v6", "--fire"])
        assert r.exit_code == 0, r.output
        assert v6.count() == 1 and v6.received()[0].path == "/pb"


def test_signing_and_offer_token(cli: CliRunner, store: Store) -> None:
    add_partner(store, "p1", "https://p.example")
    add_offer(store, "o1")
    r = cli.invoke(main, ["partners", "signing", "p1", "--enable"])
    assert r.exit_code == 0
    secret = r.output.splitlines()[1].rsplit(" ", 1)[1]
    assert len(secret) >= 40
    r = cli.invoke(main, ["partners", "list", "--format", "json"])
    assert secret not in r.output and json.loads(r.output)[0]["signing"] is True
    r = cli.invoke(main, ["partners", "signing", "p1", "--rotate"])
    assert "secret rotated; the old one also signs until" in r.output
    assert cli.invoke(main, ["partners", "signing", "p1"]).exit_code == 2
    r = cli.invoke(main, ["partners", "signing", "p1", "--enable", "--header", "X Bad"])
    assert r.exit_code == 2 and "error: header:" in r.output
    r = cli.invoke(main, ["offers", "token", "o1"])
    assert r.exit_code == 0 and "security_token=" in r.output
    r = cli.invoke(main, ["offers", "token", "zz"])
    assert r.exit_code == 3 and "error: no offer 'zz'" in r.output


def test_audit_exit_codes(cli: CliRunner, store: Store, settings: Settings) -> None:
    add_offer(store, "o1", "ecommerce")
    r = cli.invoke(main, ["audit"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == (
        "audit of 1 offer(s) and 0 partner(s): 0 error(s), 0 warning(s), 0 note(s)")
    bad = add_partner(store, "p1", "https://p.example")
    store.upsert_partner({**bad, "postback_url": "https://p.example/?t={tid}"})
    r = cli.invoke(main, ["audit", "--format", "json"])
    assert r.exit_code == 1
    data = json.loads(r.output)
    assert data["counts"]["error"] == 1
    assert data["findings"][0]["check"] == "template"


def test_keys(cli: CliRunner) -> None:
    r = cli.invoke(main, ["keys", "create", "--name", "backend", "--scope", "ingest"])
    assert r.exit_code == 0, r.output
    key_id = r.output.split()[1]
    key = r.output.splitlines()[1]
    assert key.startswith(f"pbw_{key_id}_")
    r = cli.invoke(main, ["keys", "list", "--format", "json"])
    (listed,) = json.loads(r.output)
    assert listed["id"] == key_id and listed["scopes"] == "ingest" and key not in r.output
    assert cli.invoke(main, ["keys", "revoke", key_id]).output.strip() == f"key {key_id} revoked"
    r = cli.invoke(main, ["keys", "revoke", key_id])
    assert r.exit_code == 3 and f"no active key '{key_id}'" in r.output
    r = cli.invoke(main, ["keys", "create", "--name", "x", "--scope", "root"])
    assert r.exit_code == 2
