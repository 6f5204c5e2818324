"""What the configuration audit reads: every offer and partner with their recent figures.

Test-fire attempts are left out of every figure.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select

from postback_worker.domain.postback import PostbackState
from postback_worker.store import schema as t
from postback_worker.store.repo import Store


def catalog(store: Store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(offers, partners), each ordered by id."""
    with store.engine.connect() as conn:
        offers = [dict(r) for r in conn.execute(select(t.offers).order_by(t.offers.c.id))
                  .mappings()]
        partners = [dict(r) for r in conn.execute(select(t.partners).order_by(t.partners.c.id))
                    .mappings()]
    return offers, partners


def partner_stats(store: Store, now: datetime, silent_since: datetime,
                  window_since: datetime) -> dict[str, dict[str, Any]]:
    """Per partner: last delivery, attempts since `silent_since`, and attempts and failed
    attempts since `window_since`."""
    a, pb = t.attempts, t.postbacks
    stats: dict[str, dict[str, Any]] = {}
    with store.engine.connect() as conn:
        for pid, last in conn.execute(
            select(pb.c.partner_id, func.max(pb.c.delivered_at))
            .where(pb.c.state == PostbackState.DELIVERED.value).group_by(pb.c.partner_id)
        ):
            stats.setdefault(pid, {})["last_delivered"] = last
        rows = conn.execute(
            select(pb.c.partner_id,
                   func.sum(case((a.c.started_at >= silent_since, 1), else_=0)),
                   func.sum(case((a.c.started_at >= window_since, 1), else_=0)),
                   func.sum(case((and_(a.c.started_at >= window_since,
                                       a.c.failure_class != "delivered"), 1), else_=0)))
            .select_from(a.join(pb, a.c.postback_id == pb.c.id))
            .where(a.c.is_test.is_(False), a.c.started_at >= min(silent_since, window_since),
                   a.c.started_at <= now)
            .group_by(pb.c.partner_id))
        for pid, recent, window, failed in rows:
            stats.setdefault(pid, {}).update(recent_attempts=int(recent or 0),
                                             window_attempts=int(window or 0),
                                             window_failed=int(failed or 0))
    return stats


def expired_by_offer(store: Store, now: datetime, days: int) -> dict[str, tuple[int, int]]:
    """Per offer: (expired_click, attributed) conversions received in the last `days`."""
    c = t.conversions
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(c.c.offer_id,
                   func.sum(case((c.c.state == "expired_click", 1), else_=0)),
                   func.sum(case((c.c.state == "attributed", 1), else_=0)))
            .where(c.c.received_at >= now - timedelta(days=days), c.c.received_at <= now,
                   c.c.offer_id.is_not(None))
            .group_by(c.c.offer_id))
        return {oid: (int(lost or 0), int(ok or 0)) for oid, lost, ok in rows}
