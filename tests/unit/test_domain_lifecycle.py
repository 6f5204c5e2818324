from datetime import UTC, datetime, timedelta

import pytest

from postback_worker.domain.lifecycle import (
    DEAD,
    DuplicateMode,
    Earlier,
    EventKind,
    FireRule,
    Gate,
    Plan,
    Snapshot,
    Trigger,
    classify,
    decide,
    describe_change,
    gate,
    hold_for,
    is_stale,
    merge,
    parse_duplicate_mode,
    parse_fire_on,
    triggers,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
P = Snapshot("pending", "10", None, "USD")
A = Snapshot("approved", "10", None, "USD")
A_SAME = Snapshot("approved", "10.00", None, "usd")
A_ADJ = Snapshot("approved", "12.5", None, "USD")
R = Snapshot("rejected", "12.5", None, "USD")
REV = Snapshot("reversed", "10", None, "USD")
ALL = frozenset(Trigger)
FULL = frozenset({Trigger.APPROVED, Trigger.REVERSAL, Trigger.ADJUSTMENT})


@pytest.mark.parametrize("previous, incoming, kind", [
    (None, P, EventKind.CREATED),
    (P, A, EventKind.STATUS_CHANGED),
    (A, A_ADJ, EventKind.ADJUSTED),
    (A, A_SAME, EventKind.REPEAT),  # 10 == 10.00, usd == USD
    (A, Snapshot("approved", "10", "99", "USD"), EventKind.ADJUSTED),  # a new sale amount
    (A, Snapshot("approved", "10", None, "EUR"), EventKind.ADJUSTED),  # a new currency
    (A_ADJ, R, EventKind.STATUS_CHANGED),
])
def test_classify(previous: Snapshot | None, incoming: Snapshot, kind: EventKind) -> None:
    assert classify(previous, incoming) == kind


@pytest.mark.parametrize("previous, incoming, merged", [
    (A, Snapshot("rejected"), Snapshot("rejected", "10", None, "USD")),
    (A, Snapshot("approved", "11"), Snapshot("approved", "11", None, "USD")),
    (A, Snapshot("approved", None, "50", "EUR"), Snapshot("approved", "10", "50", "EUR")),
])
def test_merge_keeps_amounts_not_sent(previous: Snapshot, incoming: Snapshot,
                                      merged: Snapshot) -> None:
    assert merge(previous, incoming) == merged


@pytest.mark.parametrize("value, allow_multiple, mode", [
    (None, False, DuplicateMode.UPDATE),
    (None, True, DuplicateMode.SEPARATE),
    ("", True, DuplicateMode.SEPARATE),
    ("ignore", True, DuplicateMode.IGNORE),
    ("UPDATE", False, DuplicateMode.UPDATE),
    ("separate", False, DuplicateMode.SEPARATE),
])
def test_duplicate_mode(value: str | None, allow_multiple: bool, mode: DuplicateMode) -> None:
    assert parse_duplicate_mode(value, allow_multiple) == mode


def test_duplicate_mode_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="update, ignore, separate"):
        parse_duplicate_mode("increment")


@pytest.mark.parametrize("names, expected", [
    ([], {Trigger.APPROVED}),
    (["approved", " Reversal "], {Trigger.APPROVED, Trigger.REVERSAL}),
    (["adjustment", "", "status"], {Trigger.ADJUSTMENT, Trigger.STATUS}),
])
def test_parse_fire_on(names: list[str], expected: set[Trigger]) -> None:
    assert parse_fire_on(names) == expected


def test_parse_fire_on_names_the_unknown() -> None:
    with pytest.raises(ValueError, match="'refund'"):
        parse_fire_on(["approved", "refund"])


