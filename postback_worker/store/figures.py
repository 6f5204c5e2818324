"""Every figure metrics, reports, alerts and the dashboard show: the SQL, in one place.

`RawFigures` computes each figure from raw rows (SQLite, and the reference the tests compare
with); `RollupFigures` reads the same figures from the rollups the PostgreSQL triggers keep
(store/rollups.py), reading raw rows only for the partial hour or minute at each end of a
range. `figures_for(store)` picks the one the database supports.

Test fires are never counted: attempts with `is_test`, postbacks (and their conversions) that a
test fire created.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, literal, select, union_all
from sqlalchemy.sql.elements import ColumnElement

from postback_worker.domain.attribution import ConversionState
from postback_worker.domain.deadletters import Filter
from postback_worker.domain.masking import mask_url
from postback_worker.store import schema as t
from postback_worker.store.deadletters import DEAD_JOIN, filter_clause
from postback_worker.store.lifecycle import event_counts, event_kinds
from postback_worker.store.repo import Store
from postback_worker.store.rollups import DURATION_BOUNDS, LATENCY_BOUNDS

A = t.attempts.c
P = t.postbacks.c
C = t.conversions.c
RECEIVED = ConversionState.RECEIVED.value
D = t.dead_letters.c

FAILED_POSTBACK = "dead_lettered"
BACKLOG_STATES = ("pending", "queued", "in_flight", "retry_scheduled")
# Report buckets of postback counts: every postback, and those in each final state.
BUCKETS = {"delivered": "delivered", FAILED_POSTBACK: "failed", "skipped": "skipped"}
HOUR = 3600
DAY = 86400
MINUTE = 60
# Bounds of an open-ended time range (whole hours, so they read rollups only).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
# Key of a histogram's total (microseconds) beside its per-bound counts.
TOTAL = -1.0


def utc(value: datetime | None) -> datetime | None:
    """Timezone-aware UTC (SQLite and some aggregates return naive datetimes)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def duration_bucket(ms: float | None) -> float:
    """Upper bound of a duration's histogram bucket: rounded up to two significant digits
    (the twin of the SQL function pbw_duration_bucket, operation for operation)."""
    if ms is None or ms <= 0:
        return 0.0
    e = math.floor(math.log10(ms))
    if e >= 1:
        q = 10.0 ** (e - 1)
        return math.ceil(ms / q - 1e-9) * q
    k = 10.0 ** (1 - e)
    return math.ceil(ms * k - 1e-9) / k


def bound_of(micros: int, bounds: Sequence[float]) -> float:
    """The smallest bound (seconds) a value in microseconds does not exceed; infinity above
    them all (the twin of rollups.bound_sql)."""
    for b in bounds:
        if micros <= round(b * 1_000_000):
            return b
    return math.inf


def test_postback_ids(conn: Connection) -> list[str]:
    """Postbacks a test fire created (few; a partial index finds them)."""
    return [r[0] for r in conn.execute(  # `WHERE is_test`: the partial index's predicate
        select(A.postback_id).where(A.is_test).distinct())]


class Exclusions:
    """What every figure leaves out: test-fire postbacks, their conversions and attempts."""

    def __init__(self, postback_ids: list[str]) -> None:
        self.postback_ids = postback_ids

    def real_postback(self, column: Any = P.id) -> ColumnElement[bool]:
        if not self.postback_ids:
            return literal(True)
        return column.not_in(self.postback_ids)

    def real_conversion(self) -> ColumnElement[bool]:
        if not self.postback_ids:
            return literal(True)
        return C.id.not_in(select(P.conversion_id).where(P.id.in_(self.postback_ids)))

    def real_attempt(self) -> ColumnElement[bool]:
        return A.is_test.is_(False)


class OnlyTests(Exclusions):
    """The opposite selection: only what belongs to test fires (rollups count it; readers
    subtract it)."""

    def real_postback(self, column: Any = P.id) -> ColumnElement[bool]:
        return column.in_(self.postback_ids)

    def real_conversion(self) -> ColumnElement[bool]:
        return C.id.in_(select(P.conversion_id).where(P.id.in_(self.postback_ids)))

    def real_attempt(self) -> ColumnElement[bool]:
        return literal(True)


