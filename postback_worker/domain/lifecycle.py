"""Conversion lifecycle (pure): events -> which postbacks, in which order, held or not.

A conversion (offer + transaction id + goal) has a history of events: created with a status,
status changed, amounts adjusted, or an exact repeat (recorded, changes nothing). Each partner
says which of those fire it (`FireRule`); each firing is one postback per (conversion, partner,
event), delivered in event order (`gate`). An offer's hold period (overridable per partner)
delays approved postbacks; a reversal during the hold cancels them and fires nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum

from postback_worker.domain.payout import PayoutRule, payout_macros
from postback_worker.domain.postback import PostbackState

APPROVED = "approved"
# Statuses that reverse a conversion the partner was told about (refunds, chargebacks, ...).
REVERSAL_STATUSES: frozenset[str] = frozenset(
    {"rejected", "reversed", "declined", "refunded", "chargeback", "cancelled"}
)
MAX_HOLD_HOURS = 90 * 24


class EventKind(StrEnum):
    """How an advertiser event relates to the conversion it updates."""

    CREATED = "created"
    STATUS_CHANGED = "status_changed"
    ADJUSTED = "adjusted"  # same status, other amounts
    REPEAT = "repeat"  # same status and amounts: recorded, changes nothing
    STALE = "stale"  # older than the conversion's last event: recorded, changes nothing


class DuplicateMode(StrEnum):
    """Per offer: what a new event for a known conversion key means."""

    UPDATE = "update"  # an update of that conversion (default)
    IGNORE = "ignore"  # recorded as a duplicate, nothing else
    SEPARATE = "separate"  # a conversion of its own (the former allow_multiple)


class Trigger(StrEnum):
    """What fires a partner; also the value of the `{event}` macro."""

    APPROVED = "approved"  # entering one of the partner's fire statuses (default: approved)
    REVERSAL = "reversal"  # a conversion that fired the partner moves to a reversal status
    ADJUSTMENT = "adjustment"  # amounts change while the conversion stays in a fire status
    STATUS = "status"  # any other status change


DEFAULT_FIRE_ON: frozenset[Trigger] = frozenset({Trigger.APPROVED})
# When one change matches several triggers, the most specific names the postback.
_PRECEDENCE = (Trigger.APPROVED, Trigger.REVERSAL, Trigger.ADJUSTMENT, Trigger.STATUS)


def parse_duplicate_mode(value: str | None, allow_multiple: bool = False) -> DuplicateMode:
    """The offer's mode; without one, `allow_multiple` means separate, else update."""
    if value is None or value == "":
        return DuplicateMode.SEPARATE if allow_multiple else DuplicateMode.UPDATE
    try:
        return DuplicateMode(value.strip().lower())
    except ValueError:
        modes = ", ".join(m.value for m in DuplicateMode)
        raise ValueError(f"must be one of {modes}") from None


def parse_fire_on(values: Iterable[str]) -> frozenset[Trigger]:
    """Triggers from names; raises ValueError naming the unknown ones."""
    out: set[Trigger] = set()
    bad: list[str] = []
    for raw in values:
        name = raw.strip().lower()
        if not name:
            continue
        try:
            out.add(Trigger(name))
        except ValueError:
            bad.append(raw.strip())
    if bad:
        names = ", ".join(t.value for t in Trigger)
        raise ValueError(f"unknown {', '.join(repr(b) for b in bad)}; use {names}")
    return frozenset(out) if out else DEFAULT_FIRE_ON


@dataclass(frozen=True)
class Snapshot:
    """A conversion's status and amounts (amounts as the decimal strings received)."""

    status: str
    payout: str | None = None
    sale_amount: str | None = None
    currency: str | None = None


def _amount(value: str | None) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        return None


def same_amounts(a: Snapshot, b: Snapshot) -> bool:
    """Equal payout, sale amount and currency (10 and 10.00 are the same amount)."""
    return (_amount(a.payout) == _amount(b.payout)
            and _amount(a.sale_amount) == _amount(b.sale_amount)
            and (a.currency or "").upper() == (b.currency or "").upper())


def classify(previous: Snapshot | None, incoming: Snapshot) -> EventKind:
    """The kind of `incoming` given the conversion's current state (None: new conversion)."""
    if previous is None:
        return EventKind.CREATED
    if previous.status != incoming.status:
        return EventKind.STATUS_CHANGED
    if not same_amounts(previous, incoming):
        return EventKind.ADJUSTED
    return EventKind.REPEAT


def is_stale(last: tuple[datetime, datetime], incoming: tuple[datetime, datetime]) -> bool:
    """True when an event (occurred_at, received_at) is older than the last one applied: it
    arrived late (another worker applied a newer event first) and must not undo it."""
    return incoming < last


def merge(previous: Snapshot, incoming: Snapshot) -> Snapshot:
    """The conversion after an update: amounts not sent keep their previous values."""
    return Snapshot(
        status=incoming.status,
        payout=incoming.payout if incoming.payout is not None else previous.payout,
        sale_amount=(incoming.sale_amount if incoming.sale_amount is not None
                     else previous.sale_amount),
        currency=incoming.currency if incoming.currency is not None else previous.currency,
    )


