"""Clicks, conversions and their dedupe keys: intake's reads and writes, and re-attribution."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Float, and_, cast, delete, exists, func, select, update
from sqlalchemy.orm import aliased

from postback_worker.domain.attribution import ConversionState, Usage
from postback_worker.domain.postback import PostbackState
from postback_worker.store import schema as t
from postback_worker.store.sql import StoreBase, chunks, execute_values, fetch_dicts

RECEIVED = ConversionState.RECEIVED.value
EXPIRED_CLICK = ConversionState.EXPIRED_CLICK.value
_CLAIM_KEYS = (f"INSERT INTO {t.conversion_keys.name} (key, conversion_id) VALUES %s "
               "ON CONFLICT (key) DO NOTHING RETURNING key")


def clicks_by_transaction(conn: Connection,
                          transaction_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored clicks of these transaction ids, by transaction id."""
    found: dict[str, dict[str, Any]] = {}
    for part in chunks(list(set(transaction_ids))):
        for row in fetch_dicts(conn, select(t.clicks).where(t.clicks.c.transaction_id.in_(part))):
            found[row["transaction_id"]] = row
    return found


def conversions_by_id(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for part in chunks(list(set(ids))):
        for row in fetch_dicts(conn, select(t.conversions).where(t.conversions.c.id.in_(part))):
            out[row["id"]] = row
    return out


class ConversionRecords(StoreBase):
    """Clicks and conversions (methods that take `conn` run inside the caller's transaction)."""

    def insert_clicks(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with self.engine.begin() as conn:
            self.insert_ignore(conn, t.clicks, rows, ["transaction_id"])

    def clicks_by_transaction(self, conn: Connection,
                              transaction_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return clicks_by_transaction(conn, transaction_ids)

    def insert_conversions(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        self.insert_ignore(conn, t.conversions, rows, ["id"])

    def unprocessed_conversions(self, conn: Connection, ids: Sequence[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for part in chunks(list(ids)):
            stmt = select(t.conversions).where(
                t.conversions.c.id.in_(part), t.conversions.c.state == RECEIVED
            )
            if self.dialect == "postgresql":
                # Two workers holding the same message take turns on these rows.
                stmt = stmt.with_for_update()
            out.extend(fetch_dicts(conn, stmt))
        order = {cid: i for i, cid in enumerate(ids)}
        out.sort(key=lambda r: order[r["id"]])
        return out

    def claim_keys(self, conn: Connection, keys: Mapping[str, str]) -> dict[str, str]:
        """Insert dedupe keys (key -> conversion id); return the owner of each key."""
        owners: dict[str, str] = {}
        if self.dialect == "postgresql":
            # The keys this INSERT wrote are ours; only the others are looked up.
            ours = execute_values(conn, _CLAIM_KEYS, list(keys.items()), fetch=True)
            owners.update((k, keys[k]) for (k,) in ours)
            others = [k for k in keys if k not in owners]
        else:
            rows = [{"key": k, "conversion_id": cid} for k, cid in keys.items()]
            self.insert_ignore(conn, t.conversion_keys, rows, ["key"])
            others = list(keys)
        for part in chunks(others):
            for key, owner in conn.execute(
                select(t.conversion_keys.c.key, t.conversion_keys.c.conversion_id).where(
                    t.conversion_keys.c.key.in_(part)
                )
            ):
                owners[key] = owner
        return owners

    def set_conversion_states(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """rows: {id, state, reason, offer_id, aff_id, processed_at}."""
        self.bulk_update(conn, t.conversions, rows, match={"id": "id"}, assign={
            c: c for c in ("state", "reason", "offer_id", "aff_id", "processed_at")})

    def cap_usage(self, conn: Connection, offer_ids: Sequence[str], since: datetime,
                  ) -> tuple[dict[str, Usage], dict[tuple[str, str], Usage]]:
        """Attributed conversions and payout since `since`, per offer and per (offer,
        affiliate). On PostgreSQL the offers' rows are locked until the transaction ends, so
        two workers count caps one after the other."""
        o, c = t.offers.c, t.conversions.c
        if self.dialect == "postgresql":
            conn.execute(select(o.id).where(o.id.in_(list(offer_ids))).order_by(o.id)
                         .with_for_update())
        per_offer: dict[str, Usage] = {}
        per_aff: dict[tuple[str, str], Usage] = {}
        for offer_id, aff_id, n, payout in conn.execute(
            select(c.offer_id, c.aff_id, func.count(),
                   func.coalesce(func.sum(cast(c.payout, Float)), 0.0))
            .where(c.offer_id.in_(list(offer_ids)), c.state == ConversionState.ATTRIBUTED,
                   c.processed_at >= since)
            .group_by(c.offer_id, c.aff_id)
        ):
            total = per_offer.setdefault(offer_id, Usage())
            total.count += int(n)
            total.payout += float(payout)
            per_aff[(offer_id, aff_id)] = Usage(int(n), float(payout))
        return per_offer, per_aff

    def get_conversion(self, conversion_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return conversions_by_id(conn, [conversion_id]).get(conversion_id)

    def get_conversions(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            return conversions_by_id(conn, ids)

    def conversion_offers(self, ids: Sequence[str]) -> dict[str, str | None]:
        """Offer id of each conversion, in one query per chunk."""
        c = t.conversions.c
        out: dict[str, str | None] = {}
        with self.engine.connect() as conn:
            for part in chunks(list(ids)):
                out.update({r.id: r.offer_id for r in conn.execute(
                    select(c.id, c.offer_id).where(c.id.in_(part)))})
        return out

    # -- re-attribution -------------------------------------------------------------------

    def expired_conversions(self, offer_id: str, since: datetime | None,
                            until: datetime | None) -> tuple[list[dict[str, Any]], int,
                                                             dict[str, dict[str, Any]]]:
        """(the offer's expired_click conversions in the range, how many of its conversions
        had an unknown click, the clicks of the expired ones by transaction id)."""
        cv = t.conversions.c
        cond = [cv.offer_id == offer_id]
        if since is not None:
            cond.append(cv.received_at >= since)
        if until is not None:
            cond.append(cv.received_at <= until)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(
                select(t.conversions).where(cv.state == EXPIRED_CLICK, *cond)
                .order_by(cv.received_at, cv.id)).mappings()]
            unknown = int(conn.execute(select(func.count()).where(
                cv.state == ConversionState.UNKNOWN_CLICK.value, *cond)).scalar() or 0)
            clicks = clicks_by_transaction(conn, [r["transaction_id"] for r in rows])
        return rows, unknown, clicks

    def reopen_expired(self, ids: Sequence[str], reason: str, now: datetime) -> list[str]:
        """Hand expired_click conversions back to `received` (only those still expired: a
        conversion is taken by one run only); returns the ids taken."""
        cv = t.conversions.c
        taken: list[str] = []
        with self.engine.begin() as conn:
            for part in chunks(list(ids), 200):
                taken.extend(r[0] for r in conn.execute(
                    update(t.conversions)
                    .where(cv.id.in_(part), cv.state == EXPIRED_CLICK)
                    .values(state=RECEIVED, reattributed_at=now, processed_at=None,
                            reason=reason)
                    .returning(cv.id)))
        return taken

    def purge_events(self, cutoff: datetime, since: datetime, size: int) -> int:
        """Retention: delete up to `size` conversion events recorded in [since, cutoff) that
        a later event of the same conversion superseded and that no postback still waiting
        or dead-lettered carries (one short batch). The last event of each conversion stays:
        later updates fold onto it."""
        ev, pb = t.conversion_events.c, t.postbacks.c
        later = aliased(t.conversion_events)
        done = [PostbackState.DELIVERED.value, PostbackState.SKIPPED.value]
        old = and_(
            ev.recorded_at >= since, ev.recorded_at < cutoff,
            exists().where(later.c.conversion_id == ev.conversion_id, later.c.seq > ev.seq),
            ~exists().where(pb.conversion_id == ev.conversion_id, pb.event_seq == ev.seq,
                            pb.state.not_in(done)))
        with self.short_transaction() as conn:
            ids = [r[0] for r in conn.execute(self.pick(ev.id, old, size))]
            if ids:
                conn.execute(delete(t.conversion_events).where(ev.id.in_(ids)))
        return len(ids)
