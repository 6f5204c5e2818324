"""Conversion lifecycle: event history, the conversions events update, and the postback
writes of holds and ordering (cancel a held postback, wake the ones waiting behind another).

Functions take the caller's connection (intake and dispatch run them in their transactions).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, select, update
from sqlalchemy.orm import aliased

from postback_worker.domain.lifecycle import HELD_PREFIX, ORDER_PREFIX, REVERSAL_STATUSES
from postback_worker.domain.postback import PostbackState
from postback_worker.store import schema as t
from postback_worker.store.sql import StoreBase, fetch_dicts

_CHUNK = 900
RETRY_SCHEDULED = PostbackState.RETRY_SCHEDULED.value
SKIPPED = PostbackState.SKIPPED.value


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def lock_conversions(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The conversions `ids`, locked for this transaction (events fold into them one at a
    time), with `last_seq`: the sequence number of their last recorded event (0: none)."""
    cv, ev = t.conversions.c, t.conversion_events.c
    out: dict[str, dict[str, Any]] = {}
    for part in _chunks(sorted(set(ids))):
        stmt = select(t.conversions).where(cv.id.in_(part)).order_by(cv.id)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        out.update({r["id"]: r for r in fetch_dicts(conn, stmt)})
        seqs = conn.execute(select(ev.conversion_id, func.max(ev.seq))
                            .where(ev.conversion_id.in_(part)).group_by(ev.conversion_id))
        for cid, seq in seqs:
            out[cid]["last_seq"] = int(seq)
        # When the last event that changed the conversion happened (stale events are older).
        applied = ev.kind.in_(("created", "status_changed", "adjusted"))
        for cid, occurred, received in conn.execute(
                select(ev.conversion_id, ev.occurred_at, ev.received_at)
                .where(ev.conversion_id.in_(part), applied).order_by(ev.seq)):
            out[cid]["last_at"] = (occurred, received)
    for row in out.values():
        row.setdefault("last_seq", 0)
    return out


