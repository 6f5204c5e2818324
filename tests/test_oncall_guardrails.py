"""Guardrails on real Redis and PostgreSQL: Lua maths, slots, pause and breaker in the pipeline.

The pipeline runs in-process with an injected clock; the partner is the real local server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pytest
import redis
from support.helpers import Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.domain import guards as g
from postback_worker.ops.oncall import partner_health
from postback_worker.pipeline.guardrails import Guardrails, Limits, circuit_states
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


@pytest.fixture()
def settings(settings: Settings) -> Settings:
    """The test settings with the breaker on (the `pipeline` fixture runs with them)."""
    return settings.with_overrides(breaker_enabled=True, breaker_min_attempts=4,
                                   breaker_cooldown=10.0,
                                   breaker_probe_timeout=30.0)


@pytest.fixture()
def guard_settings(settings: Settings) -> Settings:
    return settings


@pytest.fixture()
def pipeline_redis(redis_client: redis.Redis) -> redis.Redis:
    """The `pipeline` fixture's guardrails use the real Redis here."""
    return redis_client


def test_lua_token_bucket_matches_the_pure_maths(redis_client: redis.Redis,
                                                 settings: Settings) -> None:
    guard = Guardrails(redis_client, settings)
    bucket: g.Bucket | None = None
    steps = [(1000.0, 3), (1000.0, 5), (1000.1, 2), (1000.5, 9), (1003.0, 2), (1003.0, 20)]
    for now, want in steps:
        expected, bucket = g.take(bucket, now=now, rate=4.0, want=want)
        got, tokens = guard._take(keys=["pbw:rate:t"], args=[4.0, 4.0, now, want, 60])
        assert (int(got), float(tokens)) == (expected, pytest.approx(bucket.tokens)), now


def test_concurrency_slots_cap_expire_and_release(redis_client: redis.Redis,
                                                  settings: Settings) -> None:
    guard = Guardrails(redis_client, settings.with_overrides(breaker_enabled=False))
    limits = Limits(max_concurrency=2, timeout=1.0)
    v = guard.admit("p1", ["a", "b", "c"], limits, now=100.0)
    assert v.fire == ["a", "b"]
    assert v.wait["c"][1] == "concurrency cap of 2 reached"
    assert guard.admit("p1", ["c"], limits, now=101.0).fire == []
    guard.release_slots("p1", ["a"])
    assert guard.admit("p1", ["c", "d"], limits, now=101.0).fire == ["c"]
    # a killed worker never frees its slots: they expire after 2 x timeout + lease
    later = 101.0 + 2 * 1.0 + settings.delivery.lease_seconds + 0.1
    assert guard.admit("p1", ["d", "e"], limits, now=later).fire == ["d", "e"]


def _seed(store: Store, partner: PartnerServer, n: int, **extra: object) -> list[str]:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, **extra)
    for i in range(n):
        add_click(store, f"tx{i}")
    return [f"tx{i}" for i in range(n)]


def _postbacks(store: Store, conv_ids: list[str]) -> list[dict[str, object]]:
    return [p for c in conv_ids for p in store.postbacks_for(c)]


def _run_due(pipeline: Pipeline) -> None:
    """What beat + a worker do: sweep what is due and deliver it."""
    ids = pipeline.sweep()
    if ids:
        pipeline.deliver(ids)


def test_paused_partner_waits_without_spending_attempts_then_flows(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock,
    guard_settings: Settings, redis_client: redis.Redis,
) -> None:
    txs = _seed(store, partner, 3)
    partner_health.pause(store, "p1", "partner maintenance", clock())
    events = [conversion(tx) for tx in txs]
    result = pipeline.process_conversions(messages(*events))
    assert result.postbacks == {"waiting": 3}
    pbs = _postbacks(store, [e.id for e in events])
    assert {(p["state"], p["attempts"], p["first_attempt_at"]) for p in pbs} == {
        ("retry_scheduled", 0, None)}
    assert all(str(p["reason"]).startswith("waiting: partner paused (partner maintenance)")
               for p in pbs)
    clock.advance(guard_settings.oncall.pause_recheck + 1)
    _run_due(pipeline)  # still paused: waits again, nothing fired, nothing dropped
    assert partner.count() == 0
    assert {p["attempts"] for p in _postbacks(store, [e.id for e in events])} == {0}
    woke = partner_health.resume(store, guard_settings, redis_client, "p1", clock())
    assert woke == 3
    _run_due(pipeline)
    pbs = _postbacks(store, [e.id for e in events])
    assert [(p["state"], p["attempts"]) for p in pbs] == [("delivered", 1)] * 3
    assert sorted(partner.postback_ids()) == sorted(p["id"] for p in pbs)  # type: ignore[misc]


