"""On-call CLI and API over real PostgreSQL and Redis; dead letters made by the real pipeline."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import uvicorn
from click.testing import CliRunner
from conftest import ADMIN, wait_until
from sqlalchemy import update
from support.helpers import add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.api.app import create_app
from postback_worker.cli import main
from postback_worker.delivery.sender import Sender
from postback_worker.dev.services import free_port
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import schema
from postback_worker.store.repo import Store

SECRET = "tok3n-s3cret"
HMAC = "hmac-very-secret"
HMAC_OLD = "hmac-rotated-out-secret"


@pytest.fixture()
def oncall_settings(settings: Settings) -> Settings:
    return settings.with_overrides(egress_ips=("203.0.113.7", "203.0.113.8"))


@pytest.fixture()
def seeded(oncall_settings: Settings, store: Store, partner: PartnerServer,
           redis_client: redis.Redis) -> dict[str, list[str]]:
    """p-down: 503 (retries exhausted); p-wall: 403 (blocked); p-ok delivered."""
    add_offer(store, "o1")
    add_partner(store, "p-down", partner.url, path="/down", max_attempts=1)
    add_partner(store, "p-wall", partner.url, path=f"/wall?token={SECRET}&x=1")
    add_partner(store, "p-ok", partner.url, path="/ok")
    with store.engine.begin() as conn:
        conn.execute(update(schema.partners).where(schema.partners.c.id == "p-wall")
                     .values(hmac_secret=HMAC, hmac_secret_previous=HMAC_OLD))
    partner.route("/down", status=503, body=b"maintenance")
    partner.route("/wall", status=403, body=b"forbidden by firewall")
    events = {"p-down": [], "p-wall": [], "p-ok": []}  # type: dict[str, list[str]]
    batch = []
    for aff, n in (("p-down", 2), ("p-wall", 3), ("p-ok", 1)):
        for i in range(n):
            add_click(store, f"{aff}-{i}", aff_id=aff)
            ev = conversion(f"{aff}-{i}")
            batch.append(ev)
            events[aff].append(ev.id)
    sender = Sender(allow_networks=oncall_settings.delivery.allow_networks)
    Pipeline(oncall_settings, store, sender).process_conversions(messages(*batch))
    sender.close()
    return events


@pytest.fixture()
def cli(oncall_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for k, v in oncall_settings.to_env().items():
        monkeypatch.setenv(k, v)
    return CliRunner()


def test_dlq_list_stats_show_and_bad_input(cli: CliRunner, seeded: dict[str, list[str]],
                                          store: Store) -> None:
    r = cli.invoke(main, ["dlq", "list"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split()[:4] == ["POSTBACK_ID", "PARTNER_ID", "OFFER_ID",
                                                    "FAILURE_CLASS"]
    assert r.output.splitlines()[-1] == "5 dead letter(s) (all dead letters); page 1 of 1"
    assert SECRET not in r.output
    r = cli.invoke(main, ["dlq", "list", "--class", "blocked", "--format", "json"])
    data = json.loads(r.output)
    assert data["total"] == 3 and {d["partner_id"] for d in data["dead_letters"]} == {"p-wall"}
    assert all("token=***" in d["url"] for d in data["dead_letters"])
    r = cli.invoke(main, ["dlq", "list", "--status", "503", "--format", "csv", "--limit", "1"])
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("postback_id,partner_id") and len(lines) == 2
    assert ",p-down,o1,partner_5xx,503," in lines[1]
    # Keyset pages: --after the cursor each page prints walks the same list, once each.
    full = [d["postback_id"] for d in json.loads(cli.invoke(
        main, ["dlq", "list", "--format", "json"]).output)["dead_letters"]]
    walked, after = [], None
    for _ in range(3):
        page = json.loads(cli.invoke(main, ["dlq", "list", "--limit", "2", "--format", "json",
                                            *(["--after", after] if after else [])]).output)
        assert page["total"] == 5
        walked += [d["postback_id"] for d in page["dead_letters"]]
        after = page["next_after"]
    assert walked == full and len(set(full)) == 5 and after is None
    r = cli.invoke(main, ["dlq", "list", "--limit", "2"])
    cursor = r.output.splitlines()[-1].removeprefix("next page: --after ")
    r = cli.invoke(main, ["dlq", "list", "--limit", "2", "--after", cursor])
    assert r.exit_code == 0 and full[2] in r.output and full[1] not in r.output
    r = cli.invoke(main, ["dlq", "stats", "--format", "json"])
    assert json.loads(r.output)["by_class"] == {"blocked": 3, "partner_5xx": 2}
    pb_id = store.postbacks_for(seeded["p-wall"][0])[0]["id"]
    r = cli.invoke(main, ["dlq", "show", pb_id])
    assert r.exit_code == 0
    assert "token=***" in r.output and SECRET not in r.output
    assert "#1 " in r.output and "status 403 blocked" in r.output
    assert "response: forbidden by firewall" in r.output
    for args, message in (
        (["dlq", "list", "--since", "yesterday"], "error: since: must be an ISO 8601 time"),
        (["dlq", "list", "--status", "abc"], "error: last_status: must be an HTTP status code"),
        (["dlq", "list", "--after", "yesterday"],
         "error: after: must be the next_after value of the previous page"),
        (["dlq", "replay", "--rate", "fast"], "error: --rate: must be a rate such as 10/s"),
        (["dlq", "purge"], "error: purge deletes 5 dead letter(s) (all dead letters); add --yes"),
    ):
        r = cli.invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
    # Not found: exit code 3, the same for every command.
    for args, message in (
        (["reattribute", "--offer", "nope"], "error: no offer 'nope'"),
        (["partners", "pause", "nope"], "error: no partner 'nope'"),
        (["partners", "resume", "nope"], "error: no partner 'nope'"),
        (["partners", "limits", "nope", "--rate", "5/s"], "error: no partner 'nope'"),
        (["support-bundle", "--partner", "nope"], "error: no partner 'nope'"),
        (["dlq", "show", "pb_nope"], "error: no postback 'pb_nope'"),
        (["dlq", "run", "run_nope"], "error: no run 'run_nope'"),
        (["show", "cv_nope"], "error: no conversion 'cv_nope'"),
        (["keys", "revoke", "key_nope"], "error: no active key 'key_nope'"),
    ):
        r = cli.invoke(main, args)
        assert r.exit_code == 3, (args, r.output)
        assert message in r.stderr, (args, r.stderr)


def test_dry_run_changes_nothing_and_purge_needs_yes(cli: CliRunner, seeded: dict[str, list[str]],
                                                     store: Store, partner: PartnerServer) -> None:
    before = partner.count()
    r = cli.invoke(main, ["dlq", "replay", "--partner", "p-wall", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "would replay 3 dead letter(s) at 10/s" in r.output
    assert partner.count() == before
    assert {p["state"] for c in seeded["p-wall"] for p in store.postbacks_for(c)} == {
        "dead_lettered"}
    r = cli.invoke(main, ["dlq", "purge", "--class", "partner_5xx", "--yes", "--by", "oncall"])
    assert r.output.strip() == "purged 2 dead letter(s) (failure_class=partner_5xx)"
    r = cli.invoke(main, ["dlq", "stats", "--format", "json"])
    assert json.loads(r.output)["by_class"] == {"blocked": 3}
    pb = store.postbacks_for(seeded["p-down"][0])[0]
    assert (pb["state"], pb["triggered_by"]) == ("dead_lettered", "dead letter purged by oncall")


def test_partner_pause_resume_limits_and_health(cli: CliRunner, seeded: dict[str, list[str]],
                                                store: Store) -> None:
    r = cli.invoke(main, ["partners", "pause", "p-ok", "--reason", "partner migration"])
    assert r.output.strip() == ("partner p-ok paused; its postbacks wait until "
                                "'postback-worker partners resume p-ok'")
    r = cli.invoke(main, ["partners", "limits", "p-ok", "--rate", "20/s", "--concurrency", "4"])
    assert r.output.strip() == "partner p-ok: rate limit 20/s, concurrency cap 4"
    r = cli.invoke(main, ["partners", "health", "--format", "json"])
    rows = {row["partner_id"]: row for row in json.loads(r.output)}
    assert rows["p-ok"]["paused"] is True and rows["p-ok"]["rate_limit"] == 20
    assert rows["p-wall"]["dead_letters"] == 3 and rows["p-wall"]["circuit"] == "closed"
    r = cli.invoke(main, ["partners", "health"])
    assert r.output.splitlines()[0].split()[:3] == ["PARTNER_ID", "CIRCUIT", "PAUSED"]
    assert "BACKLOG_AGE" in r.output.splitlines()[0].split()
    r = cli.invoke(main, ["partners", "resume", "p-ok"])
    assert r.output.strip() == "partner p-ok resumed; 0 waiting postback(s) released"
    assert store.get_partner("p-ok")["paused"] is False  # type: ignore[index]


def test_support_bundle_names_the_cause_and_keeps_secrets_out(
    cli: CliRunner, seeded: dict[str, list[str]], store: Store, tmp_path: Path,
) -> None:
    out = tmp_path / "bundle.tar.gz"
    r = cli.invoke(main, ["support-bundle", "--partner", "p-wall", "--since", "1h",
                          "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "Most likely cause: firewall or security restrictions.",
        f"support bundle written to {out}",
    ]
    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                 for m in tar.getmembers()}
    assert set(files) == {"SUMMARY.txt", "counts.json", "ids.csv", "attempts_sample.csv",
                          "partner.json", "config_history.json", "offers.json",
                          "egress_ips.txt"}
    everything = "".join(files.values())
    assert SECRET not in everything and HMAC not in everything and HMAC_OLD not in everything
    summary = files["SUMMARY.txt"]
    assert "allowlist our egress IP addresses" in summary
    assert "Egress IPs the partner must allowlist: 203.0.113.7, 203.0.113.8." in summary
    assert files["egress_ips.txt"] == "203.0.113.7\n203.0.113.8\n"
    for cid in seeded["p-wall"]:
        assert cid in files["ids.csv"]
        assert store.postbacks_for(cid)[0]["id"] in files["ids.csv"]
    counts = json.loads(files["counts.json"])
    assert counts["failed_attempts_by_status"] == {"403": 3}
    assert json.loads(files["partner.json"])["hmac_secret"] == "(set, not shown)"
    assert json.loads(files["partner.json"])["hmac_secret_previous"] == "(set, not shown)"
    assert json.loads(files["offers.json"])[0]["lifespan_days"] == 30
    assert "forbidden by firewall" in files["attempts_sample.csv"]
    r = cli.invoke(main, ["support-bundle", "--partner", "p-wall", "--since", "soon"])
    assert r.exit_code == 2 and "error: --since: must be an ISO 8601 time" in r.stderr


@pytest.fixture()
def api_url(oncall_settings: Settings) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(oncall_settings), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, message="uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_api_dead_letters_replay_purge_partners_and_bundle(
    api_url: str, seeded: dict[str, list[str]], store: Store, partner: PartnerServer,
) -> None:
    assert requests.get(f"{api_url}/v1/dead-letters", timeout=10).status_code == 401
    r = requests.get(f"{api_url}/v1/dead-letters", params={"partner_id": "p-wall", "limit": 2},
                     headers=ADMIN, timeout=10)
    body = r.json()
    assert (r.status_code, body["total"], len(body["dead_letters"]), body["next_offset"]) == (
        200, 3, 2, 2)
    r = requests.get(f"{api_url}/v1/dead-letters", headers=ADMIN, timeout=10, params={
        "partner_id": "p-wall", "limit": 2, "after": body["next_after"]})
    rest = r.json()
    assert (rest["total"], len(rest["dead_letters"]), rest["next_after"]) == (3, 1, None)
    assert {d["postback_id"] for d in body["dead_letters"] + rest["dead_letters"]} == {
        store.postbacks_for(c)[0]["id"] for c in seeded["p-wall"]}
    r = requests.get(f"{api_url}/v1/dead-letters",
                     params={"failure_class": "nope", "since": "x", "limit": 0, "colour": "red",
                             "after": "x"},
                     headers=ADMIN, timeout=10)
    assert r.status_code == 422
    assert sorted(e["field"] for e in r.json()["errors"]) == [
        "after", "colour", "failure_class", "limit", "since"]
    r = requests.get(f"{api_url}/v1/dead-letters/stats", headers=ADMIN, timeout=10)
    assert r.json()["by_partner"] == {"p-wall": 3, "p-down": 2}
    pb_id = store.postbacks_for(seeded["p-down"][0])[0]["id"]
    r = requests.get(f"{api_url}/v1/dead-letters/{pb_id}", headers=ADMIN, timeout=10)
    assert [a["status_code"] for a in r.json()["attempts"]] == [503]
    before = partner.count()
    r = requests.post(f"{api_url}/v1/dead-letters/replay", headers=ADMIN, timeout=10,
                      json={"partner_id": "p-down", "dry_run": True, "triggered_by": "ann"})
    assert r.status_code == 200 and r.json()["selected"] == 2
    assert r.json()["message"] == "would replay 2 dead letter(s) at 10/s"
    run = requests.get(f"{api_url}/v1/replay-runs/{r.json()['run_id']}", headers=ADMIN,
                       timeout=10).json()
    assert run["dry_run"] is True and run["triggered_by"].startswith("ann (API key ")
    assert partner.count() == before
    r = requests.post(f"{api_url}/v1/dead-letters/replay", headers=ADMIN, timeout=10,
                      json={"rate": "-1", "dry_run": "yes"})
    assert r.status_code == 422
    assert sorted(e["field"] for e in r.json()["errors"]) == ["dry_run", "rate"]
    r = requests.post(f"{api_url}/v1/dead-letters/purge", headers=ADMIN, timeout=10,
                      json={"partner_id": "p-down"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "confirm"
    r = requests.post(f"{api_url}/v1/dead-letters/purge", headers=ADMIN, timeout=10,
                      json={"partner_id": "p-down", "confirm": True})
    assert r.json() == {"purged": 2}
    r = requests.post(f"{api_url}/v1/partners/p-ok/pause", headers=ADMIN, timeout=10,
                      json={"reason": "migration"})
    assert r.json() == {"partner_id": "p-ok", "paused": True, "reason": "migration"}
    r = requests.get(f"{api_url}/v1/partners/health", headers=ADMIN, timeout=10)
    rows = {p["partner_id"]: p for p in r.json()["partners"]}
    assert rows["p-ok"]["paused"] is True and rows["p-ok"]["circuit"] == "closed"
    r = requests.post(f"{api_url}/v1/partners/p-ok/resume", headers=ADMIN, timeout=10)
    assert r.json() == {"partner_id": "p-ok", "paused": False, "released": 0}
    r = requests.post(f"{api_url}/v1/partners/p-ok/limits", headers=ADMIN, timeout=10,
                      json={"rate_limit": "fast", "max_concurrency": -1})
    assert sorted(e["field"] for e in r.json()["errors"]) == ["max_concurrency", "rate_limit"]
    assert requests.post(f"{api_url}/v1/partners/nope/pause", headers=ADMIN, timeout=10,
                         json={}).status_code == 404
    r = requests.get(f"{api_url}/v1/partners/p-wall/support-bundle", headers=ADMIN,
                     params={"since": "1h"}, timeout=10)
    assert r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                 for m in tar.getmembers()}
    assert "Most likely cause: firewall or security restrictions." in files["SUMMARY.txt"]
    assert not [name for name, text in files.items() if SECRET in text or HMAC in text]
    r = requests.post(f"{api_url}/v1/reattribute", headers=ADMIN, timeout=10,
                      json={"offer_id": "o1", "dry_run": True})
    assert r.status_code == 200 and r.json()["eligible"] == []
    r = requests.post(f"{api_url}/v1/reattribute", headers=ADMIN, timeout=10, json={})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "offer_id"
