"""Operator events: outbox rows written with their change, batched, signed, delivered at least
once to a real local receiver that verifies them with the `standardwebhooks` package.

Circuit transitions use real Redis with two independent guardrails (two "workers"); pauses go
through the CLI and the API; alerts through the evaluator; dead letters through the pipeline.
The clock is injected (it starts at the real time so that receivers accept the signature
timestamps, and the tests move it by hand).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import requests
from click.testing import CliRunner
from conftest import wait_until
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support.helpers import Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer, ReceivedRequest

from postback_worker.cli import main
from postback_worker.delivery.sender import Sender
from postback_worker.domain import operator_events as oe
from postback_worker.ops.oncall.partner_health import pause, resume
from postback_worker.ops.visibility import metrics
from postback_worker.ops.visibility.alerts import evaluate
from postback_worker.ops.visibility.operator_events import Relay, new_secret
from postback_worker.pipeline.guardrails import EVENTS_KEY, Guardrails
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings, SettingsError
from postback_worker.store.repo import Store

SECRET = new_secret()


@pytest.fixture()
def now_clock() -> Clock:
    return Clock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture()
def receiver() -> Iterator[PartnerServer]:
    with PartnerServer() as server:
        yield server


@pytest.fixture()
def ev_settings(settings: Settings, receiver: PartnerServer) -> Settings:
    return settings.with_overrides(events_url=f"{receiver.url}/hooks", events_secret=SECRET,
                                   events_batch_window=30.0, events_retry_base_delay=10.0,
                                   events_retry_max_delay=60.0, events_max_attempts=5)


@pytest.fixture()
def relay(ev_settings: Settings, store: Store, redis_client: redis.Redis,
          now_clock: Clock) -> Iterator[Relay]:
    sender = Sender.from_settings(ev_settings.delivery, concurrency=8)
    yield Relay(ev_settings, store, sender, redis_client, clock=now_clock, rand=lambda: 0.5)
    sender.close()


def verified(got: ReceivedRequest, secret: str = SECRET) -> dict[str, Any]:
    """What the on-call system does: verify the signature, then read the JSON body."""
    body: dict[str, Any] = Webhook(secret).verify(got.body.decode(), dict(got.headers))
    return body


def hooks(receiver: PartnerServer) -> list[ReceivedRequest]:
    return [r for r in receiver.requests if r.path == "/hooks"]


def failing_partner(store: Store, partner: PartnerServer, pid: str, status: int) -> None:
    partner.route(f"/{pid}", status)
    add_partner(store, pid, partner.url, path=f"/{pid}", scope="global")


# -- pure planning ---------------------------------------------------------------------------

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _dl(n: int, partner: str, seconds: float) -> oe.Event:
    return oe.Event(f"evt_{partner}_{n}", oe.DEAD_LETTERED, T0 + timedelta(seconds=seconds),
                    partner, {"postback_id": f"pb{n}", "failure_class": "auth"})


@pytest.mark.parametrize(("events", "now_s", "routing", "expected"), [
    # a partner's dead letters wait for the window, then go together
    ([_dl(1, "a", 0), _dl(2, "a", 5)], 20, oe.Routing(True, window=30), []),
    ([_dl(1, "a", 0), _dl(2, "a", 5)], 30, oe.Routing(True, window=30),
     [(oe.DEAD_LETTERED, "a", 2, oe.PENDING)]),
    # one delivery per partner
    ([_dl(1, "a", 0), _dl(2, "b", 1), _dl(3, "a", 2)], 60, oe.Routing(True, window=30),
     [(oe.DEAD_LETTERED, "a", 2, oe.PENDING), (oe.DEAD_LETTERED, "b", 1, oe.PENDING)]),
    # a full batch goes at once; the rest waits for its window
    ([_dl(i, "a", i) for i in range(5)], 5, oe.Routing(True, window=30, max_batch=2),
     [(oe.DEAD_LETTERED, "a", 2, oe.PENDING), (oe.DEAD_LETTERED, "a", 2, oe.PENDING)]),
    # other events go alone at once; no URL or a filtered type: logged only
    ([oe.Event("e1", oe.PAUSED, T0, "a")], 0, oe.Routing(True), [(oe.PAUSED, "a", 1, oe.PENDING)]),
    ([oe.Event("e1", oe.PAUSED, T0, "a")], 0, oe.Routing(False),
     [(oe.PAUSED, "a", 1, oe.SKIPPED)]),
    ([oe.Event("e1", oe.PAUSED, T0, "a")], 0, oe.Routing(True, types=(oe.ALERT_FIRED,)),
     [(oe.PAUSED, "a", 1, oe.SKIPPED)]),
])
def test_plan(events: list[oe.Event], now_s: float, routing: oe.Routing,
              expected: list[tuple[str, str, int, str]]) -> None:
    got = oe.plan(events, T0 + timedelta(seconds=now_s), routing)
    assert [(d.type, d.partner_id, len(d.event_ids), d.state) for d in got] == expected
    again = oe.plan(list(reversed(events)), T0 + timedelta(seconds=now_s), routing)
    assert [d.id for d in again] == [d.id for d in got]  # stable ids, whoever plans


@pytest.mark.parametrize(("before", "after", "expected"), [
    ("closed", "open", oe.CIRCUIT_OPENED), ("open", "half_open", None),
    ("half_open", "open", None), ("half_open", "closed", oe.CIRCUIT_CLOSED),
    ("open", "closed", oe.CIRCUIT_CLOSED), ("closed", "closed", None),
])
def test_circuit_transition(before: str, after: str, expected: str | None) -> None:
    e = oe.circuit_transition("p", before, after, reason="r", opened_at=100.0, retry_at=105.0,
                              now=110.0, by="probe")
    assert (e["type"] if e else None) == expected


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"events_url": "http://127.0.0.1:9/h"},
     "POSTBACK_EVENTS_SECRET: required when POSTBACK_EVENTS_URL is set"),
    ({"events_url": "ftp://x/h", "events_secret": SECRET},
     "POSTBACK_EVENTS_URL: must be an http:// or https:// URL"),
    ({"events_url": "http://127.0.0.1:9/h", "events_secret": "hunter2"},
     "POSTBACK_EVENTS_SECRET: must be whsec_ followed by the base64"),
    ({"events_types": ("partner.paused", "partner.exploded")},
     "POSTBACK_EVENTS_TYPES: unknown event type(s) partner.exploded"),
])
def test_bad_configuration_is_refused_with_the_variable_named(
        settings: Settings, store: Store, overrides: dict[str, Any], message: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bad = settings.with_overrides(**overrides)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bad.events.check()
    for k, v in bad.to_env().items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["events", "send"])
    assert r.exit_code == 2 and message in r.output
    from postback_worker.worker.app import check_settings

    with pytest.raises(SettingsError, match="POSTBACK_EVENTS_"):
        check_settings(bad)


def test_settings_from_env_and_example_env() -> None:
    s = Settings.from_env({"POSTBACK_EVENTS_URL": "https://oncall.example/hooks",
                           "POSTBACK_EVENTS_SECRET": SECRET,
                           "POSTBACK_EVENTS_TYPES": "alert.fired, partner.paused",
                           "POSTBACK_EVENTS_BATCH_WINDOW": "10"})
    assert s.events.types == ("alert.fired", "partner.paused")
    assert s.events.batch_window == 10.0 and s.events.problems() == []


# -- dead letters ----------------------------------------------------------------------------

def test_dead_letters_are_batched_per_partner_into_one_signed_delivery(
        make_pipeline: Callable[..., Pipeline], ev_settings: Settings, store: Store,
        partner: PartnerServer, receiver: PartnerServer, relay: Relay, now_clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    pipeline = make_pipeline(ev_settings, clock=now_clock)
    add_offer(store)
    failing_partner(store, partner, "p-auth", 401)  # dead letter at once
    convs = [conversion(f"tx{i}", now=now_clock()) for i in range(5)]
    for c in convs:
        add_click(store, c.transaction_id, clicked_at=now_clock() - timedelta(hours=1))
    pipeline.process_conversions(messages(*convs))
    pb_ids = sorted(p["id"] for c in convs for p in store.postbacks_for(c.id))
    assert len(pb_ids) == 5
    rows = store.list_operator_events(type_=oe.DEAD_LETTERED)
    assert len(rows) == 5 and {r["state"] for r in rows} == {"unplanned"}

    relay.run()  # inside the window: nothing sent yet
    assert hooks(receiver) == []
    now_clock.advance(31)
    with caplog.at_level(logging.INFO, logger="postback_worker.events"):
        result = relay.run()
    assert result.delivered == 1
    [got] = hooks(receiver)
    body = verified(got)
    assert body["type"] == oe.DEAD_LETTERED
    data = body["data"]
    assert data["partner_id"] == "p-auth" and data["count"] == 5
    assert sorted(data["postback_ids"]) == pb_ids
    assert data["failure_classes"] == {"auth": 5}
    assert got.header("webhook-id") == data["batch_id"]
    assert got.header("Content-Type") == "application/json"
    # one structured log line per event
    lines = [json.loads(r.getMessage().split(" ", 1)[1]) for r in caplog.records
             if r.getMessage().startswith("operator_event ")]
    assert sorted(x["postback_id"] for x in lines) == pb_ids
    assert {x["delivery_id"] for x in lines} == {data["batch_id"]}
    # a forged body does not verify
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(got.body.decode().replace('"count":5', '"count":6'),
                               dict(got.headers))
    assert relay.run().delivered == 0 and len(hooks(receiver)) == 1
    assert {r["state"] for r in store.list_operator_events()} == {oe.DELIVERED}


# -- circuit breaker -------------------------------------------------------------------------

def test_circuit_open_and_close_are_recorded_once_across_two_workers(
        ev_settings: Settings, store: Store, redis_url: str, redis_client: redis.Redis,
        receiver: PartnerServer, relay: Relay, now_clock: Clock) -> None:
    s = ev_settings.with_overrides(breaker_min_attempts=10, breaker_failure_ratio=0.5)
    workers = [Guardrails(redis.Redis.from_url(redis_url), s) for _ in range(2)]
    t0 = now_clock().timestamp()
    barrier = threading.Barrier(2)

    def report(g: Guardrails) -> None:
        barrier.wait()
        for i in range(10):  # both see the failure ratio cross the threshold
            g.record("p1", now=t0 + i * 0.01, total=2, failed=2, probe_ok=None,
                     retry_after_until=None)

    threads = [threading.Thread(target=report, args=(g,)) for g in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert workers[0].circuit("p1").state == "open"
    queued = [json.loads(x) for x in redis_client.lrange(EVENTS_KEY, 0, -1)]
    assert [e["type"] for e in queued] == [oe.CIRCUIT_OPENED]
    # a failed probe keeps it open (no event); a good probe closes it, once
    after = t0 + s.breaker.cooldown + 1
    for g in workers:
        g.admit("p1", ["pb1"], _limits(), after)
    workers[0].record("p1", now=after + 1, total=1, failed=1, probe_ok=False,
                      retry_after_until=None)
    later = after + 60
    workers[1].admit("p1", ["pb2"], _limits(), later)
    for g in workers:
        g.record("p1", now=later + 1, total=1, failed=0, probe_ok=True, retry_after_until=None)
    queued = [json.loads(x) for x in redis_client.lrange(EVENTS_KEY, 0, -1)]
    assert [e["type"] for e in queued] == [oe.CIRCUIT_OPENED, oe.CIRCUIT_CLOSED]
    assert queued[1]["data"]["closed_by"] == "probe"

    result = relay.run()
    assert result.moved == 2 and result.delivered == 2
    assert redis_client.llen(EVENTS_KEY) == 0
    # sent concurrently: receivers order by "timestamp", not by arrival
    bodies = sorted((verified(r) for r in hooks(receiver)), key=lambda b: b["timestamp"])
    assert [b["type"] for b in bodies] == [oe.CIRCUIT_OPENED, oe.CIRCUIT_CLOSED]
    assert "failed" in bodies[0]["data"]["reason"]
    # moving the same Redis items again (a crash before LREM) keeps one of each
    for e in queued:
        redis_client.rpush(EVENTS_KEY, json.dumps(e))
    relay.run()
    assert len(store.list_operator_events()) == 2 and len(hooks(receiver)) == 2


def _limits() -> Any:
    from postback_worker.pipeline.guardrails import Limits

    return Limits()


# -- pauses and alerts -----------------------------------------------------------------------

def test_pause_resume_via_cli_and_api_and_gone_alert_fire_resolve(
        make_pipeline: Callable[..., Pipeline], ev_settings: Settings, store: Store,
        partner: PartnerServer, receiver: PartnerServer, relay: Relay, now_clock: Clock,
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        serve: Callable[[Settings], str]) -> None:
    add_offer(store)
    add_partner(store, "p-op", partner.url, path="/ok", scope="global")
    for k, v in ev_settings.to_env().items():
        monkeypatch.setenv(k, v)
    cli = CliRunner()
    assert cli.invoke(main, ["partners", "pause", "p-op", "--reason", "maintenance"]).exit_code == 0
    assert cli.invoke(main, ["partners", "pause", "p-op", "--reason", "still"]).exit_code == 0
    base = serve(ev_settings)
    auth = {"Authorization": f"Bearer {ev_settings.security.admin_token}"}
    assert requests.post(f"{base}/v1/partners/p-op/resume", headers=auth, timeout=10).ok
    types = [r["type"] for r in store.list_operator_events(partner_id="p-op")]
    assert types == [oe.RESUMED, oe.PAUSED]  # the second pause changed nothing: no event

    # 410 Gone pauses the partner (an event) and raises the "gone" alert (fired, resolved)
    pipeline = make_pipeline(ev_settings, clock=now_clock)
    failing_partner(store, partner, "p-gone", 410)
    c = conversion("tx-g", now=now_clock())
    add_click(store, "tx-g", clicked_at=now_clock() - timedelta(hours=1))
    pipeline.process_conversions(messages(c))
    fired = [e for e in evaluate(ev_settings, store, redis_client, now=now_clock(), sinks=[])
             if e.kind == "partner_gone"]
    assert [e.action for e in fired] == ["fire"]
    resume(store, ev_settings, redis_client, "p-gone", now_clock())
    now_clock.advance(60)
    resolved = [e for e in evaluate(ev_settings, store, redis_client, now=now_clock(),
                                    sinks=[]) if e.kind == "partner_gone"]
    assert [e.action for e in resolved] == ["resolve"]
    now_clock.advance(31)  # past the dead letter's batch window
    relay.run()
    bodies = [verified(r) for r in hooks(receiver)]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for b in bodies:
        by_type.setdefault(b["type"], []).append(b["data"])
    # sent concurrently: compare without order
    paused = {d["partner_id"]: d for d in by_type[oe.PAUSED]}
    assert paused["p-op"]["paused_by"] == "operator" and paused["p-gone"]["paused_by"] == "gone"
    assert paused["p-op"]["reason"] == "maintenance" and "410 Gone" in paused["p-gone"]["reason"]
    assert sorted(d["partner_id"] for d in by_type[oe.RESUMED]) == ["p-gone", "p-op"]
    gone = [d for d in by_type[oe.ALERT_FIRED] if d["kind"] == "partner_gone"]
    assert len(gone) == 1 and gone[0]["partner_id"] == "p-gone"
    res = [d for d in by_type[oe.ALERT_RESOLVED] if d["kind"] == "partner_gone"]
    assert [d["alert_id"] for d in res] == [gone[0]["alert_id"]]
    assert by_type[oe.DEAD_LETTERED][0]["count"] == 1
    # the API lists them with their delivery state; a bad filter is a 422 naming the field
    r = requests.get(f"{base}/v1/operator-events", params={"type": oe.PAUSED}, headers=auth,
                     timeout=10)
    assert r.ok and [e["state"] for e in r.json()["events"]] == [oe.DELIVERED] * 2
    r = requests.get(f"{base}/v1/operator-events", params={"type": "nope"}, headers=auth,
                     timeout=10)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "type"
    out = cli.invoke(main, ["events", "list", "--type", oe.PAUSED])
    assert out.exit_code == 0 and "by gone" in out.output and "delivered" in out.output


# -- at least once ---------------------------------------------------------------------------

def test_receiver_down_then_up_gets_each_event_once_with_the_same_id(
        ev_settings: Settings, store: Store, receiver: PartnerServer, relay: Relay,
        now_clock: Clock, redis_client: redis.Redis) -> None:
    add_offer(store)
    add_partner(store, "p1", receiver.url, path="/pb")
    receiver.route("/hooks", 503)
    pause(store, "p1", "deploy", now_clock())
    r1 = relay.run()
    assert r1.retrying == 1 and r1.delivered == 0
    [row] = store.list_operator_events()
    assert row["state"] == oe.PENDING and row["attempts"] == 1 and row["last_status"] == 503
    text = metrics.render(ev_settings, store, redis_client, now_clock).decode()
    assert "postback_operator_events_undelivered 1.0" in text
    assert relay.run().retrying == 0  # not due yet: backoff 10 s x (0.5 + 0.5 x 0.5)
    now_clock.advance(8)
    assert relay.run().retrying == 1  # due, still down
    receiver.route("/hooks", 200)
    now_clock.advance(30)
    assert relay.run().delivered == 1
    now_clock.advance(600)
    relay.run()
    got = hooks(receiver)
    assert len(got) == 3 and len({g.header("webhook-id") for g in got}) == 1
    assert got[0].body == got[-1].body  # retries send the same body ...
    verified(got[-1])  # ... freshly signed
    [row] = store.list_operator_events()
    assert row["state"] == oe.DELIVERED and row["attempts"] == 3
    text = metrics.render(ev_settings, store, redis_client, now_clock).decode()
    assert "postback_operator_events_undelivered 0.0" in text


def test_gives_up_after_max_attempts_and_logs_without_url(
        settings: Settings, ev_settings: Settings, store: Store, receiver: PartnerServer,
        relay: Relay, now_clock: Clock, redis_client: redis.Redis) -> None:
    add_offer(store)
    add_partner(store, "p1", receiver.url, path="/pb")
    receiver.route("/hooks", 500)
    pause(store, "p1", None, now_clock())
    for _ in range(6):
        relay.run()
        now_clock.advance(120)
    [row] = store.list_operator_events()
    assert row["state"] == oe.FAILED and row["attempts"] == 5 and len(hooks(receiver)) == 5
    # without a URL, events are planned as logged only (never pending)
    sender = Sender.from_settings(settings.delivery)
    quiet = Relay(settings, store, sender, redis_client, clock=now_clock)
    resume(store, settings, redis_client, "p1", now_clock())
    assert quiet.run().skipped == 1
    assert store.list_operator_events(type_=oe.RESUMED)[0]["state"] == oe.SKIPPED
    sender.close()


def test_send_test_and_secret_cli(ev_settings: Settings, store: Store, receiver: PartnerServer,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ev_settings.to_env().items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["events", "send-test", "--message", "hello"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("delivered evt_") and "HTTP 200" in r.output
    body = verified(hooks(receiver)[0])
    assert body["type"] == oe.TEST and body["data"]["message"] == "hello"
    receiver.route("/hooks", 500)
    r = CliRunner().invoke(main, ["events", "send-test"])
    assert r.exit_code == 1 and "HTTP 500" in r.output
    secret = CliRunner().invoke(main, ["events", "secret"]).output.strip()
    assert secret.startswith("whsec_") and Webhook(secret)


def test_egress_guard_applies_to_the_receiver(settings: Settings, store: Store,
                                              receiver: PartnerServer, now_clock: Clock) -> None:
    s = settings.with_overrides(allow_networks=(), events_url=f"{receiver.url}/hooks",
                                events_secret=SECRET)
    sender = Sender.from_settings(s.delivery)
    relay = Relay(s, store, sender, None, clock=now_clock)
    add_offer(store)
    add_partner(store, "p1", receiver.url, path="/pb")
    pause(store, "p1", None, now_clock())
    assert relay.run().retrying == 1
    [row] = store.list_operator_events()
    assert "loopback" in row["last_error"] and hooks(receiver) == []
    sender.close()


# -- real processes --------------------------------------------------------------------------

@pytest.mark.e2e
def test_worker_and_beat_send_dead_letters_and_the_circuit_opening(
        ev_settings: Settings, store: Store, partner: PartnerServer, receiver: PartnerServer,
        celery_procs: Callable[..., Any]) -> None:
    """A worker dead-letters six postbacks of a partner answering 503 and opens its circuit;
    beat's relay sends one batch with the six ids and one circuit_opened, each once."""
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, max_attempts=1)
    partner.set_response(503)
    txs = [f"tx-e{i}" for i in range(6)]
    for tx in txs:
        add_click(store, tx)
    overrides = {"events_url": ev_settings.events.url, "events_secret": SECRET,
                 "events_interval": 0.5, "events_batch_window": 1.0,
                 "breaker_min_attempts": 3, "breaker_cooldown": 60.0}
    celery_procs("worker", **overrides)
    celery_procs("beat", **overrides)
    from postback_worker.producer import Producer

    ids = Producer(ev_settings).send_conversions([{"transaction_id": tx} for tx in txs])

    def sent() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for r in hooks(receiver):
            body = verified(r)
            out.setdefault(body["type"], []).append(body["data"])
        return out

    def complete() -> bool:
        got = sent()
        return (sum(d["count"] for d in got.get(oe.DEAD_LETTERED, [])) >= 6
                and len(got.get(oe.CIRCUIT_OPENED, [])) >= 1)

    wait_until(complete, 90, message="the dead letters and the circuit opening to be sent")
    got = sent()
    pb_ids = sorted(p["id"] for i in ids for p in store.postbacks_for(i))
    assert sorted(x for d in got[oe.DEAD_LETTERED] for x in d["postback_ids"]) == pb_ids
    assert len(got[oe.CIRCUIT_OPENED]) == 1 and got[oe.CIRCUIT_OPENED][0]["partner_id"] == "p1"
    webhook_ids = [r.header("webhook-id") for r in hooks(receiver)]
    assert len(webhook_ids) == len(set(webhook_ids))