def test_breaker_opens_holds_attempts_probes_and_closes(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock,
    redis_client: redis.Redis,
) -> None:
    txs = _seed(store, partner, 6, max_attempts=10)
    partner.set_response(status=503)
    events = [conversion(tx) for tx in txs]
    pipeline.process_conversions(messages(*events))
    assert partner.count() == 6
    assert circuit_states(redis_client, ["p1", "other"]) == {"p1": "open", "other": "closed"}
    ids = [e.id for e in events]
    # retries come due, but the circuit is open: they wait, attempts stay at 1
    for _ in range(3):
        clock.advance(2)
        _run_due(pipeline)
    assert partner.count() == 6
    pbs = _postbacks(store, ids)
    assert {p["attempts"] for p in pbs} == {1}
    assert all(str(p["reason"]).startswith("waiting: circuit open: 6 of 6 attempts")
               for p in pbs)
    # cool-down over, partner still down: exactly one probe, which fails and re-opens
    clock.advance(10)
    _run_due(pipeline)
    assert partner.count() == 7
    assert circuit_states(redis_client, ["p1"]) == {"p1": "open"}
    assert Guardrails(redis_client, pipeline.settings).circuit("p1").cooldown == 20
    # partner recovers; the next probe succeeds, the circuit closes, the rest flow at once
    partner.set_response(status=200)
    clock.advance(21)
    _run_due(pipeline)
    assert circuit_states(redis_client, ["p1"]) == {"p1": "closed"}
    _run_due(pipeline)
    pbs = _postbacks(store, ids)
    assert {p["state"] for p in pbs} == {"delivered"}
    delivered_requests = [r.header("X-Postback-Id") for r in partner.received()[7:]]
    assert Counter(delivered_requests) == {p["id"]: 1 for p in pbs}
    assert sum(int(p["attempts"]) for p in pbs) == 6 + 2 + 5  # first tries, two probes, rest


def test_a_failed_probe_never_dead_letters_its_postback(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock,
    redis_client: redis.Redis,
) -> None:
    """A long outage: every probe fails, yet no postback is dead-lettered for it."""
    txs = _seed(store, partner, 4, max_attempts=2, horizon=100000)
    partner.set_response(status=503)
    events = [conversion(tx) for tx in txs]
    pipeline.process_conversions(messages(*events))
    assert circuit_states(redis_client, ["p1"]) == {"p1": "open"}
    for _ in range(8):  # eight cool-downs, eight failed probes, up to 2 per postback budget
        clock.advance(400)
        _run_due(pipeline)
    assert partner.count() >= 4 + 5
    pbs = _postbacks(store, [e.id for e in events])
    assert {p["state"] for p in pbs} == {"retry_scheduled"}
    partner.set_response(status=200)
    for _ in range(3):
        clock.advance(400)
        _run_due(pipeline)
    assert {p["state"] for p in _postbacks(store, [e.id for e in events])} == {"delivered"}


