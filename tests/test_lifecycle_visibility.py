"""The lifecycle made visible: `show` and GET /v1/conversions/{id} print the event timeline
with each partner's postback per event; explicit updates by conversion id (API and CLI);
reports count reversals and adjustments; `partners health` shows held postbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
import requests
from click.testing import CliRunner
from conftest import ADMIN
from sqlalchemy import select
from support.helpers import NOW, Clock, add_click, add_offer, conversion, messages
from support.partner import PartnerServer

from postback_worker.cli import main
from postback_worker.delivery.sender import Sender
from postback_worker.domain.events import ConversionEvent
from postback_worker.ops.config import parse_partner
from postback_worker.ops.oncall.partner_health import health
from postback_worker.ops.visibility.reports import Scope, delivery_report, report_rows
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store


@pytest.fixture()
def pipeline(settings: Settings, store: Store, clock: Clock) -> Iterator[Pipeline]:
    sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=8)
    yield Pipeline(settings, store, sender, clock=clock, rand=lambda: 0.0, worker_name="test")
    sender.close()


@pytest.fixture()
def cli(store: Store, pg_url: str, redis_url: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("REDIS_URL", settings.redis.url)
    return CliRunner()


def lifecycle(store: Store, pipeline: Pipeline, clock: Clock, partner: PartnerServer,
              hold_hours: float | None = None, n: int = 4) -> list[ConversionEvent]:
    add_offer(store, "o1", hold_hours=hold_hours)
    store.upsert_partner(parse_partner({
        "id": "p1", "fire_events": "approved,adjustment,reversal",
        "postback_url": f"{partner.url}/pb?tid={{transaction_id}}&e={{event}}"}, NOW))
    add_click(store, "tx1", aff_id="p1")
    fields = [{"status": "pending", "payout": "10"}, {"payout": "10"}, {"payout": "12.5"},
              {"status": "reversed", "payout": "12.5"}]
    events = []
    for f in fields[:n]:
        events.append(conversion("tx1", now=clock(), **f))
        pipeline.process_conversions(messages(events[-1]))
        clock.advance(1)
    return events


def test_show_prints_the_timeline(cli: CliRunner, store: Store, pipeline: Pipeline,
                                  clock: Clock, partner: PartnerServer) -> None:
    events = lifecycle(store, pipeline, clock, partner)
    root = events[0].id
    r = cli.invoke(main, ["show", events[2].id])  # an update's id shows its conversion
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"conversion {root}: attributed")
    assert (f"  ({events[2].id} is an event of this conversion: updated - event 3 of "
            f"conversion {root}: payout 10 -> 12.5)") in lines
    start = lines.index("events:")
    timeline = [ln.split(" (payout")[0] for ln in lines[start + 1:start + 9]]
    assert timeline == [
        "  1 2026-11-26 12:00:00 created pending",
        "      p1 -: skipped after 0 attempt(s) - status 'pending' does not fire this partner "
        "(fires on: adjustment, approved, reversal; statuses: approved)",
        "  2 2026-11-26 12:00:01 pending -> approved",
        "      p1 approved: delivered after 1 attempt(s)",
        "  3 2026-11-26 12:00:02 payout 10 -> 12.5",
        "      p1 adjustment: delivered after 1 attempt(s)",
        "  4 2026-11-26 12:00:03 approved -> reversed",
        "      p1 reversal: delivered after 1 attempt(s)",
    ]
    reversal = next(i for i, ln in enumerate(lines) if ln == "  for event 4 (reversal)")
    assert lines[reversal - 1].endswith("-> partner p1: delivered after 1 attempt(s)")


def test_get_conversion_returns_the_timeline(serve: Callable[[Settings], str],
                                             settings: Settings, store: Store,
                                             pipeline: Pipeline, clock: Clock,
                                             partner: PartnerServer) -> None:
    events = lifecycle(store, pipeline, clock, partner)
    api = serve(settings)
    r = requests.get(f"{api}/v1/conversions/{events[0].id}", headers=ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body["requested_event"] is None
    assert [(e["seq"], e["kind"], e["event_id"]) for e in body["events"]] == [
        (1, "created", events[0].id), (2, "status_changed", events[1].id),
        (3, "adjusted", events[2].id), (4, "status_changed", events[3].id)]
    assert [[(p["partner_id"], p["event"], p["state"]) for p in e["postbacks"]]
            for e in body["events"]] == [
        [("p1", None, "skipped")], [("p1", "approved", "delivered")],
        [("p1", "adjustment", "delivered")], [("p1", "reversal", "delivered")]]


def queued(store: Store) -> list[dict[str, Any]]:
    """Accepted conversion events waiting for intake (the journal: state `received`)."""
    cv = t.conversions.c
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(cv.id, cv.transaction_id, cv.status, cv.payout, cv.received_at)
            .where(cv.state == "received")).mappings()]


def test_explicit_update_by_conversion_id(serve: Callable[[Settings], str], settings: Settings,
                                          store: Store, pipeline: Pipeline, clock: Clock,
                                          partner: PartnerServer, cli: CliRunner,
                                          redis_client: redis.Redis) -> None:
    events = lifecycle(store, pipeline, clock, partner, n=2)  # pending, approved
    root = events[0].id
    api = serve(settings)
    r = requests.post(f"{api}/v1/conversions/{root}/events", headers=ADMIN,
                      json={"payout": "11", "id": "upd-1"})
    assert r.status_code == 202, r.text
    assert r.json()["ids"] == ["upd-1"]
    for body, field in (({}, "status"), ({"status": "ok!"}, "status"),
                        ({"status": "rejected", "offer_id": "x"}, "offer_id")):
        r = requests.post(f"{api}/v1/conversions/{root}/events", headers=ADMIN, json=body)
        assert r.status_code == 422 and field in {e["field"] for e in r.json()["errors"]}
    r = requests.post(f"{api}/v1/conversions/cv_nope/events", headers=ADMIN,
                      json={"status": "rejected"})
    assert r.status_code == 404
    # The advertiser's conversion URL with new amounts for a known transaction is an update too.
    r = requests.get(f"{api}/postback", headers=ADMIN,
                     params={"transaction_id": "tx1", "offer_id": "o1", "payout": "12"})
    assert r.status_code == 200, r.text
    res = cli.invoke(main, ["conversions", "update", events[1].id, "--status", "reversed",
                            "--id", "upd-2"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"accepted update upd-2 of conversion {events[1].id}"
    res = cli.invoke(main, ["conversions", "update", "cv_nope", "--status", "reversed"])
    assert res.exit_code == 3
    sent = sorted(queued(store), key=lambda m: str(m["received_at"]))
    assert [(m["transaction_id"], m["status"], m["payout"]) for m in sent] == [
        ("tx1", "approved", "11"), ("tx1", "approved", "12"), ("tx1", "reversed", None)]
    assert (sent[0]["id"], sent[2]["id"]) == ("upd-1", "upd-2")
    pipeline.intake_pending(limit=100, max_rounds=1)  # what a woken worker does
    for _ in range(3):  # each later postback waited for the one before
        clock.advance(2)
        pipeline.deliver(pipeline.sweep())
    assert [r.query["e"][0] for r in partner.received()] == ["approved", "adjustment",
                                                             "adjustment", "reversal"]


def test_reports_and_health_count_lifecycle(store: Store, settings: Settings,
                                            pipeline: Pipeline, clock: Clock,
                                            partner: PartnerServer) -> None:
    lifecycle(store, pipeline, clock, partner)
    add_click(store, "tx2", aff_id="p1")
    store.upsert_offer({**store.get_offer("o1"), "hold_hours": 48})  # type: ignore[dict-item]
    pipeline.catalog.refresh(force=True)
    pipeline.process_conversions(messages(conversion("tx2", now=clock())))
    rng = TimeRange(NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    report = delivery_report(store, Scope(rng))
    assert {k: report["lifecycle"][k] for k in ("status_changes", "reversals", "adjustments",
                                                "repeats")} == {
        "status_changes": 2, "reversals": 1, "adjustments": 1, "repeats": 0}
    assert report["lifecycle"]["postbacks_by_event"] == {
        "approved": 2, "adjustment": 1, "reversal": 1}  # tx1 and tx2 (held) approved
    rows = {(r["section"], r["key"], r["metric"]): r["value"] for r in report_rows(report)}
    assert rows[("conversion_events", "", "reversals")] == 1
    (p1,) = [h for h in health(store, settings, None, clock()) if h["partner_id"] == "p1"]
    assert (p1["held"], p1["behind_dead_letter"], p1["waiting"]) == (1, 0, 1)