TRIGGER_ROWS = [
    # default partner: entering approved only
    (None, P, frozenset({Trigger.APPROVED}), None),
    (None, A, frozenset({Trigger.APPROVED}), Trigger.APPROVED),
    (P, A, frozenset({Trigger.APPROVED}), Trigger.APPROVED),
    (A, A_ADJ, frozenset({Trigger.APPROVED}), None),
    (A_ADJ, R, frozenset({Trigger.APPROVED}), None),
    (A, A_SAME, frozenset({Trigger.APPROVED}), None),
    # approved + reversal + adjustment
    (P, A, FULL, Trigger.APPROVED),
    (A, A_ADJ, FULL, Trigger.ADJUSTMENT),
    (A_ADJ, R, FULL, Trigger.REVERSAL),
    (A, REV, FULL, Trigger.REVERSAL),
    (P, R, FULL, None),  # never approved: not a reversal
    (Snapshot("pending", "10"), Snapshot("pending", "11"), FULL, None),  # not approved
    (A, A_SAME, FULL, None),
    # any status change
    (None, P, ALL, Trigger.STATUS),
    (P, R, ALL, Trigger.STATUS),
    (P, A, ALL, Trigger.APPROVED),  # the most specific trigger names it
    (A, R, frozenset({Trigger.STATUS}), Trigger.STATUS),
    (A, A_ADJ, frozenset({Trigger.STATUS}), None),
]


@pytest.mark.parametrize("previous, current, fire_on, expected", TRIGGER_ROWS)
def test_triggers(previous: Snapshot | None, current: Snapshot, fire_on: frozenset[Trigger],
                  expected: Trigger | None) -> None:
    assert triggers(previous, current, FireRule(fire_on=fire_on)) == expected


def test_fire_statuses_other_than_approved() -> None:
    rule = FireRule(fire_statuses=frozenset({"pending", "approved"}),
                    fire_on=frozenset({Trigger.APPROVED}))
    assert triggers(None, P, rule) == Trigger.APPROVED
    assert triggers(P, A, rule) == Trigger.APPROVED


@pytest.mark.parametrize("trigger, expected", [
    (Trigger.APPROVED, "https://p.example/a?t={transaction_id}"),
    (Trigger.REVERSAL, "https://p.example/rev?t={transaction_id}"),
])
def test_template_per_trigger(trigger: Trigger, expected: str) -> None:
    rule = FireRule(templates={"reversal": "https://p.example/rev?t={transaction_id}"})
    assert rule.template(trigger, "https://p.example/a?t={transaction_id}") == expected


@pytest.mark.parametrize("status, name", [("approved", "sale"), ("pending", "lead"),
                                          ("rejected", "rejected")])
def test_status_map(status: str, name: str) -> None:
    assert FireRule(status_map={"approved": "sale", "pending": "lead"}).status_name(
        status) == name


@pytest.mark.parametrize("offer, partner, hours", [
    (None, None, 0), (24, None, 24), (24, 0, 0), (None, 6, 6), (24, 48, 48), (-3, None, 0),
])
def test_hold_for(offer: float | None, partner: float | None, hours: float) -> None:
    assert hold_for(offer, partner) == timedelta(hours=hours)


HOLD = timedelta(hours=24)
HELD_APPROVED = Earlier("pb1", "approved", "retry_scheduled", NOW + HOLD, held=True)
SENT_APPROVED = Earlier("pb1", "approved", "delivered")