@pytest.mark.parametrize("breaker", [True, False], ids=["breaker-on", "breaker-off"])
def test_retry_after_holds_every_postback_of_the_partner(
    guard_settings: Settings, store: Store, partner: PartnerServer, clock: Clock,
    redis_client: redis.Redis, breaker: bool, make_pipeline: Callable[..., Pipeline],
) -> None:
    s = guard_settings.with_overrides(breaker_enabled=breaker)
    pipeline = make_pipeline(s, redis=redis_client)
    txs = _seed(store, partner, 3)
    partner.set_script([{"status": 429, "headers": {"Retry-After": "120"}}])
    first = conversion(txs[0])
    pipeline.process_conversions(messages(first))
    (pb,) = store.postbacks_for(first.id)
    assert pb["next_attempt_at"] == clock() + timedelta(seconds=120)
    # a new conversion for the same partner waits too, without an attempt
    clock.advance(1)
    second = conversion(txs[1])
    pipeline.process_conversions(messages(second))
    (pb2,) = store.postbacks_for(second.id)
    assert (pb2["state"], pb2["attempts"]) == ("retry_scheduled", 0)
    assert str(pb2["reason"]).startswith("waiting: partner asked to retry after 119s")
    assert partner.count() == 1
    clock.advance(120)
    _run_due(pipeline)
    assert [p["state"] for p in _postbacks(store, [first.id, second.id])] == ["delivered"] * 2


def test_backlog_age_counts_postbacks_waiting_for_a_pause_limit_breaker_hold_or_retry(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock,
    guard_settings: Settings, redis_client: redis.Redis,
) -> None:
    """Each partner's oldest undelivered postback waits for something else; each is in the
    backlog age (metric, dashboard, `partners health` and the alert all read it), and a
    partner whose postbacks were all delivered has none."""
    from sqlalchemy import select

    from postback_worker.ops.visibility import alerts, metrics
    from postback_worker.store import schema
    from postback_worker.store.figures import RawFigures, figures_for

    add_offer(store, "o1")
    reasons = {"p-pause": "waiting: partner paused", "p-limit": "waiting: rate limit",
               "p-breaker": "waiting: circuit open", "p-hold": "held: ",
               "p-retry": "HTTP 503", "p-ok": None}
    for pid in reasons:
        add_partner(store, pid, partner.url, path=f"/{pid}", max_attempts=10,
                    **({"hold_hours": 24} if pid == "p-hold" else {}))
    partner.route("/p-breaker", 503)
    partner.route("/p-retry", 503)
    partner_health.pause(store, "p-pause", "maintenance", clock())
    partner_health.set_limits(store, "p-limit", rate_limit=0.001, max_concurrency=None,
                              now=clock())
    sent = {"p-pause": 1, "p-limit": 3, "p-breaker": 5, "p-hold": 1, "p-retry": 1, "p-ok": 1}
    created = clock()
    for pid, n in sent.items():
        events = []
        for i in range(n):
            add_click(store, f"tx-{pid}-{i}", aff_id=pid)
            events.append(conversion(f"tx-{pid}-{i}"))
        pipeline.process_conversions(messages(*events))
    clock.advance(2)
    _run_due(pipeline)  # p-breaker's retries find its circuit open
    clock.advance(600)
    with store.engine.connect() as conn:
        rows = conn.execute(select(schema.postbacks.c.partner_id, schema.postbacks.c.state,
                                   schema.postbacks.c.reason)).all()
    for pid, prefix in reasons.items():  # each waits for what its name says
        states = {(s, str(r or "")[:len(prefix or "")]) for p, s, r in rows if p == pid}
        assert ("retry_scheduled", prefix) in states or prefix is None, (pid, states)
    backlog = figures_for(store).backlog_by_partner()
    assert backlog == RawFigures(store).backlog_by_partner()
    assert set(backlog) == set(reasons) - {"p-ok"}
    for pid, prefix in reasons.items():
        if prefix is None:
            continue
        count, oldest = backlog[pid]
        assert oldest == created, pid
        assert count == (sent[pid] - 1 if pid == "p-limit" else sent[pid]), pid
    scrape = metrics.render(guard_settings, store, redis_client, clock).decode()
    for pid in set(reasons) - {"p-ok"}:
        assert f'postback_backlog_age_seconds{{partner="{pid}"}} 602.0' in scrape, pid
    assert 'postback_backlog_age_seconds{partner="p-ok"}' not in scrape
    th = guard_settings.with_overrides(alert_backlog_age_seconds=300)
    fired = {e.key for e in alerts.evaluate(th, store, redis_client, now=clock(), sinks=[])
             if e.kind == "backlog_age"}
    assert fired == {f"backlog_age:{pid}" for pid in set(reasons) - {"p-ok"}}
