"""What every store module shares: the engine, batched inserts and updates, chunked IN lists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Self

from psycopg2.extensions import encodings
from psycopg2.extras import execute_values as pg_execute_values
from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    Integer,
    String,
    Table,
    bindparam,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from postback_worker.store.db import make_engine
from postback_worker.store.schema import UTCDateTime

# Column types whose values psycopg2 returns as SQLAlchemy's result would (see fetch_dicts).
_RAW_TYPES = (String, Integer, Boolean, UTCDateTime)
CHUNK = 900  # stay under SQLite's bound-parameter limit in IN (...) lists
PAGE = 1000  # rows per multi-row statement on PostgreSQL


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def fetch_dicts(conn: Connection, stmt: Any) -> list[dict[str, Any]]:
    """The rows of a SELECT (or a statement RETURNING rows) as dicts.

    On PostgreSQL, for columns psycopg2 returns as SQLAlchemy would (text, integers,
    booleans, UTCDateTime made timezone-aware UTC as that type does), the rows are read
    straight from the driver's cursor: no SQLAlchemy row per row (the hot paths read hundreds
    of rows). Elsewhere, or with other column types, through SQLAlchemy's result."""
    columns = list(stmt.exported_columns)
    if conn.dialect.name != "postgresql" or not all(
            isinstance(c.type, _RAW_TYPES) for c in columns):
        return [dict(r) for r in conn.execute(stmt).mappings()]
    result = conn.execute(stmt)
    try:
        names = list(result.keys())
        rows = result.cursor.fetchall()
    finally:
        result.close()
    utc = [i for i, c in enumerate(columns) if isinstance(c.type, UTCDateTime)]
    if not utc:
        return [dict(zip(names, row, strict=True)) for row in rows]
    out = []
    for row in rows:
        values = list(row)
        for i in utc:
            v = values[i]
            if v is not None and v.tzinfo is not UTC:
                values[i] = _as_utc(v)
        out.append(dict(zip(names, values, strict=True)))
    return out


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StoreBase:
    """One engine and the batched statements every aggregate's module builds on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @classmethod
    def from_url(cls, url: str) -> Self:
        """A store over a new engine for `url` (pooled, per process)."""
        return cls(make_engine(url))

    def dispose(self) -> None:
        """Close the engine's pooled connections (after fork, at shutdown)."""
        self.engine.dispose()

    def _insert(self, table: Table) -> Any:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        if self.dialect == "sqlite":
            return sqlite.insert(table)
        return insert(table)

    def update_by_id(self, table: Table, row_id: str, values: Mapping[str, Any]) -> bool:
        """Set some columns of one row (by id); False when there is no such row."""
        with self.engine.begin() as conn:
            res = conn.execute(update(table).where(table.c.id == row_id).values(**values))
            return bool(res.rowcount)

    def pick(self, column: Any, where: Any, size: int) -> Any:
        """SELECT column WHERE ... LIMIT size, skipping rows others hold (PostgreSQL)."""
        stmt = select(column).where(where).limit(size)
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        return stmt

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction for the methods that take `conn` (committed on leaving)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def short_transaction(self) -> Iterator[Connection]:
        """A transaction that gives up on a lock after 5 s (purges never stall the workers)."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            yield conn

    def insert_ignore(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]],
                      keys: Sequence[str]) -> None:
        """INSERT ... ON CONFLICT (keys) DO NOTHING (see `insert_ignore`)."""
        insert_ignore(conn, table, rows, keys)

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
        template = self.values_template(conn, table, keys, match, assign)
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
        returned = execute_values(conn, sql, tuples(rows, keys),
                                   template=template, fetch=True)
        return len(returned)

    @staticmethod
    def values_template(conn: Connection, table: Table, keys: Sequence[str],
                        match: Mapping[str, str], assign: Mapping[str, Any]) -> str:
        """A VALUES row template for psycopg2 with each key cast to its column's type (keys
        named in `match` or as a str value of `assign`)."""
        types = {k: table.c[c].type for k, c in match.items()}
        types.update({v: table.c[c].type for c, v in assign.items() if isinstance(v, str)})
        sql_types = {k: _cast_type(t.compile(dialect=conn.dialect)) for k, t in types.items()}
        return "(" + ", ".join(f"%s::{sql_types[k]}" for k in keys) + ")"


def insert_ignore(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]],
                  keys: Sequence[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO NOTHING in the caller's transaction: one multi-row
    statement per chunk on PostgreSQL, an executemany elsewhere."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=list(keys))
        conn.execute(stmt, list(rows))
        return
    cols = list(rows[0])
    sql = (f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES %s "
           f"ON CONFLICT ({', '.join(keys)}) DO NOTHING")
    execute_values(conn, sql, tuples(rows, cols))


def _cast_type(sql_type: str) -> str:
    # VARCHAR(n) casts truncate silently; TEXT lets the column itself refuse a long value.
    return "TEXT" if sql_type.startswith("VARCHAR") else sql_type


def tuples(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[tuple[Any, ...]]:
    """Each row's values for `keys`, in that order (itemgetter: no Python loop per value)."""
    get = itemgetter(*keys)
    if len(keys) == 1:
        return [(get(r),) for r in rows]
    return [get(r) for r in rows]