def seconds_between(later: Any, earlier: Any, dialect: str) -> Any:
    """SQL expression: seconds from `earlier` to `later` (timestamps)."""
    if dialect == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.extract("epoch", later - earlier)


def _floor(when: datetime, step: int) -> datetime:
    ts = int(when.timestamp())
    return datetime.fromtimestamp(ts - ts % step, UTC)


def _ceil(when: datetime, step: int) -> datetime:
    floor = _floor(when, step)
    return floor if floor == when else floor + timedelta(seconds=step)


def split(since: datetime, until: datetime, step: int
          ) -> tuple[tuple[datetime, datetime] | None, list[tuple[datetime, datetime]]]:
    """[since, until) as whole steps (or None) and the partial pieces at either end."""
    inner_since, inner_until = _ceil(since, step), _floor(until, step)
    if inner_since >= inner_until:
        return None, [(since, until)]
    edges = [(a, b) for a, b in ((since, inner_since), (inner_until, until)) if a < b]
    return (inner_since, inner_until), edges


def _add(totals: dict[Any, int], key: Any, n: int) -> None:
    totals[key] = totals.get(key, 0) + int(n)


def _status(code: int | None) -> int | None:
    return None if code is None or code < 0 else int(code)


class RawFigures:
    """Figures from raw rows; cost grows with the rows in range."""

    def __init__(self, store: Store, *, only_tests: bool = False) -> None:
        self.store = store
        self.dialect = store.dialect
        self.only_tests = only_tests
        self._ex: Exclusions | None = None

    def connect(self) -> Any:
        return self.store.engine.connect()

    def exclusions(self, conn: Connection) -> Exclusions:
        if self._ex is None:
            ids = test_postback_ids(conn)
            self._ex = OnlyTests(ids) if self.only_tests else Exclusions(ids)
        return self._ex

    def _grouped(self, make: Callable[[Exclusions], Any]) -> dict[Any, int]:
        """Run the GROUP BY ... count() statement `make` builds: key columns -> count."""
        out: dict[Any, int] = {}
        with self.connect() as conn:
            for row in conn.execute(make(self.exclusions(conn))):
                _add(out, tuple(row[:-1]), row[-1])
        return out

    # -- history-wide counts (metrics counters and gauges) ---------------------------------

    def postback_outcomes(self) -> dict[tuple[str, str, str], int]:
        """(partner, "delivered" | "failed", failure class or "") -> postbacks."""
        out: dict[tuple[str, str, str], int] = {}
        with self.connect() as conn:
            ex = self.exclusions(conn)
            for partner, state, cls, n in conn.execute(
                select(P.partner_id, P.state, P.last_class, func.count())
                .where(P.state.in_(["delivered", FAILED_POSTBACK]), ex.real_postback())
                .group_by(P.partner_id, P.state, P.last_class)
            ):
                failed = state == FAILED_POSTBACK
                _add(out, (partner, BUCKETS[state], (cls or "config") if failed else ""), n)
        return out

    def attempt_totals(self) -> dict[tuple[str, str], int]:
        """(partner, failure class) -> attempts."""
        return self._grouped(lambda ex: (
            select(P.partner_id, A.failure_class, func.count())
            .select_from(t.attempts.join(t.postbacks, P.id == A.postback_id))
            .where(ex.real_attempt(), ex.real_postback())
            .group_by(P.partner_id, A.failure_class)))

    def conversion_states(self) -> dict[str, int]:
        with self.connect() as conn:
            ex = self.exclusions(conn)
            return {state: int(n) for state, n in conn.execute(
                select(C.state, func.count()).where(ex.real_conversion()).group_by(C.state))}

    def dead_letters(self) -> dict[tuple[str, str], int]:
        """(partner, failure class) -> dead letters still waiting (postback dead-lettered)."""
        return self._grouped(lambda ex: (
            select(D.partner_id, D.failure_class, func.count())
            .select_from(t.dead_letters.join(t.postbacks, P.id == D.postback_id))
            .where(P.state == FAILED_POSTBACK, ex.real_postback(D.postback_id))
            .group_by(D.partner_id, D.failure_class)))

    # -- backlog (cost grows with the backlog, not with history) ----------------------------

    def retry_backlog(self) -> tuple[int, datetime | None]:
        """Postbacks waiting for a retry (retry_scheduled or queued) and the oldest due time."""
        with self.connect() as conn:
            ex = self.exclusions(conn)
            n, oldest = conn.execute(
                select(func.count(), func.min(P.next_attempt_at))
                .where(P.state.in_(["retry_scheduled", "queued"]), ex.real_postback())).one()
        return int(n), utc(oldest)

    def backlog_by_partner(self) -> dict[str, tuple[int, datetime]]:
        """Partner -> (postbacks not yet delivered nor given up, oldest creation time)."""
        with self.connect() as conn:
            ex = self.exclusions(conn)
            rows = conn.execute(
                select(P.partner_id, func.count(), func.min(P.created_at))
                .where(P.state.in_(BACKLOG_STATES), ex.real_postback())
                .group_by(P.partner_id)).all()
        out: dict[str, tuple[int, datetime]] = {}
        for partner, n, oldest in rows:
            when = utc(oldest)
            assert when is not None
            out[partner] = (int(n), when)
        return out

    def open_alerts_by_kind(self) -> dict[str, int]:
        al = t.alerts.c
        with self.connect() as conn:
            return {kind: int(n) for kind, n in conn.execute(
                select(al.kind, func.count()).where(al.state == "open").group_by(al.kind))}

    # -- windows (metrics, alerts, partner health) ------------------------------------------

    def attempt_window(self, since: datetime, until: datetime,
                       partner_id: str | None = None) -> dict[tuple[str, int | None, str], int]:
        """(partner, status code, failure class) -> attempts started in [since, until)."""
        def make(ex: Exclusions) -> Any:
            stmt = (
                select(P.partner_id, A.status_code, A.failure_class, func.count())
                .select_from(t.attempts.join(t.postbacks, P.id == A.postback_id))
                .where(A.started_at >= since, A.started_at < until, ex.real_attempt(),
                       ex.real_postback())
                .group_by(P.partner_id, A.status_code, A.failure_class))
            return stmt.where(P.partner_id == partner_id) if partner_id else stmt

        return self._grouped(make)

    def duration_histogram(self, since: datetime, until: datetime
                           ) -> dict[tuple[str, float], int]:
        """Attempts started in [since, until): (partner, bound) -> how many took at most that
        bound and more than the one below (seconds; infinity above the last DURATION_BOUNDS),
        and (partner, TOTAL) -> their total duration in microseconds."""
        def make(ex: Exclusions) -> Any:
            return (select(P.partner_id, A.duration_ms)
                    .select_from(t.attempts.join(t.postbacks, P.id == A.postback_id))
                    .where(A.started_at >= since, A.started_at < until, ex.real_attempt(),
                           ex.real_postback()))

        return self._binned(make, lambda ms: math.floor(ms * 1000 + 0.5), DURATION_BOUNDS)

    def latency_histogram(self, since: datetime, until: datetime
                          ) -> dict[tuple[str, float], int]:
        """Postbacks delivered in [since, until): the same shape for the time from conversion
        received to postback delivered (LATENCY_BOUNDS)."""
        def make(ex: Exclusions) -> Any:
            return (select(P.partner_id, P.delivered_at, P.received_at)
                    .where(P.state == "delivered", P.delivered_at >= since,
                           P.delivered_at < until, ex.real_postback()))

        def micros(delivered: datetime, received: datetime) -> int:
            return (utc(delivered) - utc(received)) // timedelta(microseconds=1)  # type: ignore[operator]

        return self._binned(make, micros, LATENCY_BOUNDS)

    def _binned(self, make: Callable[[Exclusions], Any], micros: Callable[..., int],
                bounds: Sequence[float]) -> dict[tuple[str, float], int]:
        out: dict[tuple[str, float], int] = {}
        with self.connect() as conn:
            for partner, *values in conn.execute(make(self.exclusions(conn))):
                us = micros(*values)
                _add(out, (partner, bound_of(us, bounds)), 1)
                _add(out, (partner, TOTAL), us)
        return {k: n for k, n in out.items() if n}

    def dead_letters_window(self, since: datetime, until: datetime
                            ) -> dict[tuple[str, str], int]:
        """(partner, class) -> dead letters created in [since, until), postback still dead."""
        return self._grouped(lambda ex: (
            select(D.partner_id, D.failure_class, func.count())
            .select_from(t.dead_letters.join(t.postbacks, P.id == D.postback_id))
            .where(D.created_at >= since, D.created_at < until, P.state == FAILED_POSTBACK,
                   ex.real_postback(D.postback_id))
            .group_by(D.partner_id, D.failure_class)))

    def lost_counts(self, since: datetime, until: datetime, offer_id: str | None = None
                    ) -> dict[tuple[str | None, str], int]:
        """(offer, state) -> conversions received in [since, until) and processed."""
        def make(ex: Exclusions) -> Any:
            stmt = (
                select(C.offer_id, C.state, func.count())
                .where(C.received_at >= since, C.received_at < until, C.state != "received",
                       ex.real_conversion())
                .group_by(C.offer_id, C.state))
            return stmt.where(C.offer_id == offer_id) if offer_id else stmt

        return self._grouped(make)

    # -- reports (postbacks created in a range, and their attempts) ------------------------

    def _scope(self, ex: Exclusions, since: datetime, until: datetime, partner_id: str | None,
               offer_id: str | None) -> list[ColumnElement[bool]]:
        conds = [P.created_at >= since, P.created_at < until, ex.real_postback()]
        if partner_id:
            conds.append(P.partner_id == partner_id)
        if offer_id:
            conds.append(P.conversion_id.in_(select(C.id).where(C.offer_id == offer_id)))
        return conds

    def report_postbacks(self, since: datetime, until: datetime, partner_id: str | None = None,
                         offer_id: str | None = None) -> dict[tuple[str, str, str], int]:
        """(partner, bucket, failure class or "") -> postbacks created in [since, until);
        bucket: postbacks (all), delivered, failed, skipped."""
        out: dict[tuple[str, str, str], int] = {}
        with self.connect() as conn:
            where = self._scope(self.exclusions(conn), since, until, partner_id, offer_id)
            for partner, state, cls, n in conn.execute(
                select(P.partner_id, P.state, P.last_class, func.count()).where(*where)
                .group_by(P.partner_id, P.state, P.last_class)
            ):
                _add(out, (partner, "postbacks", ""), n)
                if state in BUCKETS:
                    failed = state == FAILED_POSTBACK
                    _add(out, (partner, BUCKETS[state], (cls or "config") if failed else ""), n)
        return out

    def report_lifecycle(self, since: datetime, until: datetime, partner_id: str | None = None,
                         offer_id: str | None = None) -> dict[str, Any]:
        """Conversion events recorded in [since, until) (status changes, reversals,
        adjustments, repeats) and postbacks created in range per event."""
        out: dict[str, Any] = event_counts(self.lifecycle_events(since, until))
        out["postbacks_by_event"] = self.postbacks_by_event(since, until, partner_id, offer_id)
        return out

    def lifecycle_events(self, since: datetime, until: datetime
                         ) -> dict[tuple[str, str, str], int]:
        """(kind, status, previous status or "") -> conversion events (not `created`)
        recorded in [since, until)."""
        with self.connect() as conn:
            return event_kinds(conn, since, until)

    def postbacks_by_event(self, since: datetime, until: datetime,
                           partner_id: str | None = None, offer_id: str | None = None
                           ) -> dict[str, int]:
        """Event -> postbacks created in [since, until) that carry one."""
        with self.connect() as conn:
            where = self._scope(self.exclusions(conn), since, until, partner_id, offer_id)
            return {event: int(n) for event, n in conn.execute(
                select(P.event, func.count()).where(*where, P.event.is_not(None))
                .group_by(P.event))}

    # -- dead letters (`dlq list`) ----------------------------------------------------------

    def dead_letter_total(self, filt: Filter) -> int:
        """Dead letters matching `filt` whose postback is still dead-lettered."""
        with self.connect() as conn:
            ex = self.exclusions(conn)
            return int(conn.execute(
                select(func.count()).select_from(DEAD_JOIN)
                .where(filter_clause(filt), ex.real_postback(D.postback_id))).scalar() or 0)

    def dead_letters_by_key(self, since: datetime, until: datetime, partner_id: str | None,
                            offer_id: str | None, failure_class: str | None,
                            last_status: int | None) -> dict[tuple[()], int]:
        """The same count over [since, until), keyed by () (the shape hybrids add up)."""
        filt = Filter(partner_id=partner_id, offer_id=offer_id, failure_class=failure_class,
                      since=since, last_status=last_status)
        with self.connect() as conn:
            ex = self.exclusions(conn)
            n = conn.execute(
                select(func.count()).select_from(DEAD_JOIN)
                .where(filter_clause(filt), D.created_at < until,
                       ex.real_postback(D.postback_id))).scalar()
        return {(): int(n)} if n else {}

    def report_attempts(self, since: datetime, until: datetime, partner_id: str | None = None,
                        offer_id: str | None = None) -> dict[tuple[str, int | None, str], int]:
        """(partner, status code, failure class) -> attempts of postbacks created in range."""
        return self._grouped(lambda ex: (
            select(P.partner_id, A.status_code, A.failure_class, func.count())
            .select_from(t.attempts.join(t.postbacks, P.id == A.postback_id))
            .where(*self._scope(ex, since, until, partner_id, offer_id), ex.real_attempt())
            .group_by(P.partner_id, A.status_code, A.failure_class)))

    def report_durations(self, since: datetime, until: datetime, partner_id: str | None = None,
                         offer_id: str | None = None) -> dict[tuple[str, float], int]:
        """(partner, duration bucket in ms) -> attempts of postbacks created in range."""
        out: dict[tuple[str, float], int] = {}
        joined = t.attempts.join(t.postbacks, P.id == A.postback_id)
        with self.connect() as conn:
            ex = self.exclusions(conn)
            where = [*self._scope(ex, since, until, partner_id, offer_id), ex.real_attempt()]
            if self.dialect == "postgresql":
                bucket = func.pbw_duration_bucket(A.duration_ms)
                for partner, b, n in conn.execute(
                    select(P.partner_id, bucket, func.count()).select_from(joined)
                    .where(*where).group_by(P.partner_id, bucket)
                ):
                    _add(out, (partner, float(b)), n)
                return out
            for partner, ms in conn.execute(select(P.partner_id, A.duration_ms)
                                            .select_from(joined).where(*where)):
                _add(out, (partner, duration_bucket(ms)), 1)
        return out

    # -- dashboard series ---------------------------------------------------------------------

    def attempt_minutes(self, since: datetime, until: datetime, partner_id: str | None = None
                        ) -> dict[tuple[datetime, str], int]:
        """(minute, failure class) -> attempts started in [since, until), by start minute."""
        out: dict[tuple[datetime, str], int] = {}
        if self.dialect == "postgresql":
            minute: Any = func.date_trunc("minute", A.started_at, "UTC")
        else:
            minute = func.strftime("%Y-%m-%d %H:%M:00", A.started_at)
        with self.connect() as conn:
            ex = self.exclusions(conn)
            stmt = (
                select(minute, A.failure_class, func.count())
                .select_from(t.attempts.join(t.postbacks, P.id == A.postback_id))
                .where(A.started_at >= since, A.started_at < until, ex.real_attempt(),
                       ex.real_postback())
                .group_by(minute, A.failure_class))
            if partner_id:
                stmt = stmt.where(P.partner_id == partner_id)
            for m, cls, n in conn.execute(stmt):
                when = datetime.fromisoformat(m) if isinstance(m, str) else m
                key = (utc(when), cls)
                _add(out, key, n)  # type: ignore[arg-type]
        return out

    # -- the failed-postback export -----------------------------------------------------------

    def failed_postbacks(self, since: datetime, until: datetime, partner_id: str | None = None,
                         offer_id: str | None = None, limit: int | None = None
                         ) -> Iterator[dict[str, Any]]:
        """Every dead-lettered postback created in range, oldest first, streamed."""
        last_url = (
            select(A.url).where(A.postback_id == P.id, A.is_test.is_(False))
            .order_by(A.attempt_no.desc(), A.id.desc()).limit(1).scalar_subquery()
        )
        with self.connect() as conn:
            where = self._scope(self.exclusions(conn), since, until, partner_id, offer_id)
            stmt = (
                select(P.id, P.conversion_id, C.transaction_id, C.offer_id,
                       P.partner_id, P.last_status, P.last_class, P.attempts,
                       P.created_at, P.last_attempt_at, P.reason, last_url, P.url)
                .select_from(t.postbacks.join(t.conversions, C.id == P.conversion_id))
                .where(*where, P.state == FAILED_POSTBACK)
                .order_by(P.created_at, P.id)
            )
            if limit is not None:
                stmt = stmt.limit(limit)
            for row in conn.execution_options(yield_per=1000).execute(stmt):
                yield {
                    "postback_id": row[0], "conversion_id": row[1], "transaction_id": row[2],
                    "offer_id": row[3], "partner_id": row[4], "last_status": row[5],
                    "last_class": row[6] or "config", "attempts": int(row[7]),
                    "created_at": utc(row[8]), "last_attempt_at": utc(row[9]),
                    "error": row[10] or "", "url": row[11] or mask_url(row[12] or ""),
                }