def record_events(conn: Connection, store: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert conversion events (an event already recorded is left as it is)."""
    store.insert_ignore(conn, t.conversion_events, rows, ["event_id"])


def update_conversions(conn: Connection, store: Any,
                       rows: Sequence[Mapping[str, Any]]) -> None:
    """Set columns of conversions: rows of {id, column: value, ...}; rows setting the same
    columns go in one bulk UPDATE."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        cols = tuple(sorted(k for k in row if k != "id"))
        if cols:
            groups.setdefault(cols, []).append(row)
    for cols, same in groups.items():
        store.bulk_update(conn, t.conversions, same, match={"id": "id"},
                          assign={c: c for c in cols})


def earlier_postbacks(conn: Connection, conversion_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Every postback of these conversions, in event order (for hold and order decisions)."""
    pb = t.postbacks.c
    out: list[dict[str, Any]] = []
    for part in _chunks(sorted(set(conversion_ids))):
        out.extend(fetch_dicts(conn, select(
            pb.id, pb.conversion_id, pb.partner_id, pb.event_seq, pb.event, pb.state,
            pb.reason, pb.next_attempt_at, pb.attempts)
            .where(pb.conversion_id.in_(part)).order_by(pb.event_seq)))
    return out


def cancel_held(conn: Connection, ids: Sequence[str], reason: str, now: datetime) -> list[str]:
    """Cancel held postbacks that have not fired (skipped with `reason`); return those
    cancelled (a postback the sweep already released is not)."""
    pb = t.postbacks.c
    done: list[str] = []
    for part in _chunks(list(ids)):
        done.extend(conn.execute(
            update(t.postbacks)
            .where(pb.id.in_(part), pb.state == RETRY_SCHEDULED, pb.attempts == 0,
                   pb.reason.like(HELD_PREFIX + "%"))
            .values(state=SKIPPED, reason=reason, next_attempt_at=None, updated_at=now)
            .returning(pb.id)).scalars())
    return done


# Two views of postbacks for the self-joins below (built once: an alias's columns cost more
# to set up than the query costs to run).
_LATER, _EARLIER = aliased(t.postbacks, name="later"), aliased(t.postbacks, name="earlier")


def predecessors(conn: Connection, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """For each postback in `ids`, the earlier postbacks of its conversion and partner (lower
    event_seq), in event order. Postbacks with none are absent."""
    later, earlier = _LATER, _EARLIER
    out: dict[str, list[dict[str, Any]]] = {}
    for part in _chunks(list(ids)):
        rows = conn.execute(
            select(later.c.id.label("later_id"), earlier.c.id, earlier.c.event,
                   earlier.c.state, earlier.c.reason, earlier.c.next_attempt_at)
            .join(earlier, and_(earlier.c.conversion_id == later.c.conversion_id,
                                earlier.c.partner_id == later.c.partner_id,
                                earlier.c.event_seq < later.c.event_seq))
            .where(later.c.id.in_(part))
            .order_by(later.c.id, earlier.c.event_seq)).mappings()
        for r in rows:
            out.setdefault(r["later_id"], []).append(dict(r))
    return out


def wake_successors(conn: Connection, ids: Sequence[str], now: datetime) -> int:
    """Postbacks waiting behind any of `ids` (same conversion and partner, later event)
    become due now; call when those are delivered or skipped. Uses the (conversion, partner,
    event_seq) index: the cost follows `ids`, not the retry backlog."""
    pb = t.postbacks.c
    done, later = _EARLIER, _LATER
    woke = 0
    for part in _chunks(list(ids)):
        waiting = list(conn.execute(
            select(later.c.id)
            .join(done, and_(done.c.conversion_id == later.c.conversion_id,
                             done.c.partner_id == later.c.partner_id,
                             done.c.event_seq < later.c.event_seq))
            .where(done.c.id.in_(part), later.c.state == RETRY_SCHEDULED,
                   later.c.reason.like(ORDER_PREFIX + "%"))).scalars())
        if waiting:
            res = conn.execute(
                update(t.postbacks)
                .where(pb.id.in_(waiting), pb.state == RETRY_SCHEDULED,
                       pb.reason.like(ORDER_PREFIX + "%"))
                .values(next_attempt_at=now, updated_at=now))
            woke += int(res.rowcount)
    return woke


def event_history(conn: Connection,
                  conversion_ids: Sequence[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """The recorded events of these conversions by (conversion id, seq)."""
    ev = t.conversion_events.c
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for part in _chunks(sorted(set(conversion_ids))):
        for r in conn.execute(select(t.conversion_events)
                              .where(ev.conversion_id.in_(part))).mappings():
            out[(r["conversion_id"], r["seq"])] = dict(r)
    return out


def timeline(conn: Connection, conversion_id: str) -> list[dict[str, Any]]:
    """The conversion's events in order."""
    ev = t.conversion_events.c
    return [dict(r) for r in conn.execute(
        select(t.conversion_events).where(ev.conversion_id == conversion_id)
        .order_by(ev.seq)).mappings()]


def event_kinds(conn: Connection, since: datetime, until: datetime
                ) -> dict[tuple[str, str, str], int]:
    """(kind, status, previous status or "") -> events other than `created` recorded in
    [since, until), from rows."""
    ev = t.conversion_events.c
    out: dict[tuple[str, str, str], int] = {}
    for kind, status, previous, n in conn.execute(
            select(ev.kind, ev.status, ev.previous_status, func.count())
            .where(ev.recorded_at >= since, ev.recorded_at < until, ev.kind != "created")
            .group_by(ev.kind, ev.status, ev.previous_status)):
        key = (kind, status, previous or "")
        out[key] = out.get(key, 0) + int(n)
    return out


def event_counts(kinds: Mapping[tuple[str, str, str], int]) -> dict[str, int]:
    """Reversals (an approved conversion moved to a reversal status), adjustments (amounts
    changed), status changes and repeats, from `event_kinds`-shaped counts."""
    out = {"status_changes": 0, "reversals": 0, "adjustments": 0, "repeats": 0}
    for (kind, status, previous), n in kinds.items():
        if kind == "adjusted":
            out["adjustments"] += int(n)
        elif kind == "repeat":
            out["repeats"] += int(n)
        else:
            out["status_changes"] += int(n)
            if previous == "approved" and status in REVERSAL_STATUSES:
                out["reversals"] += int(n)
    return out


def held_counts(conn: Connection) -> dict[str, dict[str, int]]:
    """Per partner: postbacks held for their hold period, and postbacks waiting behind a
    dead-lettered earlier one."""
    pb = t.postbacks.c
    out: dict[str, dict[str, int]] = {}
    for label, cond in (("held", pb.reason.like(HELD_PREFIX + "%")),
                        ("blocked", and_(pb.reason.like(ORDER_PREFIX + "%"),
                                         pb.next_attempt_at.is_(None)))):
        for partner_id, n in conn.execute(
                select(pb.partner_id, func.count())
                .where(pb.state == RETRY_SCHEDULED, cond).group_by(pb.partner_id)):
            out.setdefault(partner_id, {"held": 0, "blocked": 0})[label] = int(n)
    return out


class LifecycleReads(StoreBase):
    """The reads above, each in its own connection (for on-call and visibility)."""

    def conversion_timeline(self, conversion_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return timeline(conn, conversion_id)

    def conversion_history(self, conversion_ids: Sequence[str],
                           ) -> dict[tuple[str, int], dict[str, Any]]:
        with self.engine.connect() as conn:
            return event_history(conn, conversion_ids)

    def held_by_partner(self) -> dict[str, dict[str, int]]:
        with self.engine.connect() as conn:
            return held_counts(conn)
