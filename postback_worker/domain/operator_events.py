"""Operator events (pure): the types, their ids, and how pending events become webhook
deliveries (dead letters batched per partner and window, every other event alone).

The store records events in the same transaction as the change they describe; the relay
(`ops/visibility/operator_events.py`) turns them into deliveries with `plan` and sends each
delivery's `payload` (a Standard Webhooks body: `{"type", "timestamp", "data"}`) signed, with
the delivery id as `webhook-id`, until the receiver answers 2xx.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

DEAD_LETTERED = "postback.dead_lettered"
CIRCUIT_OPENED = "partner.circuit_opened"
CIRCUIT_CLOSED = "partner.circuit_closed"
PAUSED = "partner.paused"
RESUMED = "partner.resumed"
ALERT_FIRED = "alert.fired"
ALERT_RESOLVED = "alert.resolved"
TEST = "operator.test"
TYPES = (DEAD_LETTERED, CIRCUIT_OPENED, CIRCUIT_CLOSED, PAUSED, RESUMED, ALERT_FIRED,
         ALERT_RESOLVED, TEST)

# Delivery states: waiting to be sent (or retried), received (2xx), given up after the last
# attempt, or not sent at all (no URL configured, or the type is filtered out).
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
SKIPPED = "skipped"
DELIVERY_STATES = (PENDING, DELIVERED, FAILED, SKIPPED)


def event_id(*parts: object) -> str:
    """A stable id from what identifies the event (the same parts always give the same id)."""
    digest = hashlib.sha256("|".join(_part(p) for p in parts).encode()).hexdigest()
    return "evt_" + digest[:28]


def _part(value: object) -> str:
    if isinstance(value, datetime):
        return iso(value)
    return str(value)


def iso(value: datetime) -> str:
    """UTC ISO 8601 with a Z, as every payload writes times."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def check_types(names: Iterable[str]) -> list[str]:
    """The names that are not event types (empty when all are)."""
    return [n for n in names if n not in TYPES]


@dataclass(frozen=True)
class Event:
    """One recorded event (`data` as stored)."""

    id: str
    type: str
    occurred_at: datetime
    partner_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def log_record(self) -> dict[str, Any]:
        """The event as one structured log line."""
        return {"event_id": self.id, "type": self.type, "occurred_at": iso(self.occurred_at),
                "partner_id": self.partner_id, **self.data}


@dataclass(frozen=True)
class Delivery:
    """One webhook request to make: its id (`webhook-id`), body and the events it carries."""

    id: str
    type: str
    partner_id: str | None
    event_ids: tuple[str, ...]
    payload: str
    created_at: datetime
    state: str = PENDING
    reason: str | None = None


def payload(type_: str, at: datetime, data: Mapping[str, Any]) -> str:
    """The JSON body: Standard Webhooks' recommended shape."""
    return json.dumps({"type": type_, "timestamp": iso(at), "data": data},
                      separators=(",", ":"), sort_keys=False, default=str)


def dead_letter_data(partner_id: str | None, events: Sequence[Event]) -> dict[str, Any]:
    """The data of one batch of dead letters of one partner."""
    classes: dict[str, int] = {}
    for e in events:
        cls = str(e.data.get("failure_class"))
        classes[cls] = classes.get(cls, 0) + 1
    return {
        "partner_id": partner_id,
        "count": len(events),
        "first_at": iso(events[0].occurred_at),
        "last_at": iso(events[-1].occurred_at),
        "failure_classes": dict(sorted(classes.items())),
        "postback_ids": [e.data.get("postback_id") for e in events],
        "event_ids": [e.id for e in events],
        "dead_letters": [{**e.data, "at": iso(e.occurred_at)} for e in events],
    }


@dataclass(frozen=True)
class Routing:
    """Where deliveries go: whether a URL is set, which types are sent, how dead letters
    are grouped (a partner's wait `window` seconds to share a delivery, at most `max_batch`)."""

    has_url: bool
    types: tuple[str, ...] = ()  # empty: every type
    window: float = 30.0
    max_batch: int = 500

    def skip_reason(self, type_: str) -> str | None:
        if not self.has_url:
            return "no webhook URL configured (POSTBACK_EVENTS_URL): logged only"
        if self.types and type_ not in self.types:
            return "type not in POSTBACK_EVENTS_TYPES: logged only"
        return None


def plan(events: Sequence[Event], now: datetime, routing: Routing) -> list[Delivery]:
    """Deliveries for events not yet in one (oldest first).

    Every event but a dead letter is its own delivery, with the event's id. A partner's dead
    letters wait until the oldest is `window` seconds old, then go together (at most
    `max_batch` per delivery; a full batch goes at once); a batch's id comes from its events'
    ids, so it is the same whoever forms it.
    """
    out: list[Delivery] = []
    dead: dict[str | None, list[Event]] = {}
    for e in sorted(events, key=lambda e: (e.occurred_at, e.id)):
        if e.type == DEAD_LETTERED:
            dead.setdefault(e.partner_id, []).append(e)
            continue
        out.append(_delivery(e.id, e.type, e.partner_id, [e], payload(e.type, e.occurred_at, {
            **e.data, "event_id": e.id}), now, routing))
    cutoff = now - timedelta(seconds=routing.window)
    for partner_id, group in dead.items():
        size = max(1, routing.max_batch)
        for start in range(0, len(group), size):
            part = group[start:start + size]
            if len(part) < size and part[0].occurred_at > cutoff:
                break  # not full and its window is still open: later events may join it
            batch_id = "evb_" + event_id(*[e.id for e in part])[4:]
            out.append(_delivery(batch_id, DEAD_LETTERED, partner_id, part, payload(
                DEAD_LETTERED, part[-1].occurred_at,
                {**dead_letter_data(partner_id, part), "batch_id": batch_id}), now, routing))
    return out


def _delivery(id_: str, type_: str, partner_id: str | None, events: Sequence[Event], body: str,
              now: datetime, routing: Routing) -> Delivery:
    reason = routing.skip_reason(type_)
    return Delivery(id_, type_, partner_id, tuple(e.id for e in events), body, now,
                    SKIPPED if reason else PENDING, reason)


def circuit_transition(partner_id: str, before: str, after: str, *, reason: str,
                       opened_at: float, retry_at: float, now: float,
                       by: str) -> dict[str, Any] | None:
    """The event of a circuit change, or None when it neither opened nor closed (open to
    half-open and back are probes of one opening)."""
    was_closed, is_closed = before == "closed", after == "closed"
    if was_closed == is_closed:
        return None
    at = datetime.fromtimestamp(now, UTC)
    if is_closed:
        type_ = CIRCUIT_CLOSED
        data: dict[str, Any] = {"partner_id": partner_id, "closed_by": by}
        if opened_at:
            data["opened_at"] = iso(datetime.fromtimestamp(opened_at, UTC))
            data["open_seconds"] = round(max(0.0, now - opened_at), 3)
    else:
        type_ = CIRCUIT_OPENED
        data = {"partner_id": partner_id, "reason": reason,
                "next_probe_at": iso(datetime.fromtimestamp(retry_at, UTC))}
    return {"id": event_id(type_, partner_id, repr(now), opened_at), "type": type_,
            "partner_id": partner_id, "occurred_at": iso(at), "data": data}