class RollupFigures(RawFigures):
    """The same figures from the trigger-kept rollups (PostgreSQL): whole hours or minutes
    from the rollups, minus what test fires added to them; partial ones from rows."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._tests: RawFigures | None = None
        self._tests_loaded = False

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """Rows are read only for the partial hour or minute at each end of a range: few, so
        they are probed through indexes (PostgreSQL would otherwise hash-join whole tables)."""
        with self.store.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL enable_hashjoin = off; "
                                 "SET LOCAL enable_mergejoin = off")
            yield conn

    def tests(self) -> RawFigures | None:
        """Raw figures of test-fire rows only, or None when there are none."""
        if not self._tests_loaded:
            with self.connect() as conn:
                ids = test_postback_ids(conn)
            if ids:
                self._tests = RawFigures(self.store, only_tests=True)
                self._tests._ex = OnlyTests(ids)
            self._tests_loaded = True
        return self._tests

    def _sum(self, table: Any, keys: Sequence[str], *where: Any) -> list[Any]:
        cols = [table.c[k] for k in keys]
        with self.connect() as conn:
            return conn.execute(
                select(*cols, func.sum(table.c.n)).where(*where).group_by(*cols)
                .having(func.sum(table.c.n) != 0)).all()

    def _sum_hours(self, table: Any, keys: Sequence[str], since: datetime, until: datetime,
                   cond: Callable[[Any], list[Any]] = lambda tb: []) -> list[Any]:
        """`_sum` over the whole hours [since, until) of an hourly rollup: whole days from its
        day table plus the deltas not folded into it yet, the hours around them from the
        hourly table. `cond(table)`: further conditions, for either table."""
        days = t.DAYS[table.name]
        inner, edges = split(since, until, DAY)

        def part(tb: Any, column: str, lo: datetime, hi: datetime, *extra: Any) -> Any:
            return select(*[tb.c[k] for k in keys], tb.c.n).where(
                tb.c[column] >= lo, tb.c[column] < hi, *extra, *cond(tb))

        parts = [part(table, "hour", a, b) for a, b in edges]
        if inner:
            parts += [part(days, "day", *inner),
                      part(table, "hour", *inner, table.c.compacted.is_(False))]
        both = union_all(*parts).subquery()
        cols = [both.c[k] for k in keys]
        with self.connect() as conn:
            return conn.execute(
                select(*cols, func.sum(both.c.n)).group_by(*cols)
                .having(func.sum(both.c.n) != 0)).all()

    def _net(self, out: dict[Any, int], method: str, *args: Any) -> dict[Any, int]:
        """`out` less the test fires' share of it (what `method` counts for them)."""
        tests = self.tests()
        if tests is not None:
            for key, n in getattr(tests, method)(*args).items():
                _add(out, key, -n)
        return {k: n for k, n in out.items() if n}

    def postback_outcomes(self) -> dict[tuple[str, str, str], int]:
        r = t.rollup_postbacks
        out = {(p, b, c): int(n) for p, b, c, n in self._sum_hours(
            r, ("partner_id", "bucket", "last_class"), EARLIEST, LATEST,
            lambda tb: [tb.c.bucket.in_(["delivered", "failed"])])}
        return self._net(out, "postback_outcomes")

    def attempt_totals(self) -> dict[tuple[str, str], int]:
        r = t.rollup_attempts
        out = {(p, c): int(n) for p, c, n in self._sum_hours(
            r, ("partner_id", "failure_class"), EARLIEST, LATEST)}
        return self._net(out, "attempt_totals")

    def conversion_states(self) -> dict[str, int]:
        out = {s: int(n) for s, n in self._sum_hours(t.rollup_conversions, ("state",),
                                                      EARLIEST, LATEST)}
        # Events waiting for intake are not in the rollup (store/rollups.py): from rows.
        with self.connect() as conn:
            _add(out, RECEIVED, int(conn.execute(
                select(func.count()).where(C.state == RECEIVED)).scalar_one()))
        return self._net(out, "conversion_states")

    def dead_letters(self) -> dict[tuple[str, str], int]:
        out = {(p, c): int(n) for p, c, n in self._sum(t.rollup_dead_letters,
                                                        ("partner_id", "failure_class"))}
        return self._net(out, "dead_letters")

    def _hybrid(self, method: str, step: int, since: datetime, until: datetime,
                extra: tuple[Any, ...], inner_rows: Any, *, net: bool = True
                ) -> dict[Any, int]:
        """Rows for the partial steps at either end, rollups (less test fires, unless `net`
        is false: what test fires never add to) between."""
        inner, edges = split(since, until, step)
        out: dict[Any, int] = {}
        raw = getattr(RawFigures, method)
        for a, b in edges:
            for key, n in raw(self, a, b, *extra).items():
                _add(out, key, n)
        if inner:
            part: dict[Any, int] = {}
            for key, n in inner_rows(*inner):
                _add(part, key, n)
            for key, n in (self._net(part, method, *inner, *extra) if net else part).items():
                _add(out, key, n)
        return {k: n for k, n in out.items() if n}

    def attempt_window(self, since: datetime, until: datetime,
                       partner_id: str | None = None) -> dict[tuple[str, int | None, str], int]:
        r = t.rollup_attempt_minutes

        def rows(a: datetime, b: datetime) -> Iterator[tuple[Any, int]]:
            where = [r.c.minute >= a, r.c.minute < b]
            if partner_id:
                where.append(r.c.partner_id == partner_id)
            for p, code, cls, n in self._sum(r, ("partner_id", "status_code", "failure_class"),
                                             *where):
                yield (p, _status(code), cls), int(n)

        return self._hybrid("attempt_window", MINUTE, since, until, (partner_id,), rows)

    def lost_counts(self, since: datetime, until: datetime, offer_id: str | None = None
                    ) -> dict[tuple[str | None, str], int]:
        r = t.rollup_conversions

        def cond(tb: Any) -> list[Any]:
            return [tb.c.state != "received"] + ([tb.c.offer_id == offer_id] if offer_id else [])

        def rows(a: datetime, b: datetime) -> Iterator[tuple[Any, int]]:
            for offer, state, n in self._sum_hours(r, ("offer_id", "state"), a, b, cond):
                yield (offer or None, state), int(n)

        return self._hybrid("lost_counts", HOUR, since, until, (offer_id,), rows)

    def _report(self, method: str, table: Any, keys: Sequence[str], since: datetime,
                until: datetime, partner_id: str | None, offer_id: str | None,
                convert: Any) -> dict[Any, int]:
        if offer_id:  # rollups are not kept per offer: this one is counted from rows
            return getattr(RawFigures, method)(  # type: ignore[no-any-return]
                self, since, until, partner_id, offer_id)

        def cond(tb: Any) -> list[Any]:
            return [tb.c.partner_id == partner_id] if partner_id else []

        def rows(a: datetime, b: datetime) -> Iterator[tuple[Any, int]]:
            for row in self._sum_hours(table, keys, a, b, cond):
                yield convert(tuple(row[:-1])), int(row[-1])

        return self._hybrid(method, HOUR, since, until, (partner_id,), rows)

    def report_postbacks(self, since: datetime, until: datetime, partner_id: str | None = None,
                         offer_id: str | None = None) -> dict[tuple[str, str, str], int]:
        return self._report("report_postbacks", t.rollup_postbacks,
                            ("partner_id", "bucket", "last_class"), since, until, partner_id,
                            offer_id, tuple)

    def report_attempts(self, since: datetime, until: datetime, partner_id: str | None = None,
                        offer_id: str | None = None) -> dict[tuple[str, int | None, str], int]:
        return self._report("report_attempts", t.rollup_attempts,
                            ("partner_id", "status_code", "failure_class"), since, until,
                            partner_id, offer_id, lambda k: (k[0], _status(k[1]), k[2]))

    def report_durations(self, since: datetime, until: datetime, partner_id: str | None = None,
                         offer_id: str | None = None) -> dict[tuple[str, float], int]:
        return self._report("report_durations", t.rollup_durations, ("partner_id", "bucket_ms"),
                            since, until, partner_id, offer_id,
                            lambda k: (k[0], float(k[1])))

    def lifecycle_events(self, since: datetime, until: datetime
                         ) -> dict[tuple[str, str, str], int]:
        r = t.rollup_conversion_events

        def rows(a: datetime, b: datetime) -> Iterator[tuple[Any, int]]:
            for kind, status, previous, n in self._sum_hours(
                    r, ("kind", "status", "previous_status"), a, b):
                yield (kind, status, previous), int(n)

        # Test fires record no conversion events: nothing to subtract.
        return self._hybrid("lifecycle_events", HOUR, since, until, (), rows, net=False)

    def postbacks_by_event(self, since: datetime, until: datetime,
                           partner_id: str | None = None, offer_id: str | None = None
                           ) -> dict[str, int]:
        return self._report("postbacks_by_event", t.rollup_postback_events, ("event",), since,
                            until, partner_id, offer_id, lambda k: k[0])

    def dead_letter_total(self, filt: Filter) -> int:
        r = t.rollup_dead_letter_hours
        keys = (filt.partner_id, filt.offer_id, filt.failure_class, filt.last_status)

        def cond(tb: Any) -> list[Any]:
            return [tb.c[column] == value for column, value in zip(
                ("partner_id", "offer_id", "failure_class", "last_status"), keys, strict=True)
                if value is not None]

        def rows(a: datetime, b: datetime) -> Iterator[tuple[Any, int]]:
            for (n,) in self._sum_hours(r, (), a, b, cond):
                yield (), int(n)

        since = filt.since or EARLIEST
        until = filt.until + timedelta(microseconds=1) if filt.until else LATEST
        if since >= until:
            return 0
        return self._hybrid("dead_letters_by_key", HOUR, since, until, keys, rows).get((), 0)

    def _histogram(self, method: str, table: Any, since: datetime, until: datetime
                   ) -> dict[tuple[str, float], int]:
        def rows(a: datetime, b: datetime) -> Iterator[tuple[Any, int]]:
            cols = [table.c.partner_id, table.c.bound]
            with self.connect() as conn:
                for partner, bound, n, total in conn.execute(
                    select(*cols, func.sum(table.c.n), func.sum(table.c.total_us))
                    .where(table.c.minute >= a, table.c.minute < b).group_by(*cols)
                ):
                    yield (partner, float(bound)), int(n)
                    yield (partner, TOTAL), int(total)

        return self._hybrid(method, MINUTE, since, until, (), rows)

    def duration_histogram(self, since: datetime, until: datetime
                           ) -> dict[tuple[str, float], int]:
        return self._histogram("duration_histogram", t.rollup_attempt_durations, since, until)

    def latency_histogram(self, since: datetime, until: datetime
                          ) -> dict[tuple[str, float], int]:
        return self._histogram("latency_histogram", t.rollup_latencies, since, until)

    def attempt_minutes(self, since: datetime, until: datetime, partner_id: str | None = None
                        ) -> dict[tuple[datetime, str], int]:
        r = t.rollup_attempt_minutes

        def rows(a: datetime, b: datetime) -> Iterator[tuple[Any, int]]:
            where = [r.c.minute >= a, r.c.minute < b]
            if partner_id:
                where.append(r.c.partner_id == partner_id)
            for minute, cls, n in self._sum(r, ("minute", "failure_class"), *where):
                yield (utc(minute), cls), int(n)

        return self._hybrid("attempt_minutes", MINUTE, since, until, (partner_id,), rows)


def figures_for(store: Store) -> RawFigures:
    """Rollups on PostgreSQL, raw rows elsewhere."""
    return RollupFigures(store) if store.dialect == "postgresql" else RawFigures(store)
