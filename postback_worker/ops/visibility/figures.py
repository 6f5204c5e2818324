"""Queries shared by metrics, reports, alerts and the dashboard.

Every figure comes from PostgreSQL (the source of truth) and leaves test-fire traffic out:
attempts with `is_test` are never counted, nor are postbacks (and their conversions) that a
test fire created.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Float, cast, func, literal, select
from sqlalchemy.sql.elements import ColumnElement

from postback_worker.store import schema as t

A = t.attempts.c
P = t.postbacks.c
C = t.conversions.c
D = t.dead_letters.c

FAILED_POSTBACK = "dead_lettered"
PENDING_POSTBACK = ("pending", "queued", "in_flight", "retry_scheduled")
LOST_STATES = ("expired_click", "unknown_click")
# Refused by an offer's inbound rules (domain.attribution.INBOUND_REFUSED).
INBOUND_STATES = ("too_soon", "too_late", "capped", "ip_not_allowed")


def utc(value: datetime | None) -> datetime | None:
    """Timezone-aware UTC (SQLite and some aggregates return naive datetimes)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Exclusions:
    """Ids of test-fire postbacks, loaded once per query set (there are few of them)."""

    def __init__(self, conn: Connection) -> None:
        rows = conn.execute(select(A.postback_id).where(A.is_test.is_(True)).distinct())
        self.postback_ids: list[str] = [r[0] for r in rows]

    def real_postback(self, column: Any = P.id) -> ColumnElement[bool]:
        """True for postbacks that are not test fires."""
        if not self.postback_ids:
            return literal(True)
        return column.not_in(self.postback_ids)

    def real_conversion(self) -> ColumnElement[bool]:
        """True for conversions without a test-fire postback."""
        if not self.postback_ids:
            return literal(True)
        test_convs = select(P.conversion_id).where(P.id.in_(self.postback_ids))
        return C.id.not_in(test_convs)


def real_attempt() -> ColumnElement[bool]:
    return A.is_test.is_(False)


def seconds_between(later: Any, earlier: Any, dialect: str) -> Any:
    """SQL expression: seconds from `earlier` to `later` (timestamps)."""
    if dialect == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.extract("epoch", later - earlier)


def bucket_counts(value: Any, bounds: Sequence[float]) -> list[Any]:
    """count(*) FILTER (WHERE value <= bound) for each bound (cumulative histogram buckets)."""
    return [func.count().filter(value <= b) for b in bounds]


def rate(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def nearest_rank(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-quantile by the nearest-rank method (the same as PostgreSQL percentile_disc)."""
    if not sorted_values:
        return None
    index = max(1, math.ceil(q * len(sorted_values))) - 1
    return sorted_values[index]


def attempt_window(conn: Connection, ex: Exclusions, since: datetime, until: datetime,
                   partner_id: str | None = None) -> list[dict[str, Any]]:
    """Attempts started in [since, until) by partner, status code and failure class."""
    stmt = (
        select(P.partner_id, A.status_code, A.failure_class, func.count())
        .select_from(t.attempts.join(t.postbacks, P.id == A.postback_id))
        .where(A.started_at >= since, A.started_at < until, real_attempt(),
               ex.real_postback())
        .group_by(P.partner_id, A.status_code, A.failure_class)
    )
    if partner_id:
        stmt = stmt.where(P.partner_id == partner_id)
    return [{"partner_id": p, "status_code": s, "failure_class": f, "count": int(n)}
            for p, s, f, n in conn.execute(stmt)]


def duration_seconds() -> Any:
    return cast(A.duration_ms, Float) / 1000.0


def lost_window(conn: Connection, ex: Exclusions, since: datetime,
                until: datetime, offer_id: str | None = None) -> list[dict[str, Any]]:
    """Per offer: conversions received in [since, until), those lost (expired/unknown), and
    those refused by the offer's inbound rules (too soon, too late, capped, advertiser IP)."""
    stmt = (
        select(
            C.offer_id,
            func.count(),
            func.count().filter(C.state == "expired_click"),
            func.count().filter(C.state == "unknown_click"),
            *[func.count().filter(C.state == s) for s in INBOUND_STATES],
        )
        .where(C.received_at >= since, C.received_at < until, C.state != "received",
               ex.real_conversion())
        .group_by(C.offer_id)
    )
    if offer_id:
        stmt = stmt.where(C.offer_id == offer_id)
    out = []
    for offer, total, expired, unknown, *refused in conn.execute(stmt):
        lost = int(expired) + int(unknown)
        by_rule = {s: int(n) for s, n in zip(INBOUND_STATES, refused, strict=True)}
        out.append({"offer_id": offer, "conversions": int(total), "expired_click": int(expired),
                    "unknown_click": int(unknown), "lost": lost,
                    "lost_rate": rate(lost, int(total)), **by_rule,
                    "refused": sum(by_rule.values())})
    out.sort(key=lambda r: (-r["lost"], r["offer_id"] or ""))
    return out
