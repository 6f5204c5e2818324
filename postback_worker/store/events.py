"""Operator events: the outbox (written in the caller's transaction) and its deliveries.

`add_events` / `dead_letter_events` run inside the transaction of the change they describe
(a dead letter, a pause, an alert), so an event exists exactly when its change was committed;
ids are stable, so writing one twice keeps one. `EventRecords` is what the relay and the
listings use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, text, update

from postback_worker.domain import operator_events as oe
from postback_worker.store import schema as t
from postback_worker.store.sql import StoreBase, chunks, insert_ignore

EV, DV = t.operator_events.c, t.operator_deliveries.c
ADVISORY_LOCK = 0x70627765  # "pbwe": one relay plans at a time


def event_row(type_: str, occurred_at: datetime, data: Mapping[str, Any], *,
              partner_id: str | None = None, id_: str | None = None) -> dict[str, Any]:
    """An outbox row; the id defaults to one made of the type, partner and time."""
    return {"id": id_ or oe.event_id(type_, partner_id, occurred_at, data.get("alert_id")),
            "type": type_, "partner_id": partner_id, "occurred_at": occurred_at,
            "data": json.dumps(dict(data), default=str, sort_keys=True), "delivery_id": None}


def add_events(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Record events in the caller's transaction (an id already recorded is kept once)."""
    insert_ignore(conn, t.operator_events, rows, ["id"])


def dead_letter_events(conn: Connection, dead_letters: Sequence[Mapping[str, Any]], *,
                       at_intake: bool = False) -> None:
    """One `postback.dead_lettered` event per dead-letter row written in this transaction
    (`at_intake`: postbacks that never fired, which intake may build again: one event each)."""
    add_events(conn, [event_row(
        oe.DEAD_LETTERED, d["created_at"], {
            "postback_id": d["postback_id"], "partner_id": d["partner_id"],
            "offer_id": d.get("offer_id"), "failure_class": d["failure_class"],
            "last_status": d.get("last_status"), "reason": d.get("reason"),
            "attempts": d.get("attempts")},
        partner_id=d["partner_id"],
        id_=oe.event_id(oe.DEAD_LETTERED, d["postback_id"],
                        "intake" if at_intake else d["created_at"]),
    ) for d in dead_letters])


def _event(row: Mapping[str, Any]) -> oe.Event:
    return oe.Event(row["id"], row["type"], row["occurred_at"], row["partner_id"],
                    json.loads(row["data"]))


