"""On-call end to end: real Celery workers and beat, Redis, PostgreSQL and the local partner.

Outage -> dead letters -> filtered replay (each delivered once; a second replay fires nothing),
template fixed -> replay renders the current template, breaker opens and closes, a rate limit
holds across two workers, re-attribution after a lifespan extension, fair lanes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis
from click.testing import CliRunner
from conftest import Proc, wait_until
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.cli import main
from postback_worker.ops.oncall import partner_health
from postback_worker.pipeline.guardrails import circuit_states
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e


def cli(settings: Settings, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=settings.to_env())
    assert result.exit_code == 0, result.output
    return result.output


def postbacks(store: Store, conv_ids: list[str]) -> list[dict[str, object]]:
    return [p for c in conv_ids for p in store.postbacks_for(c)]


def settled(store: Store, conv_ids: list[str], states: set[str]) -> bool:
    convs = [store.get_conversion(i) for i in conv_ids]
    if any(c is None or c["state"] == "received" for c in convs):
        return False
    return all(p["state"] in states for p in postbacks(store, conv_ids))


def send(settings: Settings, aff_txs: list[str]) -> list[str]:
    return Producer(settings).send_conversions([{"transaction_id": tx} for tx in aff_txs])


def test_outage_dead_letters_then_filtered_replay_delivers_each_once(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc],
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p2", partner.url, path="/pb")     # will be down (503)
    add_partner(store, "p1", partner.url, path="/old")    # wrong endpoint (404)
    partner.route("/pb", status=503)
    partner.route("/old", status=404)
    for i in range(6):
        add_click(store, f"down{i}", aff_id="p2")
    for i in range(4):
        add_click(store, f"bad{i}", aff_id="p1")
    celery_procs("worker", breaker_enabled=False)
    celery_procs("beat")
    ids = send(settings, [f"down{i}" for i in range(6)] + [f"bad{i}" for i in range(4)])
    wait_until(lambda: settled(store, ids, {"dead_lettered"}), 60, message="dead letters")
    stats = json.loads(cli(settings, "dlq", "stats", "--format", "json"))
    assert stats["by_partner"] == {"p2": 6, "p1": 4}
    assert stats["by_class"] == {"partner_5xx": 6, "config": 4}

    # p2 recovers; replay only p2's dead letters
    partner.route("/pb", status=200)
    before = partner.count()
    out = cli(settings, "dlq", "replay", "--partner", "p2", "--rate", "50/s", "--by", "tester",
              "--wait", "60")
    assert "6 dead letter(s) queued on the 'replay' queue at 50/s" in out
    assert out.strip().endswith("delivered 6, failed again 0, still pending 0")
    p2 = [p for p in postbacks(store, ids) if p["partner_id"] == "p2"]
    assert {p["state"] for p in p2} == {"delivered"}
    assert all(str(p["triggered_by"]).startswith("replay rr_") and
               str(p["triggered_by"]).endswith("by tester") for p in p2)
    after = [r.header("X-Postback-Id") for r in partner.received()[before:]]
    assert Counter(after) == {p["id"]: 1 for p in p2}  # each exactly once, only p2

    # a second run selects nothing and fires nothing
    out = cli(settings, "dlq", "replay", "--partner", "p2", "--wait", "0")
    assert out.strip() == "nothing to replay (partner_id=p2)"
    assert partner.count() == before + 6

    # p1's template is fixed; the replay renders the current template and says so
    add_partner(store, "p1", partner.url, path="/new")
    out = cli(settings, "dlq", "replay", "--class", "config", "--dry-run")
    assert "would replay 4 dead letter(s) at 10/s; 4 URL(s) rendered again with the " \
           "partner's current template" in out
    assert partner.count() == before + 6
    out = cli(settings, "dlq", "replay", "--class", "config", "--wait", "60")
    assert out.strip().endswith("delivered 4, failed again 0, still pending 0")
    new = [r for r in partner.received() if r.path == "/new"]
    assert len(new) == 4 and len({r.header("X-Postback-Id") for r in new}) == 4
    assert json.loads(cli(settings, "dlq", "stats", "--format", "json"))["total"] == 0


def test_breaker_opens_keeps_attempts_and_closes(
    settings: Settings, store: Store, partner: PartnerServer, redis_client: redis.Redis,
    celery_procs: Callable[..., Proc],
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, max_attempts=6)
    for i in range(10):
        add_click(store, f"tx{i}")
    partner.set_response(status=503)
    overrides = {"breaker_enabled": True, "breaker_min_attempts": 5, "breaker_cooldown": 1.0,
                 "breaker_max_cooldown": 2.0}
    celery_procs("worker", **overrides)
    celery_procs("beat", **overrides)
    ids = send(settings, [f"tx{i}" for i in range(10)])
    wait_until(lambda: circuit_states(redis_client, ["p1"])["p1"] != "closed", 60,
               message="the circuit to open")
    wait_until(lambda: partner.count() >= 12, 60, message="two probes")
    # the partner counts a request before the worker records its answer: wait for the record
    wait_until(lambda: sum(int(p["attempts"]) for p in postbacks(store, ids)) >= 12, 30,
               message="the probes' answers to be recorded")
    pbs = postbacks(store, ids)
    assert not [p for p in pbs if p["state"] == "dead_lettered"]  # 4-attempt schedule unspent
    probes = sum(int(p["attempts"]) for p in pbs) - 10  # type: ignore[call-overload]
    assert probes >= 2
    assert sum(1 for p in pbs if p["attempts"] == 1) >= 10 - probes
    assert partner.count() <= 10 + probes + 1  # nothing else reached the partner
    partner.set_response(status=200)
    before = partner.count()
    wait_until(lambda: settled(store, ids, {"delivered"}), 60, message="recovery")
    assert circuit_states(redis_client, ["p1"]) == {"p1": "closed"}
    ok = [r.header("X-Postback-Id") for r in partner.received()[before:]]
    assert Counter(ok) == {p["id"]: 1 for p in postbacks(store, ids)}
    health = json.loads(cli(settings, "partners", "health", "--format", "json"))
    assert health[0]["partner_id"] == "p1" and health[0]["circuit"] == "closed"


def test_rate_limit_holds_across_two_workers(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc],
) -> None:
    rate, n = 5, 30
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    partner_health.set_limits(store, "p1", rate_limit=rate, max_concurrency=None,
                              now=datetime.now(UTC))
    for i in range(n):
        add_click(store, f"tx{i}")
    celery_procs("worker", concurrency=2)
    celery_procs("worker", concurrency=2)
    celery_procs("beat")
    producer = Producer(settings)
    ids: list[str] = []
    for start in range(0, n, 10):  # three messages: both workers take some
        ids += producer.send_conversions([{"transaction_id": f"tx{i}"}
                                          for i in range(start, start + 10)])
    wait_until(lambda: settled(store, ids, {"delivered"}), 90, message="all delivered")
    times = sorted(r.at for r in partner.received())
    assert len(times) == n  # nothing fired twice, nothing dropped
    # in any one second: at most the burst (one second's worth) plus one second of refill
    busiest = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert busiest <= 2 * rate + 1, busiest
    assert times[-1] - times[0] >= 0.8 * (n - rate) / rate
    workers = {a["worker"] for a in store.attempts_for([str(p["id"])
                                                         for p in postbacks(store, ids)])}
    print(f"busiest second {busiest}, span {times[-1] - times[0]:.1f}s, workers {workers}")


def test_reattribution_after_lifespan_extension_fires_only_the_right_postbacks(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc],
) -> None:
    now = datetime.now(UTC)
    add_offer(store, "o1", "lead_gen")        # 14 days
    add_offer(store, "o2", "lead_gen")
    add_partner(store, "p1", partner.url)
    add_click(store, "fresh", clicked_at=now - timedelta(days=10))
    add_click(store, "d20", clicked_at=now - timedelta(days=20))
    add_click(store, "d25", clicked_at=now - timedelta(days=25))
    add_click(store, "d40", clicked_at=now - timedelta(days=40))
    add_click(store, "other", offer_id="o2", clicked_at=now - timedelta(days=20))
    celery_procs("worker")
    ids = send(settings, ["fresh", "d20", "d25", "d40", "other"])
    ids += Producer(settings).send_conversions([{"transaction_id": "nobody", "offer_id": "o1"}])
    wait_until(lambda: settled(store, ids, {"delivered"}), 60, message="first processing")
    states = [store.get_conversion(i)["state"] for i in ids]  # type: ignore[index]
    assert states == ["attributed", "expired_click", "expired_click", "expired_click",
                      "expired_click", "unknown_click"]
    assert partner.count() == 1
    add_offer(store, "o1", "lead_gen", lifespan_days=30)
    out = cli(settings, "reattribute", "--offer", "o1", "--dry-run")
    assert "would re-attribute 2 expired_click conversion(s); 1 stay expired" in out
    assert partner.count() == 1
    out = cli(settings, "reattribute", "--offer", "o1", "--by", "pm", "--wait", "60")
    assert "1 conversion(s) with an unknown click cannot be attributed; they stay reported " \
           "as unknown_click" in out
    assert out.strip().endswith("postbacks: delivered 2, failed 0, still pending 0")
    states = [store.get_conversion(i)["state"] for i in ids]  # type: ignore[index]
    assert states == ["attributed", "attributed", "attributed", "expired_click",
                      "expired_click", "unknown_click"]
    fired = sorted(r.query["tid"][0] for r in partner.received())
    assert fired == ["d20", "d25", "fresh"]
    for cid in ids[1:3]:
        (pb,) = store.postbacks_for(cid)
        assert str(pb["triggered_by"]).startswith("reattribute ra_")
        assert store.get_conversion(cid)["reattributed_at"] is not None  # type: ignore[index]
    out = cli(settings, "reattribute", "--offer", "o1")
    assert "re-attributing 0 expired_click conversion(s); 1 stay expired" in out
    assert partner.count() == 3


def test_a_sick_partner_does_not_hold_up_a_healthy_one(
    settings: Settings, store: Store, partner: PartnerServer, redis_client: redis.Redis,
    celery_procs: Callable[..., Proc],
) -> None:
    add_offer(store, "o1")
    add_partner(store, "ok", partner.url, path="/ok")
    add_partner(store, "sick", partner.url, path="/sick", timeout=1.0)
    partner.route("/sick", delay=30.0)  # answers far too late: every attempt times out
    waves = [[(aff, f"{aff}{w}_{i}") for i in range(10) for aff in ("ok", "sick")]
             for w in range(3)]
    for wave in waves:
        for aff, tx in wave:
            add_click(store, tx, aff_id=aff)
    overrides = {"breaker_enabled": True, "breaker_min_attempts": 5,
                 "breaker_cooldown": 60.0}
    celery_procs("worker", concurrency=2, **overrides)
    celery_procs("beat", **overrides)
    producer = Producer(settings)
    ids = producer.send_conversions([{"transaction_id": tx} for _, tx in waves[0]])
    wait_until(lambda: circuit_states(redis_client, ["sick"])["sick"] == "open", 60,
               message="the sick partner's circuit to open")
    for wave in waves[1:]:
        ids += producer.send_conversions([{"transaction_id": tx} for _, tx in wave])
    ok_convs = [i for i in ids if (store.get_conversion(i) or {}).get("transaction_id", "")
                .startswith("ok")]

    def ok_done() -> bool:
        pbs = [p for p in postbacks(store, ids) if p["partner_id"] == "ok"]
        return len(pbs) == 30 and all(p["state"] == "delivered" for p in pbs)

    wait_until(ok_done, 60, message="every healthy postback")
    pbs = postbacks(store, ids)
    ok = [p for p in pbs if p["partner_id"] == "ok"]
    sick = [p for p in pbs if p["partner_id"] == "sick"]
    assert all(p["attempts"] == 1 and p["reason"] is None for p in ok)  # never made to wait
    assert len(ok_convs) <= 30
    # the sick partner only got the first wave: later postbacks wait, attempts unspent
    sick_requests = [r for r in partner.received() if r.path == "/sick"]
    assert len(sick_requests) == 10
    later = [p for p in sick if p["attempts"] == 0]
    assert len(later) == 20
    assert all(p["state"] == "retry_scheduled" and
               str(p["reason"]).startswith("waiting: circuit open") for p in later)
    assert not [p for p in sick if p["state"] == "dead_lettered"]
    latency = [(p["delivered_at"] - p["received_at"]).total_seconds()  # type: ignore[operator]
               for p in ok]
    print(f"healthy partner latency: max {max(latency):.2f}s")


def test_replay_gives_a_new_round_of_attempts_numbered_on(
    settings: Settings, store: Store, partner: PartnerServer, celery_procs: Callable[..., Proc],
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, path="/pb", max_attempts=2)
    partner.route("/pb", status=503)
    add_click(store, "tx1", aff_id="p1")
    celery_procs("worker", breaker_enabled=False)
    celery_procs("beat")
    ids = send(settings, ["tx1"])
    wait_until(lambda: settled(store, ids, {"dead_lettered"}), 60, message="a dead letter")

    def the_postback() -> dict[str, object]:
        (pb,) = postbacks(store, ids)
        return pb

    assert the_postback()["attempts"] == 2
    assert str(the_postback()["reason"]).endswith("retries exhausted: 2 of 2 attempts")
    # Still down: the replay spends a whole new round (2 more), and says so in the same words.
    out = cli(settings, "dlq", "replay", "--partner", "p1", "--wait", "60")
    assert out.strip().endswith("delivered 0, failed again 1, still pending 0")
    pb = the_postback()
    assert pb["state"] == "dead_lettered" and pb["attempts"] == 4
    assert str(pb["reason"]).endswith("retries exhausted: 2 of 2 attempts")
    # Back up: delivered at the first attempt of the next round; attempt numbers go on.
    partner.route("/pb", status=200)
    out = cli(settings, "dlq", "replay", "--partner", "p1", "--wait", "60")
    assert out.strip().endswith("delivered 1, failed again 0, still pending 0")
    pb = the_postback()
    assert pb["state"] == "delivered" and pb["attempts"] == 5
    numbers = [a["attempt_no"] for a in store.attempts_for([str(pb["id"])])]
    assert sorted(numbers) == [1, 2, 3, 4, 5]
    assert partner.count() == 5