def mogrify_rows(conn: Connection, template: str, rows: Sequence[Sequence[Any]]) -> str:
    """`template` filled with each row by psycopg2, joined by commas (a VALUES list)."""
    cursor = conn.connection.cursor()
    try:
        return values_list(cursor, template, rows).decode()
    finally:
        cursor.close()


def values_list(cursor: Any, template: str | None, rows: Sequence[Sequence[Any]]) -> bytes:
    """`mogrify_rows` on a psycopg2 cursor (an asynchronous connection's too); `template`
    defaults to one %s per value."""
    shared, rest = hoist_shared(cursor, template, rows)
    return b",".join([cursor.mogrify(shared, row) for row in rest])


# Types whose equal values psycopg2 quotes alike, given the same type (True == 1 and 0.0 ==
# -0.0 are quoted differently; floats are left out).
_ALIKE_TYPES = frozenset({str, int, bool})


def _alike(column: tuple[Any, ...]) -> bool:
    """Equal values of one type that psycopg2 quotes to the same literal: str, int, bool, or
    datetimes with the same tzinfo object (equal aware times in other zones quote apart)."""
    first = column[0]
    kind = type(first)
    if column.count(first) != len(column) or len(set(map(type, column))) != 1:
        return False
    if kind in _ALIKE_TYPES:
        return True
    if kind is datetime:
        return len({id(v.tzinfo) for v in column}) == 1
    return False


def hoist_shared(cursor: Any, template: str | None,
                 rows: Sequence[Sequence[Any]]) -> tuple[bytes, Sequence[Sequence[Any]]]:
    """`template` (default: one %s per value) with the values every row shares quoted into it
    once, and the rows without them. Shared means the same object in every row (a batch's
    clock reading, partner, state, None), or equal values that psycopg2 quotes alike (see
    `_alike`: the same status read from each row, a batch's received_at): psycopg2 then quotes
    it once, not once per row, and the statement is the same. `template` may hold no other %
    than its %s."""
    width = len(rows[0]) if rows else 0
    text = template if template is not None else "(" + ",".join(["%s"] * width) + ")"
    encoding = encodings[cursor.connection.encoding]
    pieces = text.encode(encoding).split(b"%s")
    if len(rows) < 2 or len(pieces) != width + 1 or any(b"%" in p for p in pieces):
        return b"%s".join(pieces), rows
    first = rows[0]
    same = {i for i, column in enumerate(zip(*rows, strict=True))
            if len(set(map(id, column))) == 1 or _alike(column)}
    same.discard(0)  # keep one value per row to fill
    if not same:
        return b"%s".join(pieces), rows
    out = [pieces[0]]
    for i in range(width):
        out.append(cursor.mogrify("%s", (first[i],)).replace(b"%", b"%%") if i in same
                   else b"%s")
        out.append(pieces[i + 1])
    keep = itemgetter(*[i for i in range(width) if i not in same])
    if len(same) == width - 1:
        return b"".join(out), [(keep(r),) for r in rows]
    return b"".join(out), [keep(r) for r in rows]


def execute_values(conn: Connection, sql: str, rows: list[tuple[Any, ...]],
                    template: str | None = None, fetch: bool = False) -> list[Any]:
    """psycopg2's execute_values on the connection's current transaction, one page at a time
    with the values the page's rows share quoted once (`hoist_shared`)."""
    cursor = conn.connection.cursor()
    try:
        out: list[Any] = []
        for page in chunks(rows, PAGE):
            shared, rest = hoist_shared(cursor, template, page)
            out.extend(pg_execute_values(cursor, sql, rest, template=shared, page_size=PAGE,
                                      fetch=fetch) or [])
        return out
    finally:
        cursor.close()