class PlanTx:
    """One planning pass of the relay, in one transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def unplanned(self, limit: int) -> list[oe.Event]:
        rows = self.conn.execute(select(t.operator_events).where(EV.delivery_id.is_(None))
                                 .order_by(EV.occurred_at, EV.id).limit(limit)).mappings()
        return [_event(dict(r)) for r in rows]

    def save(self, deliveries: Sequence[oe.Delivery], now: datetime) -> None:
        for d in deliveries:
            final = d.state != oe.PENDING
            self.conn.execute(insert(t.operator_deliveries).values(
                id=d.id, type=d.type, partner_id=d.partner_id, state=d.state,
                payload=d.payload, event_count=len(d.event_ids), attempts=0,
                next_attempt_at=None if final else now, last_status=None,
                last_error=d.reason, created_at=now, finished_at=now if final else None))
            for part in chunks(list(d.event_ids)):
                self.conn.execute(update(t.operator_events).where(EV.id.in_(part))
                                  .values(delivery_id=d.id))


class EventRecords(StoreBase):
    """Deliveries: plan, claim, settle; listings and counts."""

    def add_events(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record events in their own transaction (those kept in Redis, a test event)."""
        with self.engine.begin() as conn:
            add_events(conn, rows)

    @contextmanager
    def planning(self) -> Iterator[PlanTx | None]:
        """One transaction; None when another relay is planning (PostgreSQL)."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql" and not conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK}).scalar():
                yield None
                return
            yield PlanTx(conn)

    def claim_deliveries(self, now: datetime, lease_until: datetime,
                         limit: int) -> list[dict[str, Any]]:
        """Due pending deliveries, moved out of reach (next_attempt_at = lease_until) until
        settled; another relay skips them."""
        due = (DV.state == oe.PENDING) & (DV.next_attempt_at <= now)
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(self.pick(DV.id, due, limit)
                                              .order_by(DV.next_attempt_at))]
            if not ids:
                return []
            conn.execute(update(t.operator_deliveries).where(DV.id.in_(ids), due)
                         .values(next_attempt_at=lease_until))
            rows = conn.execute(select(t.operator_deliveries).where(DV.id.in_(ids))
                                .order_by(DV.created_at, DV.id)).mappings()
            return [dict(r) for r in rows]

    def settle_delivery(self, delivery_id: str, *, state: str, attempts: int,
                        next_attempt_at: datetime | None, last_status: int | None,
                        last_error: str | None, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(t.operator_deliveries).where(
                DV.id == delivery_id, DV.state == oe.PENDING).values(
                state=state, attempts=attempts, next_attempt_at=next_attempt_at,
                last_status=last_status, last_error=last_error,
                finished_at=None if state == oe.PENDING else now))

    def list_operator_events(self, *, type_: str | None = None, partner_id: str | None = None,
                             state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Recent events, newest first, with the state of the delivery carrying them."""
        j = t.operator_events.outerjoin(t.operator_deliveries, DV.id == EV.delivery_id)
        stmt = (select(EV.id, EV.type, EV.partner_id, EV.occurred_at, EV.data, EV.delivery_id,
                       DV.state, DV.attempts, DV.last_status, DV.last_error,
                       DV.next_attempt_at, DV.finished_at, DV.event_count)
                .select_from(j).order_by(EV.occurred_at.desc(), EV.id.desc()).limit(limit))
        if type_:
            stmt = stmt.where(EV.type == type_)
        if partner_id:
            stmt = stmt.where(EV.partner_id == partner_id)
        if state == "unplanned":
            stmt = stmt.where(EV.delivery_id.is_(None))
        elif state:
            stmt = stmt.where(DV.state == state)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(stmt).mappings()]
        for r in rows:
            r["data"] = json.loads(r["data"])
            r["state"] = r["state"] or "unplanned"
        return rows

    def get_delivery(self, delivery_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.operator_deliveries)
                               .where(DV.id == delivery_id)).mappings().first()
        return None if row is None else dict(row)

    def undelivered_events(self) -> tuple[int, datetime | None]:
        """Events not yet received (unplanned, or in a pending delivery), and the oldest one's
        time."""
        # Two indexed reads (events.delivery_id, deliveries.state): the cost follows the
        # backlog, not the history kept.
        j = t.operator_deliveries.join(t.operator_events, EV.delivery_id == DV.id)
        with self.engine.connect() as conn:
            n1, old1 = conn.execute(select(func.count(), func.min(EV.occurred_at))
                                    .where(EV.delivery_id.is_(None))).one()
            n2 = conn.execute(select(func.coalesce(func.sum(DV.event_count), 0))
                              .where(DV.state == oe.PENDING)).scalar()
            old2 = conn.execute(select(func.min(EV.occurred_at)).select_from(j)
                                .where(DV.state == oe.PENDING)).scalar()
        times = [t_ if t_.tzinfo else t_.replace(tzinfo=UTC) for t_ in (old1, old2) if t_]
        return int(n1) + int(n2 or 0), min(times) if times else None

    def purge_operator_events(self, cutoff: datetime, size: int) -> int:
        """Retention: delete up to `size` finished deliveries made before `cutoff`, with their
        events (one short batch)."""
        old = (DV.state != oe.PENDING) & (DV.created_at < cutoff)
        with self.short_transaction() as conn:
            ids = [r[0] for r in conn.execute(self.pick(DV.id, old, size))]
            if ids:
                conn.execute(delete(t.operator_events).where(EV.delivery_id.in_(ids)))
                conn.execute(delete(t.operator_deliveries).where(DV.id.in_(ids)))
        return len(ids)
