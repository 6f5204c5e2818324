"""Intake and dispatch steps of the conversion lifecycle (domain/lifecycle.py decides).

Intake: `Lifecycle.fold` folds the attributed events of a batch into their conversions (by
key, per the offer's duplicate mode) and records each in the conversion's history;
`Lifecycle.postbacks` makes one postback per (conversion, partner, event) that fires, held or
not, and cancels held postbacks a reversal overtakes. Dispatch: `Lifecycle.order` keeps the
postbacks of one conversion and partner in event order.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from postback_worker import tracing
from postback_worker.domain.attribution import ConversionState, dedupe_key
from postback_worker.domain.ids import new_id
from postback_worker.domain.lifecycle import (
    DEFAULT_FIRE_ON,
    HELD_PREFIX,
    Decision,
    DuplicateMode,
    Earlier,
    EventKind,
    Gate,
    Plan,
    Snapshot,
    Trigger,
    classify,
    decide,
    describe_change,
    event_values,
    gate,
    hold_for,
    is_stale,
    merge,
)
from postback_worker.domain.macros import TemplateError, macro_values, render, render_body
from postback_worker.domain.payout import resolve
from postback_worker.domain.postback import PostbackState
from postback_worker.pipeline.catalog import Catalog, Offer, Partner
from postback_worker.store import lifecycle as records

S = PostbackState
PENDING, SKIPPED, DEAD_LETTERED, RETRY_SCHEDULED = (
    S.PENDING.value, S.SKIPPED.value, S.DEAD_LETTERED.value, S.RETRY_SCHEDULED.value)
CANCELLED = "cancelled: the conversion was reversed during the hold period"


class Decided(Protocol):
    """An event of the batch after attribution (intake's record of it)."""

    conv: dict[str, Any]
    state: str
    reason: str
    offer_id: str | None
    aff_id: str | None
    offer: Offer | None  # the catalog's offer `offer_id`


@dataclass
class Fold:
    """One attributed event folded into its conversion."""

    d: Decided
    root: dict[str, Any]  # the conversion it belongs to (itself when created)
    seq: int
    kind: EventKind
    previous: Snapshot | None
    current: Snapshot


@dataclass
class Folded:
    """A batch's folds, the history rows to record and the conversions to update."""

    folds: list[Fold] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    roots: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> changed columns
    updates: list[dict[str, Any]] = field(default_factory=list)  # {id, update_of}

    def offer_of(self, conversion_id: str) -> str | None:
        """The offer of a conversion of this batch."""
        for f in self.folds:
            if f.root["id"] == conversion_id:
                return f.root.get("offer_id") or f.d.offer_id
        return None


def snapshot(row: Mapping[str, Any]) -> Snapshot:
    return Snapshot(row["status"], row["payout"], row["sale_amount"], row["currency"])


class Lifecycle:
    def __init__(self, catalog: Catalog, order_recheck: float = 1.0) -> None:
        self.catalog = catalog
        self.recheck = timedelta(seconds=order_recheck)

    # -- intake -------------------------------------------------------------------------------

    def fold(self, conn: Any, store: Any, decided: Sequence[Decided],
             now: datetime) -> Folded:
        """Fold the batch's attributed events into their conversions, in batch order; mark
        duplicates (mode ignore) and updates (mode update). Writes nothing yet but the keys."""
        out = Folded()
        keyed: dict[str, list[Decided]] = {}
        for d in decided:
            if d.state != ConversionState.ATTRIBUTED:
                continue
            offer = d.offer
            if offer is not None and offer.duplicate_mode == DuplicateMode.SEPARATE:
                self._created(out, d, now)
                continue
            key = dedupe_key(d.offer_id or "", d.conv["transaction_id"], d.conv["goal_id"])
            keyed.setdefault(key, []).append(d)
        if not keyed:
            return out
        owners = store.claim_keys(conn, {k: ds[0].conv["id"] for k, ds in keyed.items()})
        known = {o for k, o in owners.items() if o != keyed[k][0].conv["id"]}
        roots = records.lock_conversions(conn, sorted(known)) if known else {}
        for key, ds in keyed.items():
            owner = owners[key]
            first = ds[0]
            root: dict[str, Any] | None
            if owner == first.conv["id"]:
                root = self._created(out, first, now)
                rest = ds[1:]
            else:
                root = roots.get(owner)
                rest = ds
            offer = first.offer
            mode = offer.duplicate_mode if offer is not None else DuplicateMode.UPDATE
            for d in rest:
                if root is None or mode == DuplicateMode.IGNORE:
                    d.state = ConversionState.DUPLICATE.value
                    d.reason = (f"duplicate of conversion {owner} (same offer, transaction_id "
                                "and goal_id; the offer ignores updates)")
                    continue
                self._update(out, d, root, now)
        return out

    def _created(self, out: Folded, d: Decided, now: datetime) -> dict[str, Any]:
        current = snapshot(d.conv)
        root = {**d.conv, "last_seq": 1, "_decided": d}
        out.folds.append(Fold(d, root, 1, EventKind.CREATED, None, current))
        out.events.append(_event_row(root["id"], 1, d, EventKind.CREATED, None, current, now))
        return root

    def _update(self, out: Folded, d: Decided, root: dict[str, Any], now: datetime) -> None:
        previous = snapshot(root)
        incoming = snapshot(d.conv)
        when = (d.conv["occurred_at"], d.conv["received_at"])
        last = root.get("last_at") or (root["occurred_at"], root["received_at"])
        kind = EventKind.STALE if is_stale(last, when) else classify(previous, incoming)
        if kind == EventKind.STALE:
            current = incoming  # recorded as received; the conversion keeps its state
        elif kind == EventKind.REPEAT:
            current = previous
        else:
            current = merge(previous, incoming)
            root["last_at"] = when
        # A conversion stored before the lifecycle existed has no history yet: seq 1 is its
        # creation, implied.
        seq = max(int(root.get("last_seq") or 0), 1) + 1
        root["last_seq"] = seq
        out.folds.append(Fold(d, root, seq, kind, previous, current))
        out.events.append(_event_row(root["id"], seq, d, kind, previous, current, now))
        summary = describe_change(previous, current, kind)
        if kind == EventKind.STALE:
            d.state = ConversionState.UPDATED.value
            d.reason = (f"event {seq} of conversion {root['id']}: older than its last event, "
                        "recorded, changes nothing")
            return
        if kind == EventKind.REPEAT:
            d.state = ConversionState.DUPLICATE.value
            d.reason = (f"duplicate of conversion {root['id']} (same offer, transaction_id and "
                        f"goal_id, same status and amounts): recorded as event {seq}, "
                        "nothing fires")
        else:
            d.state = ConversionState.UPDATED.value
            d.reason = f"event {seq} of conversion {root['id']}: {summary}"
        out.updates.append({"id": d.conv["id"], "update_of": root["id"]})
        if kind != EventKind.REPEAT:
            root.update(status=current.status, payout=current.payout,
                        sale_amount=current.sale_amount, currency=current.currency)
            out.roots.setdefault(root["id"], {}).update(
                status=current.status, payout=current.payout,
                sale_amount=current.sale_amount, currency=current.currency)

    def postbacks(self, conn: Any, folded: Folded, clicks: Mapping[str, dict[str, Any]],
                  now: datetime) -> list[dict[str, Any]]:
        """One postback per (conversion, partner, event) that fires: pending, held (waiting as
        retry_scheduled), skipped, or dead-lettered when its template cannot render. Cancels
        held postbacks a reversal overtakes. Sets the state of conversions nothing fires."""
        updated = [f.root["id"] for f in folded.folds if f.seq > 1]
        earlier: dict[tuple[str, str], list[Earlier]] = {}
        for r in records.earlier_postbacks(conn, updated) if updated else []:
            earlier.setdefault((r["conversion_id"], r["partner_id"]), []).append(_earlier(r))
        rows: list[dict[str, Any]] = []
        destinations: dict[tuple[str, str], list[Partner]] = {}  # per (offer, affiliate)
        for f in folded.folds:
            if f.kind in (EventKind.REPEAT, EventKind.STALE) or _capped(f.root):
                continue
            rows.extend(self._event_postbacks(conn, folded, f, clicks, earlier, destinations,
                                              now))
        return rows

    def _event_postbacks(self, conn: Any, folded: Folded, f: Fold,
                         clicks: Mapping[str, dict[str, Any]],
                         earlier: dict[tuple[str, str], list[Earlier]],
                         destinations: dict[tuple[str, str], list[Partner]],
                         now: datetime) -> list[dict[str, Any]]:
        d, root = f.d, f.root
        offer_id, aff_id = root.get("offer_id") or d.offer_id, root.get("aff_id") or d.aff_id
        assert offer_id is not None and aff_id is not None
        offer = d.offer if offer_id == d.offer_id else self.catalog.offer(offer_id)
        partners = destinations.get((offer_id, aff_id))
        if partners is None:  # the catalog is asked once per batch and (offer, affiliate)
            partners = destinations[(offer_id, aff_id)] = self.catalog.destinations(offer_id,
                                                                                    aff_id)
        if not partners:
            if f.seq == 1:
                d.reason = f"{d.reason}; no postback destination for affiliate {aff_id!r}"
            return []
        click = clicks.get(d.conv["transaction_id"]) or {}
        rows: list[dict[str, Any]] = []
        fired = False
        for partner in partners:
            before = earlier.setdefault((root["id"], partner.id), [])
            decision = decide(f.previous, f.current, partner.fire_rule,
                              hold=hold_for(offer.hold_hours if offer else None,
                                            partner.hold_hours),
                              earlier=before, event_at=d.conv["received_at"])
            if decision.plan == Plan.CANCEL:
                cancelled = records.cancel_held(conn, decision.cancel, CANCELLED, now)
                if len(cancelled) < len(decision.cancel) and decision.trigger is not None:
                    # The sweep released it meanwhile: the reversal follows it, in order.
                    decision = decide(f.previous, f.current, partner.fire_rule,
                                      hold=timedelta(0), earlier=[], event_at=now)
                for e in before:
                    if e.id in cancelled:
                        before[before.index(e)] = Earlier(e.id, e.trigger, SKIPPED)
            if decision.plan == Plan.NONE and f.seq > 1:
                continue
            if decision.plan == Plan.CANCEL and decision.trigger is None:
                continue
            row = self._row(f, root, offer, offer_id, partner, decision, click, now)
            if row["state"] in (PENDING, RETRY_SCHEDULED):
                fired = True
            rows.append(row)
            before.append(Earlier(row["id"], row["event"], row["state"],
                                  row["next_attempt_at"],
                                  held=bool(row["reason"] and row["reason"].startswith(
                                      HELD_PREFIX))))
        if f.seq == 1 and not fired and all(
                r["state"] == SKIPPED and r["reason"] != "partner disabled" for r in rows):
            d.state = ConversionState.REJECTED_STATUS.value
            d.reason = f"status {d.conv['status']!r} fires no partner"
        elif f.seq > 1 and fired:
            self._reopen(folded, f)
        return rows

    @staticmethod
    def _reopen(folded: Folded, f: Fold) -> None:
        """A conversion whose first status fired no partner is attributed once one fires."""
        own: Decided | None = f.root.get("_decided")  # created in this batch
        state = own.state if own is not None else f.root.get("state")
        if state != ConversionState.REJECTED_STATUS:
            return
        was = f.previous.status if f.previous else ""
        reason = f"attributed; event {f.seq} ({was} -> {f.current.status}) fires its partners"
        if own is not None:
            own.state, own.reason = ConversionState.ATTRIBUTED.value, reason
        else:
            f.root["state"] = ConversionState.ATTRIBUTED.value
            folded.roots.setdefault(f.root["id"], {}).update(
                state=ConversionState.ATTRIBUTED.value, reason=reason)

    def _row(self, f: Fold, root: Mapping[str, Any], offer: Offer | None, offer_id: str,
             partner: Partner, decision: Decision, click: Mapping[str, Any],
             now: datetime) -> dict[str, Any]:
        pid = new_id("pb")
        trigger = decision.trigger
        row: dict[str, Any] = {
            "id": pid, "conversion_id": root["id"], "partner_id": partner.id, "url": "",
            "body": None, "method": partner.method, "attempts": 0,
            "received_at": f.d.conv["received_at"],
            "created_at": now, "updated_at": now, "next_attempt_at": now, "state": PENDING,
            "reason": None, "event_seq": f.seq,
            "event": trigger.value if trigger is not None else None,
            "trace_context": f.d.conv.get("trace_context"),
        }
        if not partner.enabled:
            row.update(state=SKIPPED, reason="partner disabled", next_attempt_at=None)
            return row
        if decision.plan in (Plan.NONE, Plan.CANCEL):
            reason = decision.reason
            if decision.plan == Plan.NONE and partner.fire_rule.fire_on == DEFAULT_FIRE_ON:
                fires = ", ".join(sorted(partner.fire_rule.fire_statuses)) or "nothing"
                reason = (f"status {f.current.status!r} does not fire this partner "
                          f"(fires on: {fires})")
            row.update(state=SKIPPED, reason=reason, next_attempt_at=None)
            return row
        assert trigger is not None  # FIRE and HOLD always name their trigger
        if decision.plan == Plan.HOLD:
            row.update(state=RETRY_SCHEDULED, reason=decision.reason,
                       next_attempt_at=decision.release_at)
        try:  # (the macros read their own keys of the conversion: "_decided" stays unread)
            with tracing.span("postback.render", {"postback.id": pid,
                                                  "postback.partner.id": partner.id,
                                                  "postback.event": trigger.value},
                              item=f.d.conv["id"]):
                row["url"], row["body"] = render_event(
                    partner, offer, {**root, "offer_id": offer_id}, click, trigger,
                    f.previous.status if f.previous else None, f.current, pid, now)
        except TemplateError as exc:
            row.update(url=partner.fire_rule.template(trigger, partner.postback_url),
                       state=DEAD_LETTERED, next_attempt_at=None,
                       reason=f"config: template cannot render: {exc}", last_class="config")
        return row

    def write(self, conn: Any, store: Any, folded: Folded) -> None:
        """Record the history and update the conversions events changed."""
        records.record_events(conn, store, folded.events)
        records.update_conversions(conn, store,
                                   [{"id": k, **v} for k, v in folded.roots.items()]
                                   + folded.updates)

    # -- dispatch -----------------------------------------------------------------------------

    def order(self, conn: Any, claimed_ids: Sequence[str],
              now: datetime) -> dict[str, tuple[datetime | None, str]]:
        """Claimed postbacks that must wait for an earlier one of the same conversion and
        partner: id -> (until, why). `until` None: behind a dead letter (a replay releases
        it). The others may fire."""
        waiting: dict[str, tuple[datetime | None, str]] = {}
        for pid, rows in records.predecessors(conn, claimed_ids).items():
            verdict = gate([_earlier(r) for r in rows], now, self.recheck)
            if verdict.gate != Gate.GO:
                waiting[pid] = (verdict.until, verdict.reason)
        return waiting


def render_event(partner: Partner, offer: Offer | None, conversion: Mapping[str, Any],
                 click: Mapping[str, Any], trigger: Trigger | None,
                 previous_status: str | None, current: Snapshot, postback_id: str,
                 now: datetime) -> tuple[str, str | None]:
    """The URL and body (None without a body template) of one postback: the partner's
    template for the event, its status names and payout rule, the same macro values in both
    (raises TemplateError)."""
    rule = resolve(partner.id, partner.payout_rule, offer.payout_rules if offer else {})
    values = event_values(partner.fire_rule, rule, trigger, previous_status, current)
    template = partner.fire_rule.template(trigger, partner.postback_url) if trigger else \
        partner.postback_url
    # `{random}` costs a system call: made only when a template can hold it.
    uses_random = "random" in template or "random" in (partner.body_template or "")
    macros = macro_values(conversion={**conversion, **values}, click=click,
                          postback_id=postback_id, now=now,
                          random_value=secrets.token_hex(8) if uses_random else "")
    url = render(template, macros)
    if partner.body_format and partner.body_template:
        return url, render_body(partner.body_template, partner.body_format, macros)
    return url, None


def rerender(partner_row: Mapping[str, Any], offer_row: Mapping[str, Any] | None,
             conversion: Mapping[str, Any], click: Mapping[str, Any], event: str | None,
             history: Mapping[str, Any] | None, postback_id: str,
             now: datetime) -> tuple[str, str | None]:
    """A stored postback's URL and body with the partner's current configuration (replay):
    for a lifecycle event, with the conversion as it was at that event (raises TemplateError)."""
    partner = Partner.from_row(partner_row)
    offer = Offer.from_row(offer_row) if offer_row else None
    if event is None or history is None:  # before the lifecycle: the conversion as stored
        return render_event(partner, offer, conversion, click, Trigger.APPROVED, None,
                            snapshot(conversion), postback_id, now)
    return render_event(partner, offer, conversion, click, Trigger(event),
                        history["previous_status"], snapshot(history), postback_id, now)


def _capped(root: Mapping[str, Any]) -> bool:
    """Over an inbound cap (intake's caps): the conversion and its updates fire nothing."""
    own: Decided | None = root.get("_decided")
    state = own.state if own is not None else root.get("state")
    return state == ConversionState.CAPPED


def _earlier(r: Mapping[str, Any]) -> Earlier:
    return Earlier(r["id"], r["event"], r["state"], r["next_attempt_at"],
                   held=r["state"] == RETRY_SCHEDULED and bool(r["reason"])
                   and str(r["reason"]).startswith(HELD_PREFIX))


def _event_row(conversion_id: str, seq: int, d: Decided, kind: EventKind,
               previous: Snapshot | None, current: Snapshot, now: datetime) -> dict[str, Any]:
    return {
        "conversion_id": conversion_id, "seq": seq, "event_id": d.conv["id"],
        "kind": kind.value, "status": current.status,
        "previous_status": previous.status if previous else None,
        "payout": current.payout, "sale_amount": current.sale_amount,
        "currency": current.currency,
        "summary": describe_change(previous, current, kind),
        "occurred_at": d.conv["occurred_at"], "received_at": d.conv["received_at"],
        "recorded_at": now,
    }
