"""Postbacks, their attempts and their dead letters: every write to these three tables.

Claim (state + lease), finish (attempts recorded, next state set, dead letters written, only
under our lease), release (wait without spending an attempt), lease renewal, sweep, wake,
replay re-queue, dead-letter purge and retention.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, case, delete, func, insert, literal, or_, select, update

from postback_worker.domain.deadletters import Filter
from postback_worker.domain.lifecycle import DONE_STATES, ORDER_PREFIX
from postback_worker.domain.postback import WAITING_PREFIX, PostbackState
from postback_worker.store import schema as t
from postback_worker.store.conversions import clicks_by_transaction, conversions_by_id
from postback_worker.store.deadletters import DEAD_JOIN, filter_clause
from postback_worker.store.events import dead_letter_events
from postback_worker.store.lifecycle import wake_successors
from postback_worker.store.sql import StoreBase, chunks, fetch_dicts, mogrify_rows, tuples

S = PostbackState
_DONE = frozenset(str(s) for s in DONE_STATES)
# What `finish` sets from each answer (column -> row key), matched on id and lease token.
_FINISH_MATCH = {"id": "id", "token": "lease_token"}
_FINISH_ASSIGN = {
    "state": "state", "reason": "reason", "next_attempt_at": "next_attempt_at",
    "last_status": "last_status", "last_class": "last_class",
    "delivered_at": "delivered_at", "updated_at": "updated_at",
}


@dataclass(frozen=True)
class Claimed:
    """A postback this worker holds under a lease (`token`) while it fires it."""

    id: str
    conversion_id: str
    partner_id: str
    url: str
    method: str
    body: str | None
    attempts: int
    first_attempt_at: datetime | None
    received_at: datetime
    token: str
    # Attempts made before the current round (a replay starts a new round of the policy).
    round_start_attempts: int = 0
    # The event of its conversion it reports (1: the first; only later ones wait in order).
    event_seq: int = 1
    # W3C traceparent of the event it carries (tracing on): its spans join that trace.
    trace_context: str | None = None


def update_row(c: Claimed, state: PostbackState, reason: str | None, now: datetime, *,
               next_attempt_at: datetime | None = None, last_status: int | None = None,
               last_class: str | None = None) -> dict[str, Any]:
    """What `finish` sets on one claimed postback."""
    return {
        "id": c.id, "token": c.token, "state": state.value, "reason": reason,
        "next_attempt_at": next_attempt_at, "last_status": last_status,
        "last_class": last_class, "delivered_at": now if state is S.DELIVERED else None,
        "updated_at": now,
    }


def release_row(c: Claimed, next_at: datetime | None, why: str,
                now: datetime) -> dict[str, Any]:
    """What `release` sets on one claimed postback put back to wait (`next_at` None: until
    something wakes it, e.g. the replay of an earlier postback)."""
    return {"id": c.id, "token": c.token, "next_attempt_at": next_at,
            "reason": WAITING_PREFIX + why, "updated_at": now}


def dead_letter_row(postback_id: str, partner_id: str, *, offer_id: str | None,
                    failure_class: str, last_status: int | None, reason: str | None,
                    attempts: int, now: datetime) -> dict[str, Any]:
    return {
        "postback_id": postback_id, "partner_id": partner_id, "offer_id": offer_id,
        "failure_class": failure_class, "last_status": last_status,
        "reason": reason or failure_class, "attempts": attempts,
        "created_at": now, "replayed_at": None, "replay_count": 0,
    }


class PostbackRecords(StoreBase):
    """Methods that take `conn` run inside the caller's transaction."""

    # -- intake ---------------------------------------------------------------------------

    def insert_postbacks(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        self.insert_ignore(conn, t.postbacks, rows, ["conversion_id", "partner_id", "event_seq"])

    def dead_letter_now(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Dead letters for postbacks that never got an HTTP attempt (template errors)."""
        if rows:
            stmt = self._insert(t.dead_letters).on_conflict_do_nothing(
                index_elements=["postback_id"]
            )
            conn.execute(stmt, list(rows))
            dead_letter_events(conn, rows, at_intake=True)  # operator events, same transaction

    # -- dispatch -------------------------------------------------------------------------

    def claim(self, *, now: datetime, lease_until: datetime, token: str,
              ids: Sequence[str] = (), conversion_ids: Sequence[str] = ()) -> list[Claimed]:
        """Atomically take the claimable postbacks among `ids` / of `conversion_ids`."""
        pb = t.postbacks.c
        claimable = or_(
            pb.state.in_([S.PENDING, S.QUEUED]),
            and_(pb.state == S.RETRY_SCHEDULED, pb.next_attempt_at <= now),
            and_(pb.state == S.IN_FLIGHT, pb.lease_until < now),
        )
        claimed: list[Claimed] = []
        with self.engine.begin() as conn:
            for column, values in ((pb.id, ids), (pb.conversion_id, conversion_ids)):
                for part in chunks(list(values)):
                    stmt = (
                        update(t.postbacks)
                        .where(column.in_(part), claimable)
                        .values(state=S.IN_FLIGHT, lease_until=lease_until, lease_token=token,
                                last_attempt_at=now, updated_at=now,
                                first_attempt_at=func.coalesce(pb.first_attempt_at, now))
                        .returning(pb.id, pb.conversion_id, pb.partner_id, pb.url, pb.method,
                                   pb.body,
                                   pb.attempts, pb.first_attempt_at, pb.received_at,
                                   pb.round_start_attempts, pb.event_seq, pb.trace_context)
                    )
                    claimed.extend(Claimed(**r, token=token) for r in fetch_dicts(conn, stmt))
        return claimed

    def finish(self, *, updates: Sequence[Mapping[str, Any]], attempts: Sequence[Mapping[str, Any]],
               dead_letters: Sequence[Mapping[str, Any]],
               released: Sequence[Mapping[str, Any]] = ()) -> int:
        """Save a group of answers in one transaction: record the attempts, move the claimed
        postbacks to their next state (only under our lease), write the dead letters, put the
        `released` ones back to wait (see `release`), and make due the postbacks that wait
        behind one now delivered or skipped (same conversion and partner, later event).

        Returns how many postback rows were updated (fewer if a lease was lost).
        """
        with self.engine.begin() as conn:
            if released:
                self._release(conn, released)
            if self.dialect == "postgresql" and updates:
                changed = self._finish_pg(conn, updates, attempts)
            else:
                changed = self._finish_generic(conn, updates, attempts)
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
                dead_letter_events(conn, dead_letters)  # operator events, in this transaction
        return changed

    def _finish_generic(self, conn: Connection, updates: Sequence[Mapping[str, Any]],
                        attempts: Sequence[Mapping[str, Any]]) -> int:
        pb = t.postbacks.c
        if attempts:
            conn.execute(insert(t.attempts), list(attempts))
        changed = self.bulk_update(conn, t.postbacks, updates, match=_FINISH_MATCH, assign={
            **_FINISH_ASSIGN, "attempts": pb.attempts + 1, "lease_until": None,
            "lease_token": None})
        done = [u["id"] for u in updates if u["state"] in _DONE]
        if done:
            wake_successors(conn, done, max(u["updated_at"] for u in updates))
        return changed

    def _finish_pg(self, conn: Connection, updates: Sequence[Mapping[str, Any]],
                   attempts: Sequence[Mapping[str, Any]]) -> int:
        """`_finish_generic` as one statement: the attempts, the postbacks' new states and
        the wake-up of their successors (one round trip, one trigger run per table)."""
        keys = list(_FINISH_MATCH) + sorted(set(_FINISH_ASSIGN.values()))
        template = self.values_template(conn, t.postbacks, keys, _FINISH_MATCH, _FINISH_ASSIGN)
        values = mogrify_rows(conn, template, tuples(updates, keys))
        sets = ", ".join(f"{c} = v.{k}" for c, k in _FINISH_ASSIGN.items())
        sql = (f"WITH v ({', '.join(keys)}) AS (VALUES {values}), "
               f"done AS (UPDATE postbacks SET {sets}, attempts = postbacks.attempts + 1, "
               "lease_until = NULL, lease_token = NULL FROM v "
               "WHERE postbacks.id = v.id AND postbacks.lease_token = v.token "
               "RETURNING postbacks.id)")
        finished = [u["id"] for u in updates if u["state"] in _DONE]
        if finished:
            # Driven by the primary key of the finished ones, so the later events are found
            # by the (conversion, partner, event_seq) index whatever the table's statistics.
            ids = mogrify_rows(conn, "%s", [(finished,)])
            now = mogrify_rows(conn, "%s", [(max(u["updated_at"] for u in updates),)])
            sql += (f", woke AS (UPDATE postbacks l SET next_attempt_at = {now}, "
                    f"updated_at = {now} FROM postbacks d WHERE d.id = ANY({ids}) "
                    "AND l.conversion_id = d.conversion_id AND l.partner_id = d.partner_id "
                    f"AND l.event_seq > d.event_seq AND l.state = '{S.RETRY_SCHEDULED.value}' "
                    f"AND l.reason LIKE '{ORDER_PREFIX}%')")
        if attempts:
            cols = list(attempts[0])
            rows = mogrify_rows(conn, "(" + ", ".join(["%s"] * len(cols)) + ")",
                                tuples(attempts, cols))
            sql += f", a AS (INSERT INTO attempts ({', '.join(cols)}) VALUES {rows})"
        sql += " SELECT count(*) FROM done"
        cursor = conn.connection.cursor()
        try:
            cursor.execute(sql)  # no parameters: '%' is literal
            row = cursor.fetchone()
        finally:
            cursor.close()
        return int(row[0]) if row else 0

    def extend_leases(self, ids: Sequence[str], token: str, until: datetime) -> int:
        """Keep a batch's unanswered postbacks ours (no sweeper re-fires them meanwhile);
        returns how many leases were still ours."""
        pb = t.postbacks.c
        kept = 0
        with self.engine.begin() as conn:
            for part in chunks(list(ids)):
                kept += int(conn.execute(
                    update(t.postbacks)
                    .where(pb.id.in_(part), pb.lease_token == token, pb.state == S.IN_FLIGHT)
                    .values(lease_until=until)
                ).rowcount)
        return kept

    def release(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Put claimed postbacks back to wait (paused, circuit open, over a limit).

        rows: {id, token, next_attempt_at, reason, updated_at}. Unlike `finish`, no attempt is
        counted; a postback never fired forgets its first-attempt time (the horizon starts
        when it really fires).
        """
        if not rows:
            return 0
        with self.engine.begin() as conn:
            return self._release(conn, rows)

    def _release(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        pb = t.postbacks.c
        return self.bulk_update(conn, t.postbacks, rows,
                                match={"id": "id", "token": "lease_token"}, assign={
            "state": literal(S.RETRY_SCHEDULED.value), "reason": "reason",
            "next_attempt_at": "next_attempt_at", "updated_at": "updated_at",
            "lease_until": None, "lease_token": None,
            "first_attempt_at": case((pb.attempts == 0, None), else_=pb.first_attempt_at),
        })

    # -- beat, on-call --------------------------------------------------------------------

    def sweep_due(self, *, now: datetime, stale_pending_before: datetime, requeue_at: datetime,
                  limit: int) -> list[str]:
        """Mark due postbacks `queued` (skipping rows another sweeper holds); return their ids."""
        pb = t.postbacks.c
        due = or_(
            and_(pb.state.in_([S.RETRY_SCHEDULED, S.QUEUED]), pb.next_attempt_at <= now),
            and_(pb.state == S.IN_FLIGHT, pb.lease_until < now),
            and_(pb.state == S.PENDING, pb.created_at < stale_pending_before),
        )
        inner = (
            select(pb.id).where(due).order_by(pb.next_attempt_at).limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(inner)]
            if not ids:
                return []
            for part in chunks(ids):
                conn.execute(
                    update(t.postbacks)
                    .where(pb.id.in_(part), due)
                    .values(state=S.QUEUED, next_attempt_at=requeue_at, lease_until=None,
                            lease_token=None, updated_at=now)
                )
        return ids

    def set_rendered(self, rows: Sequence[Mapping[str, Any]], now: datetime) -> int:
        """New URL and body for postbacks still waiting (rows: id, url, body)."""
        if not rows:
            return 0
        with self.engine.begin() as conn:
            return self.bulk_update(
                conn, t.postbacks, [{**r, "now": now} for r in rows], match={"id": "id"},
                assign={"url": "url", "body": "body", "updated_at": "now"})

    def waiting_selection(self, partner_id: str) -> tuple[
            list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """A partner's waiting postbacks (as replay_selection rows) with their conversions
        and clicks."""
        pb = t.postbacks.c
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(
                select(pb.id.label("postback_id"), pb.partner_id,
                       pb.last_class.label("failure_class"), pb.url, pb.conversion_id,
                       pb.event, pb.event_seq)
                .where(pb.partner_id == partner_id, pb.state == S.RETRY_SCHEDULED,
                       pb.reason.like(WAITING_PREFIX + "%"))).mappings()]
            convs = conversions_by_id(conn, [r["conversion_id"] for r in rows])
            clicks = clicks_by_transaction(conn, [c["transaction_id"] for c in convs.values()])
        return rows, convs, clicks

    def wake_waiting(self, partner_id: str, now: datetime) -> int:
        """Make a partner's waiting postbacks due now (resume, circuit closed)."""
        pb = t.postbacks.c
        with self.engine.begin() as conn:
            res = conn.execute(
                update(t.postbacks)
                .where(pb.partner_id == partner_id, pb.state == S.RETRY_SCHEDULED,
                       pb.reason.like(WAITING_PREFIX + "%"), pb.next_attempt_at > now)
                .values(next_attempt_at=now, updated_at=now)
            )
            return int(res.rowcount)

    def requeue_dead(self, entries: Sequence[tuple[str, str | None]], *,
                     due_at: Callable[[int], datetime], tag: str, reason: str,
                     now: datetime, bodies: Mapping[str, str | None] | None = None) -> int:
        """Replay: move still-dead postbacks (id, new URL or None) to `queued` in one
        transaction, the n-th moved due at `due_at(n)`, each starting a new round of its retry
        policy; two runs never both take one postback. Returns how many moved."""
        pb, dl = t.postbacks.c, t.dead_letters.c
        moved = 0
        with self.engine.begin() as conn:
            ids = [e[0] for e in entries]
            dead: set[str] = set()
            for part in chunks(ids, 500):
                dead.update(r[0] for r in conn.execute(
                    select(pb.id).where(pb.id.in_(part), pb.state == S.DEAD_LETTERED)
                    .with_for_update()))
            for postback_id, url in entries:
                if postback_id not in dead:
                    continue
                values: dict[str, Any] = {
                    "state": S.QUEUED, "next_attempt_at": due_at(moved), "first_attempt_at": None,
                    "lease_until": None, "lease_token": None, "triggered_by": tag,
                    "updated_at": now, "reason": reason,
                    # A new round of the retry policy: its attempts count from here.
                    "round_start_attempts": pb.attempts}
                if url is not None:
                    values["url"] = url
                if bodies is not None and postback_id in bodies:
                    values["body"] = bodies[postback_id]
                conn.execute(update(t.postbacks).where(
                    pb.id == postback_id, pb.state == S.DEAD_LETTERED).values(**values))
                conn.execute(update(t.dead_letters).where(dl.postback_id == postback_id).values(
                    replayed_at=now, replay_count=dl.replay_count + 1))
                moved += 1
        return moved

    def purge_dead_letters(self, filt: Filter, who: str, now: datetime) -> int:
        """Delete matching dead letters (their postbacks stay dead_lettered, marked purged)."""
        dl = t.dead_letters.c
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(select(dl.postback_id).select_from(DEAD_JOIN)
                                              .where(filter_clause(filt)))]
            for part in chunks(ids, 500):
                conn.execute(delete(t.dead_letters).where(dl.postback_id.in_(part)))
                conn.execute(update(t.postbacks).where(t.postbacks.c.id.in_(part))
                             .values(triggered_by=f"dead letter purged by {who}"[:200],
                                     updated_at=now))
        return len(ids)

    def purge_attempts(self, cutoff: datetime, size: int) -> int:
        """Retention: delete up to `size` attempts started before `cutoff` (one short batch)."""
        a = t.attempts.c
        with self.short_transaction() as conn:
            ids = [r[0] for r in conn.execute(self.pick(a.id, a.started_at < cutoff, size))]
            if ids:
                conn.execute(delete(t.attempts).where(a.id.in_(ids)))
        return len(ids)

    def purge_delivered(self, cutoff: datetime, size: int) -> int:
        """Retention: delete up to `size` postbacks delivered before `cutoff`, with their
        attempts and any old dead letter (one short batch)."""
        pb = t.postbacks.c
        old = (pb.state == S.DELIVERED) & (pb.delivered_at < cutoff)
        with self.short_transaction() as conn:
            ids = [r[0] for r in conn.execute(self.pick(pb.id, old, size))]
            if ids:
                conn.execute(delete(t.attempts).where(t.attempts.c.postback_id.in_(ids)))
                conn.execute(delete(t.dead_letters).where(t.dead_letters.c.postback_id.in_(ids)))
                conn.execute(delete(t.postbacks).where(pb.id.in_(ids), old))
        return len(ids)

    def record_test_fire(self, *, conversion: Mapping[str, Any], postback: Mapping[str, Any],
                         attempt: Mapping[str, Any]) -> None:
        """A test fire's conversion, postback and attempt (state "test", is_test = true)."""
        with self.engine.begin() as conn:
            conn.execute(insert(t.conversions).values(**conversion))
            conn.execute(insert(t.postbacks).values(**postback))
            conn.execute(insert(t.attempts).values(**attempt))

    # -- reads ----------------------------------------------------------------------------

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
                    pb.state.in_([S.RETRY_SCHEDULED, S.QUEUED])
                )
            ).one()
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return int(n), oldest
