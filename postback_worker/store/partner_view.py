"""Reads for a partner's own page: only that partner's postbacks, attempts and figures."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from postback_worker.store import schema as t
from postback_worker.store.repo import Store


def recent_postbacks(store: Store, partner_id: str, limit: int) -> list[dict[str, Any]]:
    """The partner's newest postbacks (test fires included), newest first."""
    pb = t.postbacks.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(pb.id, pb.conversion_id, pb.partner_id, pb.method, pb.url, pb.body,
                   pb.state, pb.reason, pb.attempts, pb.last_status, pb.last_class,
                   pb.created_at, pb.delivered_at, pb.triggered_by)
            .where(pb.partner_id == partner_id)
            .order_by(pb.created_at.desc(), pb.id.desc()).limit(limit)).mappings().all()
    return [dict(r) for r in rows]


def class_counts(store: Store, partner_id: str, since: datetime) -> dict[str, int]:
    """Attempts by failure class since `since` (the partner's postbacks only)."""
    pb, at = t.postbacks.c, t.attempts.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(at.failure_class, func.count())
            .select_from(t.attempts.join(t.postbacks, pb.id == at.postback_id))
            .where(pb.partner_id == partner_id, at.started_at >= since)
            .group_by(at.failure_class)).all()
    return {str(cls): int(n) for cls, n in rows}
