"""Partner-level reads and controls: health counts, pause and limits, support-bundle evidence."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, select, update

from postback_worker.domain import operator_events as oe
from postback_worker.domain.attribution import ConversionState
from postback_worker.domain.failures import FailureClass
from postback_worker.domain.postback import OPEN_STATES, PostbackState
from postback_worker.store import schema as t
from postback_worker.store.events import add_events, event_row
from postback_worker.store.sql import StoreBase


class PartnerRecords(StoreBase):
    def pause_gone(self, partner_id: str, reason: str, now: datetime) -> bool:
        """Pause a partner that answered 410 Gone (unless already paused); True if it was."""
        p = t.partners.c
        with self.engine.begin() as conn:
            res = conn.execute(
                update(t.partners).where(p.id == partner_id, p.paused.is_(False))
                .values(paused=True, paused_at=now, paused_reason=reason, paused_by="gone",
                        updated_at=now))
            if res.rowcount:
                add_events(conn, [_pause_event(partner_id, True, reason, "gone", now)])
            return bool(res.rowcount)

    def set_paused(self, partner_id: str, paused: bool, *, reason: str | None, by: str | None,
                   now: datetime) -> bool | None:
        """Pause or resume a partner; a `partner.paused` / `resumed` operator event is recorded
        in the same transaction when the state changes. None when there is no such partner,
        else whether it was paused before."""
        p = t.partners.c
        with self.engine.begin() as conn:
            row = conn.execute(select(p.paused, p.paused_reason, p.paused_by)
                               .where(p.id == partner_id).with_for_update()).first()
            if row is None:
                return None
            conn.execute(update(t.partners).where(p.id == partner_id).values(
                paused=paused, paused_at=now if paused else None,
                paused_reason=reason if paused else None, paused_by=by if paused else None,
                updated_at=now))
            if bool(row.paused) != paused:
                add_events(conn, [_pause_event(
                    partner_id, paused, reason if paused else row.paused_reason,
                    by if paused else row.paused_by, now)])
            return bool(row.paused)

    def set_partner_fields(self, partner_id: str, **values: Any) -> bool:
        """Update some columns of one partner; False when there is no such partner."""
        return self.update_by_id(t.partners, partner_id, values)

    def partner_counts(self, since: datetime) -> tuple[
            dict[str, int], dict[str, int], dict[str, tuple[int, int]]]:
        """Per partner: (postbacks not final, dead letters still dead, (attempts, delivered)
        since `since`, test fires left out)."""
        pb, at, dl = t.postbacks.c, t.attempts.c, t.dead_letters.c
        with self.engine.connect() as conn:
            waiting = {r[0]: int(r[1]) for r in conn.execute(
                select(pb.partner_id, func.count()).where(pb.state.in_(OPEN_STATES))
                .group_by(pb.partner_id))}
            dead = {r[0]: int(r[1]) for r in conn.execute(
                select(dl.partner_id, func.count()).select_from(
                    t.dead_letters.join(t.postbacks, pb.id == dl.postback_id))
                .where(pb.state == PostbackState.DEAD_LETTERED).group_by(dl.partner_id))}
            recent = {r[0]: (int(r[1]), int(r[2] or 0)) for r in conn.execute(
                select(pb.partner_id, func.count(),
                       func.sum(case((at.failure_class == FailureClass.DELIVERED, 1), else_=0)))
                .select_from(t.attempts.join(t.postbacks, pb.id == at.postback_id))
                .where(at.started_at >= since, at.is_test.is_(False))
                .group_by(pb.partner_id))}
        return waiting, dead, recent

    def partner_evidence(self, partner_id: str, since: datetime,
                         until: datetime) -> dict[str, list[dict[str, Any]]]:
        """What a support bundle shows about one partner in a time range: its postbacks,
        conversions lost to an expired click, failed attempts (newest first) and its
        configuration history."""
        pb, cv, at = t.postbacks.c, t.conversions.c, t.attempts.c
        h = t.config_history.c
        in_range = and_(pb.partner_id == partner_id, pb.created_at >= since,
                        pb.created_at <= until)
        with self.engine.connect() as conn:
            postbacks = [dict(r) for r in conn.execute(
                select(pb.id, pb.conversion_id, pb.state, pb.attempts, pb.last_status,
                       pb.last_class, pb.reason, pb.created_at, pb.delivered_at,
                       cv.transaction_id, cv.offer_id)
                .select_from(t.postbacks.join(t.conversions, cv.id == pb.conversion_id))
                .where(in_range).order_by(pb.created_at)).mappings()]
            expired = [dict(r) for r in conn.execute(
                select(cv.id, cv.transaction_id, cv.offer_id, cv.state, cv.reason,
                       cv.received_at)
                .where(cv.aff_id == partner_id, cv.received_at >= since,
                       cv.received_at <= until,
                       cv.state == ConversionState.EXPIRED_CLICK.value)
                .order_by(cv.received_at)).mappings()]
            attempts = [dict(r) for r in conn.execute(
                select(at.postback_id, at.attempt_no, at.started_at, at.duration_ms, at.url,
                       at.status_code, at.failure_class, at.error, at.response_excerpt)
                .select_from(t.attempts.join(t.postbacks, pb.id == at.postback_id))
                .where(in_range, at.failure_class != FailureClass.DELIVERED)
                .order_by(at.started_at.desc())).mappings()]
            history = [dict(r) for r in conn.execute(
                select(t.config_history).where(h.kind == "partner", h.object_id == partner_id)
                .order_by(h.changed_at)).mappings()]
        return {"postbacks": postbacks, "expired": expired, "attempts": attempts,
                "history": history}


def _pause_event(partner_id: str, paused: bool, reason: str | None, by: str | None,
                 now: datetime) -> dict[str, Any]:
    if paused:
        return event_row(oe.PAUSED, now, {"partner_id": partner_id, "reason": reason,
                                          "paused_by": by}, partner_id=partner_id)
    return event_row(oe.RESUMED, now, {"partner_id": partner_id, "paused_reason": reason,
                                       "paused_by": by}, partner_id=partner_id)