@dataclass(frozen=True)
class FireRule:
    """One partner's firing options (defaults: entering approved fires, nothing else)."""

    fire_statuses: frozenset[str] = frozenset({APPROVED})
    fire_on: frozenset[Trigger] = DEFAULT_FIRE_ON
    # Template per trigger; a trigger without one uses the partner's postback_url.
    templates: Mapping[str, str] = field(default_factory=dict)
    # `{status}` as the partner calls it, e.g. {"approved": "sale", "pending": "lead"}.
    status_map: Mapping[str, str] = field(default_factory=dict)

    def template(self, trigger: Trigger, default: str) -> str:
        return self.templates.get(trigger.value) or default

    def status_name(self, status: str) -> str:
        return self.status_map.get(status, status)


def triggers(previous: Snapshot | None, current: Snapshot, rule: FireRule) -> Trigger | None:
    """Which trigger (if any) the change from `previous` to `current` fires for a partner.

    `previous` is None for a new conversion. At most one postback per event and partner: the
    most specific trigger wins (approved, reversal, adjustment, status).
    """
    matched: set[Trigger] = set()
    changed = previous is None or previous.status != current.status
    if changed and current.status in rule.fire_statuses:
        matched.add(Trigger.APPROVED)
    if (previous is not None and changed and previous.status in rule.fire_statuses
            and current.status in REVERSAL_STATUSES):
        matched.add(Trigger.REVERSAL)
    if (previous is not None and not changed and current.status in rule.fire_statuses
            and not same_amounts(previous, current)):
        matched.add(Trigger.ADJUSTMENT)
    if changed:
        matched.add(Trigger.STATUS)
    for trigger in _PRECEDENCE:
        if trigger in matched and trigger in rule.fire_on:
            return trigger
    return None


def hold_for(offer_hold_hours: float | None, partner_hold_hours: float | None) -> timedelta:
    """The hold period: the partner's override, else the offer's, else none."""
    hours = partner_hold_hours if partner_hold_hours is not None else offer_hold_hours
    return timedelta(hours=max(0.0, hours or 0.0))


# -- one partner's postbacks for one event --------------------------------------------------

class Plan(StrEnum):
    """What becomes of one (conversion, partner, event)."""

    FIRE = "fire"  # a postback, fired in order
    HOLD = "hold"  # a postback that waits for the hold period first
    CANCEL = "cancel"  # nothing fires: a reversal during the hold (earlier held ones cancelled)
    NONE = "none"  # the event does not fire this partner


@dataclass(frozen=True)
class Earlier:
    """A postback already made for the same conversion and partner."""

    id: str
    trigger: str | None
    state: str  # a postback state (domain.postback)
    next_attempt_at: datetime | None = None
    held: bool = False  # waiting for its hold period (reason starts with HELD_PREFIX)


# Held and ordered postbacks wait as `retry_scheduled` (no attempt spent) with these reasons,
# so the sweep that releases retries releases them too. A postback behind a dead-lettered one
# has no next attempt time: a replay of the earlier one releases it.
HELD_PREFIX = "held: "
ORDER_PREFIX = "waiting: earlier postback "
DONE_STATES: frozenset[str] = frozenset({PostbackState.DELIVERED, PostbackState.SKIPPED})
DEAD = PostbackState.DEAD_LETTERED


@dataclass(frozen=True)
class Decision:
    """One partner's answer to one event."""

    plan: Plan
    trigger: Trigger | None = None
    release_at: datetime | None = None  # for HOLD
    cancel: tuple[str, ...] = ()  # held postbacks to cancel (CANCEL)
    reason: str = ""


def decide(previous: Snapshot | None, current: Snapshot, rule: FireRule, *,
           hold: timedelta, earlier: Sequence[Earlier], event_at: datetime) -> Decision:
    """What one event means for one partner.

    A reversal while an approved postback is still held cancels that postback and fires
    nothing; an approved postback with a hold period waits until `event_at + hold`.
    """
    trigger = triggers(previous, current, rule)
    held = tuple(e.id for e in earlier if e.held)
    if current.status in REVERSAL_STATUSES and held:
        return Decision(Plan.CANCEL, trigger, cancel=held,
                        reason=f"reversed ({current.status}) during the hold period: "
                               "the held postback is cancelled and nothing fires")
    if trigger is None:
        return Decision(Plan.NONE, None, reason=_no_fire_reason(previous, current, rule))
    if trigger == Trigger.APPROVED and hold > timedelta(0):
        until = event_at + hold
        return Decision(Plan.HOLD, trigger, release_at=until,
                        reason=f"{HELD_PREFIX}{_hours(hold)} hold period, until {_iso(until)}")
    return Decision(Plan.FIRE, trigger)


