"""Intake: persist a batch of conversions, attribute them, build their postbacks.

Everything runs in one transaction: the conversions, their states, the postbacks to fire (or
skipped, or dead-lettered at once when a template cannot render). Firing is dispatch's job.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from postback_worker.domain.attribution import (
    ClickFacts,
    ConversionFacts,
    ConversionState,
    OfferFacts,
    Usage,
    attribute,
    dedupe_key,
    fires_on,
    over_cap,
)
from postback_worker.domain.events import ConversionEvent
from postback_worker.domain.failures import FailureClass
from postback_worker.domain.ids import new_id
from postback_worker.domain.macros import TemplateError, macro_values, render, render_body
from postback_worker.domain.postback import PostbackState
from postback_worker.pipeline.catalog import Catalog, Offer, Partner
from postback_worker.store.journal import Journal, conversion_row
from postback_worker.store.postbacks import dead_letter_row
from postback_worker.store.repo import Store

S = PostbackState


@dataclass
class Persisted:
    """What intake did with one batch: the conversion ids and how many ended in each state."""

    conversion_ids: list[str]
    states: dict[str, int]


@dataclass
class _Decided:
    conv: dict[str, Any]
    state: str
    reason: str
    offer_id: str | None
    aff_id: str | None
    allow_multiple: bool


class Intake:
    """Events -> conversions -> postbacks, for one process."""

    def __init__(self, store: Store, catalog: Catalog, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.journal = Journal(store)
        self.catalog = catalog
        self.clock = clock

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
        with self.store.transaction() as conn:
            self.store.insert_conversions(conn, rows)
            decided = self._attribute(conn, self.store.unprocessed_conversions(conn, ids),
                                      triggered_by, now)
        return Persisted(ids, _states(decided))

    def take_pending(self, limit: int, reattributed_before: datetime) -> Persisted:
        """Lock up to `limit` accepted events waiting in the journal (FOR UPDATE SKIP LOCKED,
        oldest first), attribute them and create their postbacks, in one transaction."""
        now = self.clock()
        with self.store.transaction() as conn:
            todo = self.journal.claim(conn, limit, reattributed_before)
            decided = self._attribute(conn, todo, None, now)
        return Persisted([c["id"] for c in todo], _states(decided))

    def _attribute(self, conn: Any, todo: list[dict[str, Any]], triggered_by: str | None,
                   now: datetime) -> list[_Decided]:
        """Attribute locked `received` conversions and create their postbacks (in `conn`)."""
        clicks = self.store.clicks_by_transaction(conn, [c["transaction_id"] for c in todo])
        decided = [self._decide(c, clicks.get(c["transaction_id"])) for c in todo]
        self._mark_duplicates(conn, decided)
        self._apply_caps(conn, decided, now)
        postbacks, dead = self._build_postbacks(decided, clicks, now)
        for row in postbacks:
            row["triggered_by"] = triggered_by
        self.store.set_conversion_states(conn, [
            {"id": d.conv["id"], "state": d.state, "reason": d.reason,
             "offer_id": d.offer_id, "aff_id": d.aff_id, "processed_at": now}
            for d in decided
        ])
        self.store.insert_postbacks(conn, postbacks)
        self.store.dead_letter_now(conn, dead)
        return decided

    def _decide(self, conv: dict[str, Any], click: dict[str, Any] | None) -> _Decided:
        offer_id = conv["offer_id"] or (click["offer_id"] if click else None)
        offer = self.catalog.offer(offer_id)
        decision = attribute(
            ConversionFacts(conv["transaction_id"], conv["offer_id"], conv["occurred_at"],
                            conv.get("source_ip")),
            None if click is None else ClickFacts(
                click["transaction_id"], click["offer_id"], click["aff_id"], click["clicked_at"]
            ),
            None if offer is None else OfferFacts(offer.id, offer.lifespan_days,
                                                  offer.min_seconds, offer.max_seconds,
                                                  offer.allowed_networks),
        )
        return _Decided(
            conv=conv,
            state=decision.state.value,
            reason=decision.reason,
            offer_id=offer_id,
            aff_id=click["aff_id"] if click else None,
            allow_multiple=bool(offer and offer.allow_multiple),
        )

    def _mark_duplicates(self, conn: Any, decided: list[_Decided]) -> None:
        keys: dict[str, str] = {}
        in_batch: dict[str, _Decided] = {}
        for d in decided:
            if d.state != ConversionState.ATTRIBUTED or d.allow_multiple:
                continue
            key = dedupe_key(d.offer_id or "", d.conv["transaction_id"], d.conv["goal_id"])
            first = in_batch.get(key)
            if first is not None:
                d.state = ConversionState.DUPLICATE.value
                d.reason = f"duplicate of conversion {first.conv['id']}"
                continue
            in_batch[key] = d
            keys[key] = d.conv["id"]
        owners = self.store.claim_keys(conn, keys) if keys else {}
        for key, d in in_batch.items():
            owner = owners.get(key)
            if owner is not None and owner != d.conv["id"]:
                d.state = ConversionState.DUPLICATE.value
                d.reason = (
                    f"duplicate of conversion {owner} (same offer, transaction_id and goal_id)"
                )

    def _apply_caps(self, conn: Any, decided: list[_Decided], now: datetime) -> None:
        """Daily caps (UTC day) per offer and per affiliate: over a cap is `capped`."""
        capped: dict[str, Offer] = {}
        for d in decided:
            offer = self.catalog.offer(d.offer_id) if d.state == ConversionState.ATTRIBUTED \
                else None
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

    def _build_postbacks(self, decided: list[_Decided], clicks: Mapping[str, dict[str, Any]],
                         now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        postbacks: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        for d in decided:
            if d.state != ConversionState.ATTRIBUTED:
                continue
            assert d.offer_id is not None and d.aff_id is not None
            click = clicks[d.conv["transaction_id"]]
            partners = self.catalog.destinations(d.offer_id, d.aff_id)
            if not partners:
                d.reason = f"{d.reason}; no postback destination for affiliate {d.aff_id!r}"
                continue
            firing = 0
            for partner in partners:
                row = self._postback_row(d, click, partner, now)
                if row["state"] == S.PENDING:
                    firing += 1
                elif row["state"] == S.DEAD_LETTERED:
                    dead.append(dead_letter_row(
                        row["id"], row["partner_id"], offer_id=d.offer_id,
                        failure_class=FailureClass.CONFIG, last_status=None,
                        reason=row["reason"], attempts=0, now=now))
                postbacks.append(row)
            if firing == 0 and all(
                not fires_on(d.conv["status"], p.fire_statuses) for p in partners
            ):
                d.state = ConversionState.REJECTED_STATUS.value
                d.reason = f"status {d.conv['status']!r} fires no partner"
        return postbacks, dead

    def _postback_row(self, d: _Decided, click: Mapping[str, Any], partner: Partner,
                      now: datetime) -> dict[str, Any]:
        pid = new_id("pb")
        row: dict[str, Any] = {
            "id": pid, "conversion_id": d.conv["id"], "partner_id": partner.id, "url": "",
            "body": None, "method": partner.method, "attempts": 0,
            "received_at": d.conv["received_at"], "created_at": now, "updated_at": now,
            "next_attempt_at": now,
            "state": S.PENDING, "reason": None,
        }
        if not partner.enabled:
            row.update(state=S.SKIPPED, reason="partner disabled", next_attempt_at=None)
            return row
        if not fires_on(d.conv["status"], partner.fire_statuses):
            fires = ", ".join(partner.fire_statuses) or "nothing"
            status = d.conv["status"]
            row.update(
                state=S.SKIPPED, next_attempt_at=None,
                reason=f"status {status!r} does not fire this partner (fires on: {fires})",
            )
            return row
        try:
            row["url"], row["body"] = render_postback(
                partner.postback_url, {**d.conv, "offer_id": d.offer_id}, click, pid, now,
                partner.body_format, partner.body_template)
        except TemplateError as exc:
            row.update(url=partner.postback_url, state=S.DEAD_LETTERED, next_attempt_at=None,
                       reason=f"config: template cannot render: {exc}",
                       last_class=FailureClass.CONFIG)
        return row


def render_postback(template: str, conversion: Mapping[str, Any], click: Mapping[str, Any],
                    postback_id: str, now: datetime, body_format: str | None = None,
                    body_template: str | None = None) -> tuple[str, str | None]:
    """A postback's URL and body (None without a body template) from the partner's templates,
    a stored conversion and its click, with the same macro values (raises TemplateError)."""
    values = macro_values(conversion=conversion, click=click, postback_id=postback_id, now=now,
                          random_value=secrets.token_hex(8))
    url = render(template, values)
    if body_format and body_template:
        return url, render_body(body_template, body_format, values)
    return url, None


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
    )
    return dict(event.to_message())
