"""The pipeline without Celery: real PostgreSQL, a real local partner, an injected clock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support.helpers import NOW, Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.ops.config import parse_partner
from postback_worker.pipeline.leases import lease_problem
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


def states(store: Store, conversion_id: str) -> tuple[str, list[str]]:
    conv = store.get_conversion(conversion_id)
    assert conv is not None
    return conv["state"], [p["state"] for p in store.postbacks_for(conversion_id)]


@pytest.mark.parametrize(
    ("campaign_type", "lifespan_days", "click_age_days", "expected"),
    [
        ("lead_gen", None, 13.9, "attributed"),
        ("lead_gen", None, 14.1, "expired_click"),
        ("ecommerce", None, 29, "attributed"),
        ("ecommerce", None, 31, "expired_click"),
        ("b2b_saas", None, 89, "attributed"),
        ("b2b_saas", None, 91, "expired_click"),
        ("financial", None, 119, "attributed"),
        ("financial", None, 121, "expired_click"),
        ("ecommerce", 45, 44, "attributed"),
        ("ecommerce", 45, 46, "expired_click"),
    ],
)
def test_attribution_within_click_lifespan(
    pipeline: Pipeline, store: Store, partner: PartnerServer, campaign_type: str,
    lifespan_days: int | None, click_age_days: float, expected: str,
) -> None:
    extra = {} if lifespan_days is None else {"lifespan_days": lifespan_days}
    add_offer(store, "o1", campaign_type, **extra)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1", clicked_at=NOW - timedelta(days=click_age_days))
    event = conversion("tx1", payout="5")
    pipeline.process_conversions(messages(event))
    state, postbacks = states(store, event.id)
    assert state == expected
    assert postbacks == (["delivered"] if expected == "attributed" else [])
    assert partner.count() == (1 if expected == "attributed" else 0)


def test_every_conversion_ends_in_a_recorded_state(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx-ok")
    add_click(store, "tx-old", clicked_at=NOW - timedelta(days=40))
    add_click(store, "tx-pending")
    add_click(store, "tx-orphan", aff_id="nobody")
    events = [
        conversion("tx-ok", payout="1"),
        conversion("tx-ok", payout="1"),  # same offer, transaction and goal: duplicate
        conversion("tx-ok", payout="1", goal_id="upsell"),  # another goal counts
        conversion("tx-old"),
        conversion("tx-missing"),
        conversion("tx-pending", status="pending"),
        conversion("tx-orphan"),
        conversion("tx-ok", offer_id="other-offer"),
    ]
    result = pipeline.process_conversions(messages(*events))
    got = [states(store, e.id)[0] for e in events]
    assert got == ["attributed", "duplicate", "attributed", "expired_click", "unknown_click",
                   "rejected_status", "attributed", "unknown_click"]
    reasons = [store.get_conversion(e.id)["reason"] for e in events]  # type: ignore[index]
    assert "duplicate of conversion " + events[0].id in reasons[1]
    assert "40.0 days before the conversion; offer lifespan is 30 days" in reasons[3]
    assert "tx-missing" in reasons[4]
    assert "fires no partner" in reasons[5]
    assert "no postback destination for affiliate 'nobody'" in reasons[6]
    assert result.conversions == {"attributed": 3, "duplicate": 1, "expired_click": 1,
                                  "unknown_click": 2, "rejected_status": 1}
    skipped = store.postbacks_for(events[5].id)
    assert [(p["state"], p["reason"]) for p in skipped] == [
        ("skipped", "status 'pending' does not fire this partner (fires on: approved)")
    ]
    assert partner.count() == 2


def test_duplicates_across_batches_and_allow_multiple(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    add_offer(store, "o2", allow_multiple=True)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    add_click(store, "tx2", offer_id="o2")
    first, second = conversion("tx1"), conversion("tx1")
    multi = [conversion("tx2"), conversion("tx2")]
    pipeline.process_conversions(messages(first, *multi))
    pipeline.process_conversions(messages(second))
    assert states(store, second.id)[0] == "duplicate"
    assert [states(store, e.id)[0] for e in multi] == ["attributed", "attributed"]
    assert partner.count() == 3


def test_macro_values_are_url_encoded(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1", aff_sub="a&b=c d/é#x")
    event = conversion("tx1", payout="12.50")
    pipeline.process_conversions(messages(event))
    (req,) = partner.requests
    assert req.query["sub"] == ["a&b=c d/é#x"]
    assert req.query["payout"] == ["12.50"]
    assert req.query["tid"] == ["tx1"]
    assert set(req.query) == {"tid", "payout", "sub", "pb", "cv"}
    postback = store.postbacks_for(event.id)[0]
    assert req.query["pb"] == [postback["id"]] == [req.header("X-Postback-Id")]
    assert req.query["cv"] == [event.id]


def test_one_postback_per_destination(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    add_offer(store, "o2")
    add_partner(store, "p1", partner.url, "/own")
    add_partner(store, "tracker", partner.url, "/global", scope="global")
    add_partner(store, "o2-only", partner.url, "/o2", scope="global", offer_ids="o2")
    add_partner(store, "p2", partner.url, "/other")
    add_click(store, "tx1")
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    assert sorted(p["partner_id"] for p in store.postbacks_for(event.id)) == ["p1", "tracker"]
    assert sorted(r.path for r in partner.requests) == ["/global", "/own"]


def test_retry_schedule_then_delivery(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    partner.set_script([503, 503])
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    (pb,) = store.postbacks_for(event.id)
    assert pb["state"] == "retry_scheduled"
    # base 0.2 s, rand 0.5, jitter 0.5: first delay 0.2 * 0.75 = 0.15 s
    assert pb["next_attempt_at"] == NOW + timedelta(seconds=0.15)
    assert pipeline.sweep() == []  # not due yet
    clock.advance(0.15)
    assert pipeline.sweep() == [pb["id"]]
    pipeline.deliver([pb["id"]])
    (pb,) = store.postbacks_for(event.id)
    assert pb["state"] == "retry_scheduled"
    assert pb["next_attempt_at"] == clock.now + timedelta(seconds=0.3)
    clock.advance(0.3)
    pipeline.deliver(pipeline.sweep())
    (pb,) = store.postbacks_for(event.id)
    assert (pb["state"], pb["attempts"], pb["last_status"]) == ("delivered", 3, 200)
    attempts = store.attempts_for([pb["id"]])
    assert [(a["attempt_no"], a["status_code"], a["failure_class"]) for a in attempts] == [
        (1, 503, "partner_5xx"), (2, 503, "partner_5xx"), (3, 200, "delivered")]
    assert partner.count() == 3


@pytest.mark.parametrize(
    ("status", "failure_class", "attempts"),
    [(503, "partner_5xx", 4), (401, "auth", 1), (403, "blocked", 1), (404, "config", 1),
     (302, "config", 1), (429, "throttled", 4)],
)
def test_dead_letters(pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock,
                      status: int, failure_class: str, attempts: int) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    partner.set_response(status=status, headers={"Location": "http://elsewhere.example/"})
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    for _ in range(10):
        clock.advance(5)
        pipeline.deliver(pipeline.sweep())
    (pb,) = store.postbacks_for(event.id)
    assert (pb["state"], pb["attempts"], pb["last_class"]) == (
        "dead_lettered", attempts, failure_class)
    assert partner.count() == attempts
    with store.engine.connect() as conn:
        from sqlalchemy import select

        from postback_worker.store.schema import dead_letters

        (dl,) = conn.execute(select(dead_letters)).mappings().all()
    assert (dl["postback_id"], dl["failure_class"], dl["last_status"], dl["attempts"],
            dl["offer_id"]) == (pb["id"], failure_class, status, attempts, "o1")


def test_retry_after_is_honoured(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, max_delay=100)
    add_click(store, "tx1")
    partner.set_script([{"status": 429, "headers": {"Retry-After": "30"}}])
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    (pb,) = store.postbacks_for(event.id)
    assert pb["next_attempt_at"] == NOW + timedelta(seconds=30)
    clock.advance(29)
    assert pipeline.sweep() == []
    clock.advance(1)
    pipeline.deliver(pipeline.sweep())
    assert store.postbacks_for(event.id)[0]["state"] == "delivered"


def test_template_that_cannot_render_is_dead_lettered_without_firing(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    # A template broken after it was saved (e.g. edited in the database by hand).
    with store.engine.begin() as conn:
        from sqlalchemy import update

        from postback_worker.store.schema import partners

        conn.execute(update(partners).values(postback_url="http://x/{nope"))
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    (pb,) = store.postbacks_for(event.id)
    assert pb["state"] == "dead_lettered"
    assert "template cannot render" in pb["reason"]
    assert partner.count() == 0


def test_success_check_and_disabled_partner(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, success_check="success=true")
    add_partner(store, "off", partner.url, enabled=False)
    add_click(store, "tx1")
    add_click(store, "tx2", aff_id="off")
    partner.set_response(status=200, body=b"success=false")
    a, b = conversion("tx1"), conversion("tx2")
    pipeline.process_conversions(messages(a, b))
    (pa,) = store.postbacks_for(a.id)
    assert (pa["state"], pa["last_class"]) == ("dead_lettered", "config")
    (pb,) = store.postbacks_for(b.id)
    assert (pb["state"], pb["reason"]) == ("skipped", "partner disabled")
    assert partner.count() == 1


def test_reprocessing_the_same_message_fires_nothing_twice(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    for i in range(20):
        add_click(store, f"tx{i}")
    batch = messages(*[conversion(f"tx{i}") for i in range(20)])
    pipeline.process_conversions(batch)
    pipeline.process_conversions(batch)
    assert partner.count() == 20
    assert len(set(partner.postback_ids())) == 20


def test_interrupted_delivery_is_resumed_after_the_lease(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock, settings: Settings
) -> None:
    """A worker that claimed postbacks and died: the lease expires and they are fired."""
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    event = conversion("tx1")
    pipeline.dispatch.sender, real = _DeadSender(), pipeline.dispatch.sender
    with pytest.raises(RuntimeError):
        pipeline.process_conversions(messages(event))
    pipeline.dispatch.sender = real
    (pb,) = store.postbacks_for(event.id)
    assert pb["state"] == "in_flight"
    assert pipeline.deliver([pb["id"]]).postbacks == {}  # lease still held
    clock.advance(settings.delivery.lease_seconds + 1)
    pipeline.deliver(pipeline.sweep())
    assert store.postbacks_for(event.id)[0]["state"] == "delivered"
    assert partner.postback_ids() == [pb["id"]]


class _DeadSender:
    def send_iter(self, requests: object) -> list[object]:
        raise RuntimeError("worker died mid-flight")


def test_sweep_skips_nothing_and_takes_each_due_postback_once(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock
) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    partner.set_response(status=503)
    events = []
    for i in range(30):
        add_click(store, f"tx{i}")
        events.append(conversion(f"tx{i}"))
    pipeline.process_conversions(messages(*events))
    clock.advance(10)
    first = pipeline.sweep()
    second = pipeline.sweep()
    assert len(first) == 30 and second == []


def test_received_url_of_attempt_is_masked(
    pipeline: Pipeline, store: Store, partner: PartnerServer
) -> None:
    add_offer(store, "o1")
    row = {"id": "p1", "postback_url": partner.url + "/pb?token=s3cret&tid={transaction_id}"}
    store.upsert_partner(parse_partner(row, NOW))
    add_click(store, "tx1")
    event = conversion("tx1")
    pipeline.process_conversions(messages(event))
    (attempt,) = store.attempts_for([store.postbacks_for(event.id)[0]["id"]])
    assert "s3cret" not in attempt["url"] and "token=***" in attempt["url"]
    assert partner.requests[0].query["token"] == ["s3cret"]


def test_long_batch_renews_its_leases(
    pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock, settings: Settings
) -> None:
    """A batch that takes longer than a lease keeps its unanswered postbacks claimed."""
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    for i in range(3):
        add_click(store, f"tx{i}")
    events = [conversion(f"tx{i}") for i in range(3)]
    seen: list[list[str]] = []
    real = pipeline.dispatch.sender

    class SlowSender:
        def send_iter(self, reqs: list[object]):  # type: ignore[no-untyped-def]
            for i, outcome in enumerate(real.send_many(reqs)):  # type: ignore[arg-type]
                clock.advance(settings.delivery.lease_seconds * 0.9)
                seen.append(pipeline.sweep())  # another worker's sweeper must find nothing
                yield i, outcome

    pipeline.dispatch.settings = settings.with_overrides(delivery_concurrency=1)
    pipeline.dispatch.sender = SlowSender()  # type: ignore[assignment]
    pipeline.process_conversions(messages(*events))
    assert seen == [[], [], []]
    assert all(states(store, e.id)[1] == ["delivered"] for e in events)
    assert partner.count() == 3


def test_leases_are_renewed_while_no_answer_comes(
    settings: Settings, store: Store, partner: PartnerServer,
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """A request slower than a lease: the lease is renewed on elapsed time (not only when
    answers come), so a sweeper running meanwhile finds nothing to fire again."""
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, timeout=6)
    add_click(store, "tx1")
    partner.set_response(status=200, delay=4.0)
    s = settings.with_overrides(lease_seconds=3)  # renewed every second

    def real_clock() -> datetime:
        return datetime.now(UTC)

    worker, sweeper = make_pipeline(s, clock=real_clock), make_pipeline(s, clock=real_clock)
    found: list[str] = []
    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(0.2):
            found.extend(sweeper.sweep())

    thread = threading.Thread(target=sweep)
    thread.start()
    event = conversion("tx1")
    try:
        worker.process_conversions(messages(event))
    finally:
        stop.set()
        thread.join()
    assert found == []
    (pb,) = store.postbacks_for(event.id)
    assert (pb["state"], pb["attempts"], partner.count()) == ("delivered", 1, 1)


def _twelve_in_groups_of_four(store: Store, partner: PartnerServer, settings: Settings,
                              make_pipeline: Callable[..., Pipeline]) -> tuple[list[Any], Pipeline]:
    """12 attributable conversions and a pipeline saving answers in groups of 4."""
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    events = [conversion(f"tx{i}") for i in range(12)]
    for i in range(12):
        add_click(store, f"tx{i}")
    return events, make_pipeline(settings.with_overrides(record_batch=4, record_wait_ms=60_000))


def test_answers_are_saved_in_small_groups_as_they_arrive(
    settings: Settings, store: Store, partner: PartnerServer,
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """With groups of 4, answers are saved while the batch is still firing (not once at the
    end): before each answer is handled, every complete group before it is saved."""
    events, pipeline = _twelve_in_groups_of_four(store, partner, settings, make_pipeline)
    real = pipeline.dispatch.sender
    saved_before: list[int] = []

    def saved() -> int:
        return len(store.attempts_for([p["id"] for e in events
                                       for p in store.postbacks_for(e.id)]))

    class Watching:
        def send_iter(self, reqs: list[object]):  # type: ignore[no-untyped-def]
            for index, outcome in real.send_iter(reqs):  # type: ignore[arg-type]
                saved_before.append(saved())
                yield index, outcome

    pipeline.dispatch.sender = Watching()  # type: ignore[assignment]
    pipeline.process_conversions(messages(*events))
    assert saved_before == [k - k % 4 for k in range(12)]
    assert saved() == 12 and partner.count() == 12


def test_answers_already_received_join_the_save(
    settings: Settings, store: Store, partner: PartnerServer,
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """A save takes every answer that has already come with it: when 12 answers are in by the
    time the first is handled, groups of 4 make one save of 12, not three (a slow database
    gets fewer, larger transactions; no answer waits for a later save)."""
    from concurrent.futures import Future

    from postback_worker.delivery.sender import Answers

    events, pipeline = _twelve_in_groups_of_four(store, partner, settings, make_pipeline)
    real = pipeline.dispatch.sender

    class AllIn:
        def send_iter(self, reqs: list[object]) -> Answers:
            futures = []
            for outcome in real.send_many(reqs):  # type: ignore[arg-type]
                f: Future[object] = Future()
                f.set_result(outcome)
                futures.append(f)
            return Answers(futures)  # type: ignore[arg-type]

    saves: list[int] = []
    finish = store.finish

    def counting(**kw: object) -> int:
        saves.append(len(kw["updates"]))  # type: ignore[arg-type]
        return finish(**kw)  # type: ignore[arg-type]

    pipeline.dispatch.sender = AllIn()  # type: ignore[assignment]
    store.finish = counting  # type: ignore[method-assign]
    result = pipeline.process_conversions(messages(*events))
    assert saves == [12]
    assert result.postbacks == {"delivered": 12} and partner.count() == 12


@pytest.mark.parametrize(
    ("lease", "default_timeout", "partners", "problem"),
    [
        (120, 10.0, {"p1": 10.0, "p2": 30.0}, None),
        (20, 10.0, {"p1": 10.0}, None),
        (15, 10.0, {}, "(10 s, POSTBACK_DEFAULT_TIMEOUT)"),  # issue 15: lease 15, timeout 10
        (30, 10.0, {"p1": 4.0, "slow": 16.0}, "(16 s, the timeout of partner slow)"),
        (5, 2.0, {"p1": 2.5}, None),
        (2, 0.5, {}, "at least 3 s"),
    ],
)
def test_lease_must_be_twice_the_longest_timeout(
    lease: int, default_timeout: float, partners: dict[str, float], problem: str | None
) -> None:
    s = Settings.build(lease_seconds=lease, default_timeout=default_timeout)
    found = lease_problem(s, partners)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        assert found.startswith(f"POSTBACK_LEASE_SECONDS={lease} is too short")
