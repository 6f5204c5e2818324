"""410 Gone: the partner is paused with the reason, an alert fires, nothing storms; fixing,
resuming and replaying delivers. Real PostgreSQL, Redis and a local partner; injected clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from support.helpers import (
    Clock,
    add_click,
    add_offer,
    add_partner,
    conversion,
    messages,
    run_due,
)
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.ops.oncall import partner_health
from postback_worker.ops.oncall import replay as replay_ops
from postback_worker.ops.oncall.deadletters import Filter
from postback_worker.ops.visibility import alerts
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


@pytest.fixture()
def pipeline(settings: Settings, store: Store, clock: Clock,
             redis_client: redis.Redis) -> Iterator[Pipeline]:
    sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=8)
    yield Pipeline(settings, store, sender, clock=clock, rand=lambda: 0.5, worker_name="test",
                   redis=redis_client)
    sender.close()


def test_410_pauses_the_partner_alerts_and_replay_after_the_fix_delivers(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock,
    settings: Settings, redis_client: redis.Redis,
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, path="/old")
    for tx in ("tx1", "tx2", "tx3"):
        add_click(store, tx)
    partner.set_response(status=410, body=b"endpoint removed")

    first = conversion("tx1")
    pipeline.process_conversions(messages(first))
    pb = store.postbacks_for(first.id)[0]
    assert (pb["state"], pb["last_class"]) == ("dead_lettered", "gone")
    row = store.get_partner("p1") or {}
    assert row["paused"] is True and row["paused_by"] == "gone"
    assert "HTTP 410 Gone for postback " + pb["id"] in row["paused_reason"]

    # No retry storm: later conversions wait (no attempt spent) while the partner is paused.
    later = [conversion("tx2"), conversion("tx3")]
    pipeline.process_conversions(messages(*later))
    for _ in range(3):
        clock.advance(settings.oncall.pause_recheck + 1)
        run_due(pipeline)
    assert partner.count() == 1
    waiting = [store.postbacks_for(e.id)[0] for e in later]
    assert {(p["state"], p["attempts"]) for p in waiting} == {("retry_scheduled", 0)}

    # The alert names the partner, the reason and the way out; once.
    events = alerts.evaluate(settings, store, redis_client, now=clock(), sinks=[])
    gone = [e for e in events if e.kind == "partner_gone"]
    assert len(gone) == 1 and gone[0].partner_id == "p1" and gone[0].action == "fire"
    assert "410 Gone" in gone[0].text and "partners resume p1" in gone[0].text
    assert not [e for e in alerts.evaluate(settings, store, redis_client, now=clock(),
                                           sinks=[]) if e.kind == "partner_gone"]

    # The partner's new endpoint: fix the template, resume, replay the dead letter.
    partner.set_response(status=200)
    add_partner(store, "p1", partner.url, path="/new")
    woke = partner_health.resume(store, settings, redis_client, "p1", clock())
    assert woke == 2
    run, _ = replay_ops.start(store, settings, Filter(partner_id="p1"), who="test", rate=100,
                              now=clock(), enqueue=None)
    assert run.queued == 1 and run.rerendered == 1
    run_due(pipeline)
    pipeline.deliver([pb["id"]])
    final = [store.postbacks_for(e.id)[0] for e in (first, *later)]
    assert [p["state"] for p in final] == ["delivered"] * 3
    assert all(r.path == "/new" for r in partner.requests[1:])
    resolved = alerts.evaluate(settings, store, redis_client, now=clock(), sinks=[])
    assert [(e.kind, e.action) for e in resolved if e.kind == "partner_gone"] == [
        ("partner_gone", "resolve")]
