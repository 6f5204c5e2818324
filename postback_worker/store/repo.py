"""Repository: every read and write the pipeline and the operators make, batched."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from postback_worker.domain.masking import mask_url
from postback_worker.store import schema as t

# Postback states.
PENDING = "pending"
QUEUED = "queued"
IN_FLIGHT = "in_flight"
RETRY_SCHEDULED = "retry_scheduled"
DELIVERED = "delivered"
DEAD_LETTERED = "dead_lettered"
SKIPPED = "skipped"
FINAL_POSTBACK_STATES = frozenset({DELIVERED, DEAD_LETTERED, SKIPPED})
# Reason prefix of postbacks waiting on a pause, an open circuit or a partner limit.
WAITING_PREFIX = "waiting: "

_CHUNK = 900  # stay under SQLite's bound-parameter limit in IN (...) lists


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Store:
    """Thin data access over one engine; methods take an open connection where they batch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    # -- helpers --------------------------------------------------------------------------

    def _insert(self, table: Table) -> Any:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        if self.dialect == "sqlite":
            return sqlite.insert(table)
        return insert(table)

    def insert_ignore(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]],
                      keys: Sequence[str]) -> None:
        """INSERT ... ON CONFLICT (keys) DO NOTHING: one multi-row statement per chunk on
        PostgreSQL, an executemany elsewhere."""
        if not rows:
            return
        if self.dialect != "postgresql":
            stmt = self._insert(table).on_conflict_do_nothing(index_elements=list(keys))
            conn.execute(stmt, list(rows))
            return
        cols = list(rows[0])
        sql = (f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES %s "
               f"ON CONFLICT ({', '.join(keys)}) DO NOTHING")
        _execute_values(conn, sql, [tuple(r[c] for c in cols) for r in rows])

    def bulk_update(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], *,
                    match: Mapping[str, str], assign: Mapping[str, Any]) -> int:
        """Update many rows, each with its own values; return how many rows matched.

        `match` maps row keys to the columns they must equal; `assign` maps columns to a row
        key (str) or a fixed SQL expression. PostgreSQL: one UPDATE ... FROM (VALUES ...) per
        chunk; elsewhere an executemany.
        """
        if not rows:
            return 0
        keys = list(match) + sorted({v for v in assign.values() if isinstance(v, str)})
        types = {k: table.c[c].type for k, c in match.items()}
        types.update({v: table.c[c].type for c, v in assign.items() if isinstance(v, str)})
        if self.dialect != "postgresql":
            stmt = (
                update(table)
                .where(*[table.c[c] == bindparam("b_" + k) for k, c in match.items()])
                .values({c: bindparam("b_" + v) if isinstance(v, str) else v
                         for c, v in assign.items()})
            )
            res = conn.execute(stmt, [{"b_" + k: r[k] for k in keys} for r in rows])
            return int(res.rowcount)
        # One statement per page: UPDATE ... FROM (VALUES ...) with each value cast to its
        # column's type, built by psycopg2 (compiling 500-row statements in SQLAlchemy costs
        # more than running them).
        sql_types = {k: _cast_type(t.compile(dialect=conn.dialect)) for k, t in types.items()}
        template = "(" + ", ".join(f"%s::{sql_types[k]}" for k in keys) + ")"
        sets = []
        for col, x in assign.items():
            if isinstance(x, str):
                sets.append(f"{col} = v.{x}")
            else:
                expr = x if hasattr(x, "compile") else literal(x)
                sets.append(f"{col} = " + str(expr.compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True})))
        where = " AND ".join(f"{table.name}.{c} = v.{k}" for k, c in match.items())
        first = next(iter(match.values()))
        sql = (f"UPDATE {table.name} SET {', '.join(sets)} FROM (VALUES %s) AS v"
               f"({', '.join(keys)}) WHERE {where} RETURNING {table.name}.{first}")
        returned = _execute_values(conn, sql, [tuple(r[k] for k in keys) for r in rows],
                                   template=template, fetch=True)
        return len(returned)

    # -- offers and partners --------------------------------------------------------------

    def upsert_row(self, table: Table, row: Mapping[str, Any],
                   changed_by: str | None = None) -> None:
        """Insert or update an offer or partner by id (created_at kept); keep a redacted
        snapshot of the saved version in config_history."""
        with self.engine.begin() as conn:
            stmt = self._insert(table).values(**row)
            changes = {k: stmt.excluded[k] for k in row if k not in {"id", "created_at"}}
            conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=changes))
            saved = conn.execute(select(table).where(table.c.id == row["id"])).mappings().one()
            conn.execute(insert(t.config_history).values(
                kind=table.name.rstrip("s"), object_id=row["id"],
                changed_at=saved["updated_at"], changed_by=changed_by,
                snapshot=json.dumps(redacted_config(dict(saved)), default=str, sort_keys=True),
            ))

    def config_history(self, kind: str, object_id: str) -> list[dict[str, Any]]:
        h = t.config_history.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.config_history).where(h.kind == kind, h.object_id == object_id)
                .order_by(h.changed_at, h.id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def get_row(self, table: Table, row_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == row_id)).mappings().first()
        return None if row is None else dict(row)

    def list_rows(self, table: Table) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(table).order_by(table.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def upsert_offer(self, row: Mapping[str, Any]) -> None:
        self.upsert_row(t.offers, row)

    def upsert_partner(self, row: Mapping[str, Any]) -> None:
        self.upsert_row(t.partners, row)

    def get_offer(self, offer_id: str) -> dict[str, Any] | None:
        return self.get_row(t.offers, offer_id)

    def get_partner(self, partner_id: str) -> dict[str, Any] | None:
        return self.get_row(t.partners, partner_id)

    def list_offers(self) -> list[dict[str, Any]]:
        return self.list_rows(t.offers)

    def list_partners(self) -> list[dict[str, Any]]:
        return self.list_rows(t.partners)

    # -- clicks ---------------------------------------------------------------------------

    def insert_clicks(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with self.engine.begin() as conn:
            self.insert_ignore(conn, t.clicks, rows, ["transaction_id"])

    def clicks_by_transaction(self, conn: Connection,
                              transaction_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for part in _chunks(list(set(transaction_ids))):
            for row in conn.execute(
                select(t.clicks).where(t.clicks.c.transaction_id.in_(part))
            ).mappings():
                found[row["transaction_id"]] = dict(row)
        return found

    # -- conversions ----------------------------------------------------------------------

    def insert_conversions(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        self.insert_ignore(conn, t.conversions, rows, ["id"])

    def unprocessed_conversions(self, conn: Connection, ids: Sequence[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for part in _chunks(list(ids)):
            stmt = select(t.conversions).where(
                t.conversions.c.id.in_(part), t.conversions.c.state == "received"
            )
            if self.dialect == "postgresql":
                # Two workers holding the same message take turns on these rows.
                stmt = stmt.with_for_update()
            out.extend(dict(r) for r in conn.execute(stmt).mappings())
        order = {cid: i for i, cid in enumerate(ids)}
        out.sort(key=lambda r: order[r["id"]])
        return out

    def claim_keys(self, conn: Connection, keys: Mapping[str, str]) -> dict[str, str]:
        """Insert dedupe keys (key -> conversion id); return the owner of each key."""
        rows = [{"key": k, "conversion_id": cid} for k, cid in keys.items()]
        self.insert_ignore(conn, t.conversion_keys, rows, ["key"])
        owners: dict[str, str] = {}
        for part in _chunks(list(keys)):
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

    def get_conversion(self, conversion_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t.conversions).where(t.conversions.c.id == conversion_id)
            ).mappings().first()
        return None if row is None else dict(row)

    def conversion_offers(self, ids: Sequence[str]) -> dict[str, str | None]:
        """Offer id of each conversion, in one query per chunk."""
        c = t.conversions.c
        out: dict[str, str | None] = {}
        with self.engine.connect() as conn:
            for part in _chunks(list(ids)):
                out.update({r.id: r.offer_id for r in conn.execute(
                    select(c.id, c.offer_id).where(c.id.in_(part)))})
        return out

    def stuck_conversions(self, older_than: datetime, limit: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.conversions)
                .where(t.conversions.c.state == "received",
                       t.conversions.c.received_at < older_than)
                .order_by(t.conversions.c.received_at)
                .limit(limit)
            ).mappings().all()
        return [dict(r) for r in rows]

    def insert_postbacks(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        self.insert_ignore(conn, t.postbacks, rows, ["conversion_id", "partner_id", "event_seq"])

    def _claimable(self, now: datetime) -> Any:
        pb = t.postbacks.c
        return or_(
            pb.state.in_([PENDING, QUEUED]),
            and_(pb.state == RETRY_SCHEDULED, pb.next_attempt_at <= now),
            and_(pb.state == IN_FLIGHT, pb.lease_until < now),
        )

    def claim(self, *, now: datetime, lease_until: datetime, token: str,
              ids: Sequence[str] = (), conversion_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Atomically take the claimable postbacks among `ids` / of `conversion_ids`."""
        pb = t.postbacks.c
        claimed: list[dict[str, Any]] = []
        with self.engine.begin() as conn:
            for column, values in ((pb.id, ids), (pb.conversion_id, conversion_ids)):
                for part in _chunks(list(values)):
                    stmt = (
                        update(t.postbacks)
                        .where(column.in_(part), self._claimable(now))
                        .values(state=IN_FLIGHT, lease_until=lease_until, lease_token=token,
                                last_attempt_at=now, updated_at=now,
                                first_attempt_at=func.coalesce(pb.first_attempt_at, now))
                        .returning(pb.id, pb.conversion_id, pb.partner_id, pb.url, pb.method,
                                   pb.attempts, pb.first_attempt_at, pb.received_at)
                    )
                    claimed.extend(dict(r) for r in conn.execute(stmt).mappings())
        return claimed

    def finish(self, *, updates: Sequence[Mapping[str, Any]], attempts: Sequence[Mapping[str, Any]],
               dead_letters: Sequence[Mapping[str, Any]]) -> int:
        """Record attempts and move claimed postbacks to their next state (only under our lease).

        Returns how many postback rows were updated (fewer if a lease was lost).
        """
        pb = t.postbacks.c
        with self.engine.begin() as conn:
            if attempts:
                conn.execute(insert(t.attempts), list(attempts))
            changed = self.bulk_update(conn, t.postbacks, updates,
                                       match={"id": "id", "token": "lease_token"}, assign={
                "state": "state", "reason": "reason", "attempts": pb.attempts + 1,
                "next_attempt_at": "next_attempt_at", "lease_until": None, "lease_token": None,
                "last_status": "last_status", "last_class": "last_class",
                "delivered_at": "delivered_at", "updated_at": "updated_at",
            })
            if dead_letters:
                stmt_dl = self._insert(t.dead_letters)
                stmt_dl = stmt_dl.on_conflict_do_update(
                    index_elements=["postback_id"],
                    set_={
                        "failure_class": stmt_dl.excluded.failure_class,
                        "last_status": stmt_dl.excluded.last_status,
                        "reason": stmt_dl.excluded.reason,
                        "attempts": stmt_dl.excluded.attempts,
                        "created_at": stmt_dl.excluded.created_at,
                    },
                )
                conn.execute(stmt_dl, list(dead_letters))
        return changed

    def extend_leases(self, ids: Sequence[str], token: str, until: datetime) -> None:
        """Keep a long batch's unanswered postbacks ours (no sweeper re-fires them meanwhile)."""
        pb = t.postbacks.c
        with self.engine.begin() as conn:
            for part in _chunks(list(ids)):
                conn.execute(
                    update(t.postbacks)
                    .where(pb.id.in_(part), pb.lease_token == token, pb.state == IN_FLIGHT)
                    .values(lease_until=until)
                )

    def dead_letter_now(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Dead letters for postbacks that never got an HTTP attempt (template errors)."""
        if rows:
            stmt = self._insert(t.dead_letters).on_conflict_do_nothing(
                index_elements=["postback_id"]
            )
            conn.execute(stmt, list(rows))

    def sweep_due(self, *, now: datetime, stale_pending_before: datetime, requeue_at: datetime,
                  limit: int) -> list[str]:
        """Mark due postbacks `queued` (skipping rows another sweeper holds); return their ids."""
        pb = t.postbacks.c
        due = or_(
            and_(pb.state.in_([RETRY_SCHEDULED, QUEUED]), pb.next_attempt_at <= now),
            and_(pb.state == IN_FLIGHT, pb.lease_until < now),
            and_(pb.state == PENDING, pb.created_at < stale_pending_before),
        )
        inner = (
            select(pb.id).where(due).order_by(pb.next_attempt_at).limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(inner)]
            if not ids:
                return []
            for part in _chunks(ids):
                conn.execute(
                    update(t.postbacks)
                    .where(pb.id.in_(part), due)
                    .values(state=QUEUED, next_attempt_at=requeue_at, lease_until=None,
                            lease_token=None, updated_at=now)
                )
        return ids

    def postbacks_for(self, conversion_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.postbacks)
                .where(t.postbacks.c.conversion_id == conversion_id)
                .order_by(t.postbacks.c.partner_id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def attempts_for(self, postback_ids: Sequence[str]) -> list[dict[str, Any]]:
        if not postback_ids:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.attempts)
                .where(t.attempts.c.postback_id.in_(list(postback_ids)))
                .order_by(t.attempts.c.started_at, t.attempts.c.id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def retry_backlog(self) -> tuple[int, datetime | None]:
        pb = t.postbacks.c
        with self.engine.connect() as conn:
            n, oldest = conn.execute(
                select(func.count(), func.min(pb.next_attempt_at)).where(
                    pb.state.in_([RETRY_SCHEDULED, QUEUED])
                )
            ).one()
        if oldest is not None and oldest.tzinfo is None:
            from datetime import UTC

            oldest = oldest.replace(tzinfo=UTC)
        return int(n), oldest

    # -- on-call: waiting without spending attempts ----------------------------------------

    def release(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Put claimed postbacks back to wait (paused, circuit open, over a limit).

        rows: {id, token, next_attempt_at, reason, updated_at}. Unlike `finish`, no attempt is
        counted; a postback never fired forgets its first-attempt time (the horizon starts
        when it really fires).
        """
        if not rows:
            return 0
        pb = t.postbacks.c
        with self.engine.begin() as conn:
            return self.bulk_update(conn, t.postbacks, rows,
                                    match={"id": "id", "token": "lease_token"}, assign={
                "state": literal(RETRY_SCHEDULED), "reason": "reason",
                "next_attempt_at": "next_attempt_at", "updated_at": "updated_at",
                "lease_until": None, "lease_token": None,
                "first_attempt_at": case((pb.attempts == 0, None), else_=pb.first_attempt_at),
            })

    def wake_waiting(self, partner_id: str, now: datetime) -> int:
        """Make a partner's waiting postbacks due now (resume, circuit closed)."""
        pb = t.postbacks.c
        with self.engine.begin() as conn:
            res = conn.execute(
                update(t.postbacks)
                .where(pb.partner_id == partner_id, pb.state == RETRY_SCHEDULED,
                       pb.reason.like(WAITING_PREFIX + "%"), pb.next_attempt_at > now)
                .values(next_attempt_at=now, updated_at=now)
            )
            return int(res.rowcount)


def _cast_type(sql_type: str) -> str:
    # VARCHAR(n) casts truncate silently; TEXT lets the column itself refuse a long value.
    return "TEXT" if sql_type.startswith("VARCHAR") else sql_type


def _execute_values(conn: Connection, sql: str, rows: list[tuple[Any, ...]],
                    template: str | None = None, fetch: bool = False) -> list[Any]:
    """psycopg2's execute_values on the connection's current transaction."""
    from psycopg2.extras import execute_values

    cursor = conn.connection.cursor()
    try:
        return execute_values(cursor, sql, rows, template=template, page_size=1000,
                              fetch=fetch) or []
    finally:
        cursor.close()


# Never stored in history snapshots, exports or bundles.
SECRET_COLUMNS = frozenset({"hmac_secret", "hmac_secret_previous", "security_token_hash"})


def redacted_config(row: Mapping[str, Any]) -> dict[str, Any]:
    """An offer or partner row with secrets replaced and URL tokens masked."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in SECRET_COLUMNS:
            out[key] = "(set, not shown)" if value else None
        elif isinstance(value, str) and key.endswith("url"):
            out[key] = mask_url(value)
        elif isinstance(value, str) and key == "templates":  # per-event URL templates
            out[key] = json.dumps({k: mask_url(str(v)) for k, v in json.loads(value).items()},
                                  sort_keys=True)
        else:
            out[key] = value
    return out
