"""The intake journal: accepted conversion events, committed before anyone acknowledges them.

The journal is the `conversions` table itself: an accepted event is a conversion row in state
`received`. Producers and the API insert rows here (one transaction per group of events);
workers claim `received` rows in bulk (FOR UPDATE SKIP LOCKED on PostgreSQL) and move them on.
Redis only tells workers that there is work.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.extensions as pg
from sqlalchemy import Connection, Engine, false, func, or_, select, tuple_, update
from sqlalchemy.exc import DBAPIError

from postback_worker.domain.attribution import ConversionState
from postback_worker.domain.events import ConversionEvent
from postback_worker.errors import Unavailable
from postback_worker.store import schema as t
from postback_worker.store.repo import Store
from postback_worker.store.sql import chunks, execute_values, fetch_dicts, values_list

RECEIVED = ConversionState.RECEIVED.value
# Up to this many events are one multi-row INSERT (store/sql.py pages execute_values by it).
ONE_STATEMENT = 1000


class JournalUnavailable(Unavailable):
    """PostgreSQL did not commit the events: nothing was accepted."""


COLUMNS = ("id", "transaction_id", "offer_id", "aff_id", "goal_id", "payout", "sale_amount",
           "currency", "status", "adv_sub", "ip", "device_id", "occurred_at", "received_at",
           "source_ip", "state", "reason", "processed_at", "trace_context")
_INSERT = (f"INSERT INTO {t.conversions.name} ({', '.join(COLUMNS)}) VALUES %s "
           "ON CONFLICT (id) DO NOTHING")
# The same statement as bytes around its VALUES list (LoopJournal builds the list itself).
_INSERT_HEAD, _INSERT_TAIL = (part.encode() for part in _INSERT.split("%s"))
# One event: the row template written out (no execute_values paging for a single row).
_INSERT_ONE = _INSERT.replace("%s", "(" + ", ".join(["%s"] * len(COLUMNS)) + ")")


def conversion_values(e: ConversionEvent) -> tuple[Any, ...]:
    """The journal row of an accepted event (a conversion waiting for intake), in COLUMNS order."""
    return (e.id, e.transaction_id, e.offer_id, None, e.goal_id, e.payout, e.sale_amount,
            e.currency, e.status, e.adv_sub, e.ip, e.device_id, e.occurred_at, e.received_at,
            e.source_ip, RECEIVED, None, None, e.trace_context)


def conversion_row(e: ConversionEvent) -> dict[str, Any]:
    """The journal row of an accepted event, as a mapping."""
    return dict(zip(COLUMNS, conversion_values(e), strict=True))


class Journal:
    """Writes accepted events and hands pending ones to workers in bulk."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # PostgreSQL: one connection kept open in autocommit mode, so recording a group of
        # events is one INSERT, one round trip (no pool check-out, BEGIN or COMMIT); callers
        # take turns (the producer's group commit runs one commit at a time anyway).
        self._lock = threading.Lock()
        self._conn: Connection | None = None

    @classmethod
    def over(cls, engine: Engine) -> Journal:
        return cls(Store(engine))

    def record(self, events: Sequence[ConversionEvent]) -> None:
        """Commit the events (all or none; ids already stored are left as they are).

        Raises JournalUnavailable when the database cannot commit them.
        """
        if not events:
            return
        # Raw driver errors too: the multi-row INSERT runs on the driver's cursor.
        errors = (DBAPIError, self.store.engine.dialect.loaded_dbapi.Error)
        try:
            if self.store.dialect != "postgresql" or len(events) > ONE_STATEMENT:
                with self.store.engine.begin() as conn:
                    self.store.insert_conversions(conn, [conversion_row(e) for e in events])
                return
            rows = [conversion_values(e) for e in events]
            with self._lock:
                for attempt in (1, 2):
                    try:
                        self._insert(rows)
                        return
                    except errors:
                        self._drop()
                        # Perhaps a connection lost since the last call (the database
                        # restarted): once more on a new one. The insert is idempotent.
                        if attempt == 2:
                            raise
        except errors as exc:
            raise JournalUnavailable(
                f"the database did not store the events ({type(exc).__name__}); "
                "nothing was accepted, retry later") from exc

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        if self._conn is None:
            self._conn = self.store.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT")
        if len(rows) == 1:
            cursor = self._conn.connection.cursor()
            try:
                cursor.execute(_INSERT_ONE, rows[0])
            finally:
                cursor.close()
            return
        execute_values(self._conn, _INSERT, rows)  # one statement: atomic

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.invalidate()

    def close(self) -> None:
        """Return the kept connection to the pool."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(DBAPIError):
                conn.close()

    def claim(self, conn: Connection, limit: int,
              reattributed_before: datetime) -> list[dict[str, Any]]:
        """Lock up to `limit` pending conversions for this transaction, oldest first.

        Rows another worker holds are skipped, so workers share a backlog without waiting on
        each other; but an older waiting event of a transaction id this batch has (an earlier
        status of the same conversion, held by another worker) is waited for and, if still
        waiting then, taken too: the events of one conversion are folded in order.
        Conversions handed back by a re-attribution run wait for that run's own task, unless
        it was handed back before `reattributed_before` (its message was lost).
        """
        cv = t.conversions.c
        waiting = _waiting(reattributed_before)
        if self.store.dialect == "sqlite":
            # SQLite has no row locks and pysqlite begins a transaction only at the first
            # write: take the database write lock first, so two workers take turns (and the
            # oldest waiting events always come first: nothing older is held elsewhere).
            conn.execute(update(t.conversions).where(false()).values(state=cv.state))
            return fetch_dicts(conn, select(t.conversions).where(*waiting)
                               .order_by(cv.received_at, cv.id).limit(limit))
        rows = fetch_dicts(conn, select(t.conversions).where(*waiting)
                           .order_by(cv.received_at, cv.id)
                           .limit(limit).with_for_update(skip_locked=True))
        if not rows:
            return rows
        newest = max((r["received_at"], r["id"]) for r in rows)
        taken = {r["id"] for r in rows}
        for part in chunks(sorted({r["transaction_id"] for r in rows})):
            # Waits (no SKIP LOCKED) for the worker that holds them; rows it finished no
            # longer match once it commits.
            rows.extend(r for r in fetch_dicts(
                conn, select(t.conversions)
                .where(*waiting, cv.transaction_id.in_(part),
                       tuple_(cv.received_at, cv.id) < tuple_(*newest))
                .order_by(cv.received_at, cv.id).with_for_update())
                if r["id"] not in taken)
        rows.sort(key=lambda r: (r["received_at"], r["id"]))
        return rows

    def pending(self, older_than: datetime) -> int:
        """How many accepted events wait for intake since before `older_than`."""
        cv = t.conversions.c
        with self.store.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(
                *_waiting(older_than), cv.received_at < older_than)).scalar_one())


def _waiting(reattributed_before: datetime) -> tuple[Any, ...]:
    cv = t.conversions.c
    return (cv.state == RECEIVED,
            or_(cv.reattributed_at.is_(None), cv.reattributed_at < reattributed_before))


class LoopJournal:
    """`Journal.record` for an asyncio event loop, without a thread per commit.

    PostgreSQL: one psycopg2 asynchronous connection (autocommit) driven by the loop, so a
    group of events is one INSERT and the loop serves other requests while it commits (a
    thread-pool hand-off per commit cost about 1 ms of waiting for the GIL under load).
    Other databases, and groups over ONE_STATEMENT events, go through `Journal.record` in a
    thread.
    """

    def __init__(self, journal: Journal, timeout: float = 10.0) -> None:
        self.journal = journal
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._conn: Any = None

    async def record(self, events: Sequence[ConversionEvent]) -> None:
        """Commit the events (all or none); raises JournalUnavailable when the database
        cannot commit them (after one more try on a new connection)."""
        if not events:
            return
        if self.journal.store.dialect != "postgresql" or len(events) > ONE_STATEMENT:
            await asyncio.to_thread(self.journal.record, events)
            return
        rows = [conversion_values(e) for e in events]
        async with self._lock:
            for attempt in (1, 2):
                try:
                    await asyncio.wait_for(self._insert(rows), self.timeout)
                    return
                except (psycopg2.Error, OSError, TimeoutError) as exc:
                    self._drop()
                    if attempt == 2:
                        raise JournalUnavailable(
                            f"the database did not store the events ({type(exc).__name__}); "
                            "nothing was accepted, retry later") from exc

    async def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        if self._conn is None:
            engine = self.journal.store.engine
            cargs, cparams = engine.dialect.create_connect_args(engine.url)
            conn = psycopg2.connect(*cargs, **cparams, async_=1)
            self._conn = conn
            await _ready(conn)
        cursor = self._conn.cursor()
        try:
            cursor.execute(_INSERT_HEAD + values_list(cursor, None, rows) + _INSERT_TAIL)
            await _ready(self._conn)
        finally:
            cursor.close()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def close(self) -> None:
        self._drop()


async def _ready(conn: Any) -> None:
    """Drive an asynchronous psycopg2 connection until its current operation is done."""
    loop = asyncio.get_running_loop()
    while True:
        state = conn.poll()
        if state == pg.POLL_OK:
            return
        fd = conn.fileno()
        done: asyncio.Future[None] = loop.create_future()

        def wake(done: asyncio.Future[None] = done) -> None:
            if not done.done():
                done.set_result(None)

        reading = state == pg.POLL_READ
        if reading:
            loop.add_reader(fd, wake)
        else:
            loop.add_writer(fd, wake)
        try:
            await done
        finally:
            if reading:
                loop.remove_reader(fd)
            else:
                loop.remove_writer(fd)