@pytest.mark.parametrize("previous, current, fire_on, hold, earlier, plan, trigger", [
    (P, A, FULL, timedelta(0), [], Plan.FIRE, Trigger.APPROVED),
    (P, A, FULL, HOLD, [], Plan.HOLD, Trigger.APPROVED),
    (None, P, FULL, HOLD, [], Plan.NONE, None),
    # a reversal inside the hold cancels the held postback, fires nothing
    (A, R, FULL, HOLD, [HELD_APPROVED], Plan.CANCEL, Trigger.REVERSAL),
    (A, R, frozenset({Trigger.APPROVED}), HOLD, [HELD_APPROVED], Plan.CANCEL, None),
    # after the hold released it, a reversal fires as usual
    (A, R, FULL, HOLD, [SENT_APPROVED], Plan.FIRE, Trigger.REVERSAL),
    # an adjustment is not held (it waits behind the held approved one by order)
    (A, A_ADJ, FULL, HOLD, [HELD_APPROVED], Plan.FIRE, Trigger.ADJUSTMENT),
])
def test_decide(previous: Snapshot | None, current: Snapshot, fire_on: frozenset[Trigger],
                hold: timedelta, earlier: list[Earlier], plan: Plan,
                trigger: Trigger | None) -> None:
    d = decide(previous, current, FireRule(fire_on=fire_on), hold=hold, earlier=earlier,
               event_at=NOW)
    assert (d.plan, d.trigger) == (plan, trigger)
    if plan == Plan.HOLD:
        assert d.release_at == NOW + hold
        assert d.reason == "held: 24 h hold period, until 2026-03-02T12:00:00Z"
    if plan == Plan.CANCEL:
        assert d.cancel == ("pb1",)
        assert "during the hold period" in d.reason
    if plan == Plan.NONE:
        assert "does not fire" in d.reason


RECHECK = timedelta(seconds=5)


@pytest.mark.parametrize("earlier, expected, until", [
    ([], Gate.GO, None),
    ([Earlier("a", "approved", "delivered")], Gate.GO, None),
    ([Earlier("a", "approved", "skipped")], Gate.GO, None),
    ([Earlier("a", "approved", "retry_scheduled", NOW + timedelta(minutes=3))], Gate.WAIT,
     NOW + timedelta(minutes=3)),
    ([Earlier("a", "approved", "in_flight", NOW - timedelta(seconds=1))], Gate.WAIT,
     NOW + RECHECK),
    ([Earlier("a", "approved", "retry_scheduled", NOW + HOLD, held=True)], Gate.WAIT,
     NOW + HOLD),
    ([Earlier("a", "approved", "pending")], Gate.WAIT, NOW + RECHECK),
    ([Earlier("a", "approved", DEAD)], Gate.BLOCKED, None),
    ([Earlier("a", "approved", "delivered"), Earlier("b", "adjustment", "retry_scheduled")],
     Gate.WAIT, NOW + RECHECK),  # b waits behind a dead letter elsewhere: no next attempt
])
def test_gate(earlier: list[Earlier], expected: Gate, until: datetime | None) -> None:
    order = gate(earlier, NOW, RECHECK)
    assert (order.gate, order.until) == (expected, until)
    if expected == Gate.BLOCKED:
        assert order.reason == ("waiting: earlier postback a (approved) was dead-lettered; "
                                "replaying it releases this one")
    if expected == Gate.WAIT:
        first = next(e for e in earlier if e.state not in {"delivered", "skipped"})
        what = "held" if first.held else first.state
        assert order.reason == f"waiting: earlier postback {first.id} ({first.trigger}) is {what}"


@pytest.mark.parametrize("previous, current, text", [
    (None, P, "created pending"),
    (P, A, "pending -> approved"),
    (A, A_ADJ, "payout 10 -> 12.5"),
    (A, A_SAME, "repeat of approved (no change)"),
    (A_ADJ, Snapshot("rejected", "0", None, "USD"), "approved -> rejected; payout 12.5 -> 0"),
])
def test_describe_change(previous: Snapshot | None, current: Snapshot, text: str) -> None:
    assert describe_change(previous, current, classify(previous, current)) == text


T0 = NOW
T1 = NOW + timedelta(seconds=1)


@pytest.mark.parametrize("last, incoming, stale", [
    ((T0, T0), (T1, T1), False),
    ((T1, T1), (T0, T1), True),  # the advertiser says it happened before the last one
    ((T0, T1), (T0, T0), True),  # same moment, received before: a late redelivery
    ((T0, T0), (T0, T0), False),
])
def test_is_stale(last: tuple[datetime, datetime], incoming: tuple[datetime, datetime],
                  stale: bool) -> None:
    assert is_stale(last, incoming) is stale