def _no_fire_reason(previous: Snapshot | None, current: Snapshot, rule: FireRule) -> str:
    fires = ", ".join(sorted(t.value for t in rule.fire_on))
    if previous is None:
        return (f"status {current.status!r} does not fire this partner "
                f"(fires on: {fires}; statuses: {', '.join(sorted(rule.fire_statuses))})")
    if previous.status == current.status:
        return f"amounts adjusted while {current.status!r}: does not fire (fires on: {fires})"
    return (f"status {previous.status!r} -> {current.status!r} does not fire this partner "
            f"(fires on: {fires})")


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} h"


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- order: for one conversion and one partner, earlier events go first ---------------------

class Gate(StrEnum):
    GO = "go"
    WAIT = "wait"  # an earlier postback is still to be delivered: wait, spend no attempt
    BLOCKED = "blocked"  # an earlier postback was dead-lettered: wait visibly for a replay


@dataclass(frozen=True)
class Order:
    gate: Gate
    until: datetime | None = None
    reason: str = ""  # the full reason to record ("waiting: earlier postback ...")


def gate(earlier: Sequence[Earlier], now: datetime, recheck: timedelta) -> Order:
    """May a postback fire, given the earlier postbacks of its conversion and partner?

    Delivered and skipped ones are done. A dead-lettered one blocks (until replayed); any other
    makes the later one wait until the earlier one's next attempt (at least `recheck` from now).
    """
    for e in earlier:
        if e.state == DEAD:
            return Order(Gate.BLOCKED, None,
                         f"{ORDER_PREFIX}{e.id} ({e.trigger or 'event'}) was dead-lettered; "
                         "replaying it releases this one")
    pending = [e for e in earlier if e.state not in DONE_STATES]
    if not pending:
        return Order(Gate.GO)
    first = pending[0]
    until = max([now + recheck] + [e.next_attempt_at for e in pending
                                   if e.next_attempt_at is not None])
    what = "held" if first.held else first.state
    return Order(Gate.WAIT, until,
                 f"{ORDER_PREFIX}{first.id} ({first.trigger or 'event'}) is {what}")


def describe_change(previous: Snapshot | None, current: Snapshot, kind: EventKind) -> str:
    """One line for the timeline, e.g. "pending -> approved" or "payout 10 -> 12.5"."""
    if previous is None or kind == EventKind.CREATED:
        return f"created {current.status}"
    if kind == EventKind.REPEAT:
        return f"repeat of {current.status} (no change)"
    if kind == EventKind.STALE:
        return f"{current.status} arrived after a newer event (no change)"
    parts = []
    if previous.status != current.status:
        parts.append(f"{previous.status} -> {current.status}")
    for name in ("payout", "sale_amount", "currency"):
        before, after = getattr(previous, name), getattr(current, name)
        if (_amount(before) != _amount(after) if name != "currency"
                else (before or "") != (after or "")):
            parts.append(f"{name} {before or '-'} -> {after or '-'}")
    return "; ".join(parts)


# -- stored options --------------------------------------------------------------------------

def load_mapping(text: str | None) -> dict[str, str]:
    """A stored JSON object of strings (templates, status names, payout rules); {} if none."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def dump_mapping(value: Mapping[str, str]) -> str | None:
    """The stored form of a mapping (None when empty), keys sorted."""
    return json.dumps(dict(sorted(value.items())), ensure_ascii=False) if value else None


def fire_rule(*, fire_statuses: Iterable[str], fire_events: str | None,
              templates: str | None, status_map: str | None) -> FireRule:
    """A partner's FireRule from its stored columns."""
    statuses = frozenset(s.strip().lower() for s in fire_statuses if s.strip())
    return FireRule(
        fire_statuses=statuses or frozenset({APPROVED}),
        fire_on=parse_fire_on((fire_events or "").split(",")),
        templates=load_mapping(templates),
        status_map=load_mapping(status_map),
    )


def event_values(rule: FireRule, payout_rule: PayoutRule, trigger: Trigger | None,
                 previous_status: str | None, current: Snapshot) -> dict[str, str]:
    """The lifecycle macros of one postback: `{payout}` by the payout rule, `{revenue}`,
    `{status}` and `{previous_status}` as the partner names them, `{event}`, and the
    conversion's current amounts."""
    values = payout_macros(payout_rule, payout=current.payout, sale_amount=current.sale_amount,
                           currency=current.currency)
    values["sale_amount"] = current.sale_amount or ""
    values["currency"] = current.currency or ""
    values["status"] = rule.status_name(current.status)
    values["previous_status"] = rule.status_name(previous_status) if previous_status else ""
    values["event"] = trigger.value if trigger is not None else ""
    return values


# Sample changes for a test fire of each event: (previous status, current status).
SAMPLE_CHANGES: dict[Trigger, tuple[str | None, str]] = {
    Trigger.APPROVED: ("pending", APPROVED),
    Trigger.REVERSAL: (APPROVED, "reversed"),
    Trigger.ADJUSTMENT: (APPROVED, APPROVED),
    Trigger.STATUS: ("pending", "rejected"),
}
