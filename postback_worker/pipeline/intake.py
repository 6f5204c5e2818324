"""Intake: persist a batch of conversion events, attribute them, fold them into their
conversions and build their postbacks (pipeline/lifecycle.py).

Everything runs in one transaction: the events, their states, the conversions' history, the
postbacks to fire (or held, skipped, or dead-lettered at once when a template cannot render).
Firing is dispatch's job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from postback_worker import tracing
from postback_worker.domain.attribution import (
    ClickFacts,
    ConversionFacts,
    ConversionState,
    OfferFacts,
    Usage,
    attribute,
    over_cap,
)
from postback_worker.domain.events import ConversionEvent
from postback_worker.domain.failures import FailureClass
from postback_worker.domain.postback import PostbackState
from postback_worker.pipeline.catalog import Catalog, Offer
from postback_worker.pipeline.lifecycle import Lifecycle
from postback_worker.store.journal import Journal, conversion_row
from postback_worker.store.postbacks import dead_letter_row
from postback_worker.store.repo import Store

S = PostbackState


@dataclass
class Persisted:
    """What intake did with one batch: the conversion ids (and those of the conversions its
    updates belong to) and how many events ended in each state."""

    conversion_ids: list[str]
    states: dict[str, int]


@dataclass
class _Decided:
    conv: dict[str, Any]
    state: str
    reason: str
    offer_id: str | None
    aff_id: str | None
    offer: Offer | None  # the catalog's offer `offer_id` (looked up once per event)


class Intake:
    """Events -> conversions -> postbacks, for one process."""

    def __init__(self, store: Store, catalog: Catalog, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.catalog = catalog
        self.clock = clock
        self.lifecycle = Lifecycle(catalog)
        self.journal = Journal(store)

    def persist(self, messages: Sequence[Mapping[str, Any]],
                triggered_by: str | None = None) -> Persisted:
        """Persist and attribute a batch and create its postbacks; safe to run again on the
        same messages. `triggered_by` is recorded on the postbacks created (e.g. a
        re-attribution run)."""
        events = [ConversionEvent.from_message(m) for m in messages]
        if not events:
            return Persisted([], {})
        now = self.clock()
        rows = [conversion_row(e) for e in events]
        ids = [r["id"] for r in rows]
        with tracing.items("conversion.intake", rows) as traced, \
                self.store.transaction() as conn:
            self.store.insert_conversions(conn, rows)
            decided, roots = self._attribute(conn, self.store.unprocessed_conversions(conn, ids),
                                             triggered_by, now, traced)
        return Persisted(ids + sorted(set(roots) - set(ids)), _states(decided))

    def take_pending(self, limit: int, reattributed_before: datetime) -> Persisted:
        """Lock up to `limit` accepted events waiting in the journal (oldest first; rows other
        workers hold are skipped), attribute and fold them and create their postbacks, in one
        transaction. Older waiting events of the same transaction ids are waited for first, so
        the events of one conversion are folded in order whichever worker takes them."""
        now = self.clock()
        with self.store.transaction() as conn:
            todo = self.journal.claim(conn, limit, reattributed_before)
            with tracing.items("conversion.intake", todo) as traced:
                decided, roots = self._attribute(conn, todo, None, now, traced)
        ids = [c["id"] for c in todo]
        return Persisted(ids + sorted(set(roots) - set(ids)), _states(decided))

    def _attribute(self, conn: Any, todo: list[dict[str, Any]], triggered_by: str | None,
                   now: datetime, traced: Any = tracing.NOOP) -> tuple[list[_Decided], list[str]]:
        """Attribute locked `received` events, fold them into their conversions and create
        their postbacks (in `conn`). Returns the decisions and the ids of the earlier
        conversions the batch's updates belong to (they have new postbacks to fire too)."""
        clicks = self.store.clicks_by_transaction(conn, [c["transaction_id"] for c in todo])
        decided = [self._decide(c, clicks.get(c["transaction_id"])) for c in todo]
        folded = self.lifecycle.fold(conn, self.store, decided, now)
        # Inbound caps count the new conversions only (not updates of known ones), before
        # any postback is built: a capped conversion fires nothing, nor do its updates.
        self._apply_caps(conn, decided, now)
        postbacks = self.lifecycle.postbacks(conn, folded, clicks, now)
        dead = [dead_letter_row(
            row["id"], row["partner_id"], offer_id=folded.offer_of(row["conversion_id"]),
            failure_class=FailureClass.CONFIG, last_status=None, reason=row["reason"],
            attempts=0, now=now) for row in postbacks if row["state"] == S.DEAD_LETTERED]
        for row in postbacks:
            row["triggered_by"] = triggered_by
        self.store.set_conversion_states(conn, [
            {"id": d.conv["id"], "state": d.state, "reason": d.reason,
             "offer_id": d.offer_id, "aff_id": d.aff_id, "processed_at": now}
            for d in decided
        ])
        self.lifecycle.write(conn, self.store, folded)
        self.store.insert_postbacks(conn, postbacks)
        self.store.dead_letter_now(conn, dead)
        if tracing.on():
            for d in decided:
                traced.set(d.conv["id"], "postback.conversion.state", d.state)
                traced.set(d.conv["id"], "postback.conversion.reason", d.reason)
        return decided, [u["update_of"] for u in folded.updates]

    def _decide(self, conv: dict[str, Any], click: dict[str, Any] | None) -> _Decided:
        offer_id = conv["offer_id"] or (click["offer_id"] if click else None)
        offer = self.catalog.offer(offer_id)
        with tracing.span("conversion.attribute", item=conv["id"]) as traced:
            decision = attribute(
                ConversionFacts(conv["transaction_id"], conv["offer_id"], conv["occurred_at"],
                                conv.get("source_ip")),
                None if click is None else ClickFacts(
                    click["transaction_id"], click["offer_id"], click["aff_id"],
                    click["clicked_at"]),
                None if offer is None else OfferFacts(offer.id, offer.lifespan_days,
                                                      offer.min_seconds, offer.max_seconds,
                                                      offer.allowed_networks),
            )
            traced.set_attribute("postback.attribution.state", decision.state.value)
        return _Decided(
            conv=conv,
            state=decision.state.value,
            reason=decision.reason,
            offer_id=offer_id,
            aff_id=click["aff_id"] if click else None,
            offer=offer,
        )

    def _apply_caps(self, conn: Any, decided: list[_Decided], now: datetime) -> None:
        """Daily caps (UTC day) per offer and per affiliate: over a cap is `capped`."""
        capped: dict[str, Offer] = {}
        for d in decided:
            offer = d.offer if d.state == ConversionState.ATTRIBUTED else None
            if offer is not None and offer.caps.any:
                capped[offer.id] = offer
        if not capped:
            return
        day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        offer_used, aff_used = self.store.cap_usage(conn, sorted(capped), day)
        for d in decided:
            offer = capped.get(d.offer_id or "") if d.state == ConversionState.ATTRIBUTED \
                else None
            if offer is None or d.aff_id is None:
                continue
            payout = _money(d.conv["payout"])
            used = offer_used.setdefault(offer.id, Usage())
            aff = aff_used.setdefault((offer.id, d.aff_id), Usage())
            why = over_cap(offer.caps, used, aff, payout, d.aff_id)
            if why is not None:
                d.state = ConversionState.CAPPED.value
                d.reason = f"{why} (UTC day {day:%Y-%m-%d}); fires nothing"
                continue
            for u in (used, aff):
                u.count += 1
                u.payout += payout


def _money(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else 0.0
    except ValueError:
        return 0.0


def _states(decided: Sequence[_Decided]) -> dict[str, int]:
    states: dict[str, int] = {}
    for d in decided:
        states[d.state] = states.get(d.state, 0) + 1
    return states


def conversion_message(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored conversion as the message intake takes (to process it again)."""
    event = ConversionEvent(
        id=row["id"], transaction_id=row["transaction_id"], offer_id=row["offer_id"],
        goal_id=row["goal_id"] or "", payout=row["payout"], sale_amount=row["sale_amount"],
        currency=row["currency"], status=row["status"], adv_sub=row["adv_sub"], ip=row["ip"],
        device_id=row["device_id"], occurred_at=row["occurred_at"],
        received_at=row["received_at"], source_ip=row.get("source_ip"),
        trace_context=row.get("trace_context"),
    )
    return dict(event.to_message())
