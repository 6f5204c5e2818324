"""The alert history: one row per episode (fired once, resolved once)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, text, update

from postback_worker.domain import operator_events as oe
from postback_worker.store import schema as t
from postback_worker.store.events import add_events, event_row
from postback_worker.store.repo import Store

ADVISORY_LOCK = 0x70627761  # "pbwa"
AL = t.alerts.c


class AlertTx:
    """Reads and writes of one evaluation, in one transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def open_alerts(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: dict(r) for r in self.conn.execute(
            select(t.alerts).where(AL.state == "open")).mappings()}

    def fire(self, *, key: str, kind: str, partner_id: str | None, severity: str, message: str,
             details: dict[str, Any], now: datetime) -> int:
        return int(self.conn.execute(insert(t.alerts).values(
            key=key, kind=kind, partner_id=partner_id, severity=severity, state="open",
            message=message, details=json.dumps(details), started_at=now, resolved_at=None,
            last_evaluated_at=now,
        ).returning(AL.id)).scalar_one())

    def resolve(self, alert_id: int, details: dict[str, Any], now: datetime) -> None:
        self.conn.execute(update(t.alerts).where(AL.id == alert_id).values(
            state="resolved", resolved_at=now, last_evaluated_at=now,
            details=json.dumps(details)))

    def event(self, type_: str, now: datetime, data: dict[str, Any],
              partner_id: str | None) -> None:
        """An `alert.fired` / `resolved` operator event, in this evaluation's transaction."""
        add_events(self.conn, [event_row(type_, now, data, partner_id=partner_id,
                                         id_=oe.event_id(type_, data["alert_id"]))])

    def touch(self, alert_id: int, details: dict[str, Any], now: datetime) -> None:
        self.conn.execute(update(t.alerts).where(AL.id == alert_id).values(
            last_evaluated_at=now, details=json.dumps(details)))


@contextmanager
def evaluation(store: Store) -> Iterator[AlertTx | None]:
    """One transaction; None when another evaluation holds the lock (PostgreSQL)."""
    with store.engine.begin() as conn:
        if store.dialect == "postgresql" and not conn.execute(
            text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK}
        ).scalar():
            yield None
            return
        yield AlertTx(conn)


def list_alerts(store: Store, *, state: str = "all", partner_id: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
    """Alert history, newest first; `state` is open, resolved or all."""
    stmt = select(t.alerts).order_by(AL.started_at.desc(), AL.id.desc()).limit(limit)
    if state != "all":
        stmt = stmt.where(AL.state == state)
    if partner_id:
        stmt = stmt.where(AL.partner_id == partner_id)
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
    for r in rows:
        r["details"] = json.loads(r["details"] or "{}")
        for k in ("started_at", "resolved_at", "last_evaluated_at"):
            value = r[k]
            if value is not None and value.tzinfo is None:
                r[k] = value.replace(tzinfo=UTC)
    return rows
