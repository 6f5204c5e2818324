"""Rollups: per-hour and per-minute counts kept exact by PostgreSQL triggers.

Every figure of metrics, reports, alerts and the dashboard can be computed from raw rows
(store/figures.py, what SQLite does) or, on PostgreSQL, from these rollups, whose size grows
with time and partners but not with traffic.

How they stay exact: statement-level AFTER triggers with transition tables on conversions,
postbacks, attempts, dead_letters and conversion_events (and, for conversions inserted in a
state a rollup counts, a row trigger: ROW_INSERTS) append one *delta* row per key
touched by the statement (+n for new rows, -n for old rows), in the same transaction as the
write. Inserting deltas
never updates a shared row, so writers never wait on each other nor deadlock. `compact()`
(beat, a few times a minute) folds committed deltas into one compacted row per key; readers
sum both, so a figure reads the same before and after a compaction. Retention deletes fire
the same triggers, so purged rows leave the rollups too.

Rollups count every row, test fires included; readers subtract what belongs to test-fire
postbacks (few, found by a partial index), so figures leave test fires out exactly as the raw
figures do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, text

from postback_worker.store.sql import StoreBase

# name -> (key columns, time column or None, contribution SELECT over a transition table
# aliased `r`, with `:sign` for +1/-1). Contributions to rollups keyed by a postback's
# creation hour join the postback.
HOUR = "date_trunc('hour', {col}, 'UTC')"
MINUTE = "date_trunc('minute', {col}, 'UTC')"


# Histogram bounds of the two /metrics histograms (seconds): their rollups count each value
# under the smallest bound it does not exceed (infinity above the last), exactly.
DURATION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
                  86400.0)


def bound_sql(micros: str, bounds: tuple[float, ...]) -> str:
    """The bound a value in whole microseconds falls under (Python twin: figures.bound_of)."""
    whens = " ".join(f"WHEN {micros} <= {round(b * 1_000_000)} THEN {b!r}::float8"
                     for b in bounds)
    return f"CASE {whens} ELSE 'Infinity'::float8 END"


DEAD_HOUR_KEYS = ("hour", "partner_id", "offer_id", "failure_class", "last_status")
DEAD_HOUR_COLUMNS = (f"{HOUR.format(col='d.created_at')}, d.partner_id, coalesce(d.offer_id, ''), "
                     "d.failure_class, coalesce(d.last_status, -1)")
ATTEMPT_MICROS = "round(r.duration_ms * 1000)::bigint"
LATENCY_MICROS = "(extract(epoch FROM r.delivered_at - r.received_at) * 1000000)::bigint"


@dataclass(frozen=True)
class Rollup:
    table: str
    keys: tuple[str, ...]
    source: str  # the table whose triggers feed it
    select: str  # columns: keys..., values...  FROM {rel} r ...
    values: tuple[str, ...] = ("n",)
    # The statements that feed it: rollups over columns never updated skip UPDATEs.
    ops: tuple[str, ...] = ("INSERT", "UPDATE", "DELETE")


CONVERSIONS_SELECT = (f"SELECT {HOUR.format(col='r.received_at')}, coalesce(r.offer_id, ''), "
                      "r.state, {sign} FROM {rel} r")

ROLLUPS: tuple[Rollup, ...] = (
    Rollup("rollup_postbacks", ("hour", "partner_id", "bucket", "last_class"), "postbacks",
           f"SELECT {HOUR.format(col='r.created_at')}, r.partner_id, 'postbacks', '', {{sign}} "
           "FROM {rel} r "
           f"UNION ALL SELECT {HOUR.format(col='r.created_at')}, r.partner_id, "
           "CASE r.state WHEN 'dead_lettered' THEN 'failed' ELSE r.state END, "
           "CASE WHEN r.state = 'dead_lettered' THEN coalesce(nullif(r.last_class, ''), "
           "'config') ELSE '' END, {sign} FROM {rel} r "
           "WHERE r.state IN ('delivered', 'dead_lettered', 'skipped')"),
    Rollup("rollup_dead_letters", ("partner_id", "failure_class"), "postbacks",
           "SELECT d.partner_id, d.failure_class, {sign} FROM {rel} r "
           "JOIN dead_letters d ON d.postback_id = r.id WHERE r.state = 'dead_lettered'"),
    Rollup("rollup_dead_letters", ("partner_id", "failure_class"), "dead_letters",
           "SELECT r.partner_id, r.failure_class, {sign} FROM {rel} r "
           "JOIN postbacks p ON p.id = r.postback_id WHERE p.state = 'dead_lettered'"),
    # Dead letters still waiting, by the hour they were written and every `dlq list` filter
    # (the total of a filtered list without counting rows).
    Rollup("rollup_dead_letter_hours", DEAD_HOUR_KEYS, "postbacks",
           f"SELECT {DEAD_HOUR_COLUMNS}, {{sign}} FROM {{rel}} r "
           "JOIN dead_letters d ON d.postback_id = r.id WHERE r.state = 'dead_lettered'"),
    Rollup("rollup_dead_letter_hours", DEAD_HOUR_KEYS, "dead_letters",
           f"SELECT {DEAD_HOUR_COLUMNS.replace('d.', 'r.')}, {{sign}} FROM {{rel}} r "
           "JOIN postbacks p ON p.id = r.postback_id WHERE p.state = 'dead_lettered'"),
    Rollup("rollup_attempts", ("hour", "partner_id", "status_code", "failure_class"),
           "attempts",
           f"SELECT {HOUR.format(col='r.pb_created_at')}, r.pb_partner_id, "
           "coalesce(r.status_code, -1), r.failure_class, {sign} FROM {rel} r"),
    Rollup("rollup_durations", ("hour", "partner_id", "bucket_ms"), "attempts",
           f"SELECT {HOUR.format(col='r.pb_created_at')}, r.pb_partner_id, "
           "pbw_duration_bucket(r.duration_ms), {sign} FROM {rel} r"),
    Rollup("rollup_attempt_minutes", ("minute", "partner_id", "status_code", "failure_class"),
           "attempts",
           f"SELECT {MINUTE.format(col='r.started_at')}, r.pb_partner_id, "
           "coalesce(r.status_code, -1), r.failure_class, {sign} FROM {rel} r"),
    Rollup("rollup_attempt_durations", ("minute", "partner_id", "bound"), "attempts",
           f"SELECT {MINUTE.format(col='r.started_at')}, r.pb_partner_id, "
           f"{bound_sql(ATTEMPT_MICROS, DURATION_BOUNDS)}, {{sign}}, "
           f"{{sign}} * {ATTEMPT_MICROS} FROM {{rel}} r", ("n", "total_us")),
    Rollup("rollup_latencies", ("minute", "partner_id", "bound"), "postbacks",
           f"SELECT {MINUTE.format(col='r.delivered_at')}, r.partner_id, "
           f"{bound_sql(LATENCY_MICROS, LATENCY_BOUNDS)}, {{sign}}, "
           f"{{sign}} * {LATENCY_MICROS} FROM {{rel}} r "
           "WHERE r.state = 'delivered' AND r.delivered_at IS NOT NULL", ("n", "total_us")),
    # Conversions once taken from the journal: accepted events waiting for intake
    # (`received`) are counted from rows (few, by an index), so a producer's one-event
    # INSERT adds no delta row to write and to compact.
    Rollup("rollup_conversions", ("hour", "offer_id", "state"), "conversions",
           CONVERSIONS_SELECT + " WHERE r.state <> 'received'"),
    # Lifecycle: postbacks per event they carry (set once, at insert), and conversion events
    # (never updated) by kind and status change.
    Rollup("rollup_postback_events", ("hour", "partner_id", "event"), "postbacks",
           f"SELECT {HOUR.format(col='r.created_at')}, r.partner_id, r.event, {{sign}} "
           "FROM {rel} r WHERE r.event IS NOT NULL", ops=("INSERT", "DELETE")),
    Rollup("rollup_conversion_events", ("hour", "kind", "status", "previous_status"),
           "conversion_events",
           f"SELECT {HOUR.format(col='r.recorded_at')}, r.kind, r.status, "
           "coalesce(r.previous_status, ''), {sign} FROM {rel} r WHERE r.kind <> 'created'",
           ops=("INSERT", "DELETE")),
)
SOURCES = ("conversions", "postbacks", "attempts", "dead_letters", "conversion_events")
# Sources whose INSERTs feed rollups per row, only for rows matching the condition: most
# conversions are inserted `received` (the journal), which no rollup counts, and a row
# trigger whose WHEN is false costs nothing, where a statement trigger runs for every INSERT
# (about 0.1 ms of a producer's one-event call).
ROW_INSERTS: dict[str, str] = {"conversions": "NEW.state <> 'received'"}
# What a source's rollups read as `{rel}`: attempts with their postback's partner and creation
# time, joined once per statement (a trigger materializes it, then feeds every rollup).
VIEWS = {
    "attempts": ("SELECT a.*, p.partner_id AS pb_partner_id, p.created_at AS pb_created_at "
                 "FROM {rel} a JOIN postbacks p ON p.id = a.postback_id"),
}


def _rel(source: str, rel: str) -> str:
    """`rel` (a table, transition table or CTE) as the source's rollups read it."""
    return f"({VIEWS[source].format(rel=rel)})" if source in VIEWS else rel
TABLES = tuple(dict.fromkeys(r.table for r in ROLLUPS))

# Upper bound of a duration's histogram bucket: the value rounded up to two significant
# digits (123.4 ms -> 130, 0.734 -> 0.74), in float arithmetic that PostgreSQL inlines and that
# Python repeats operation for operation (store/figures.py duration_bucket).
BUCKET_FUNCTION = """
CREATE OR REPLACE FUNCTION pbw_duration_bucket(ms double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN ms IS NULL OR ms <= 0 THEN 0::float8
    WHEN floor(log(ms)) >= 1
      THEN ceil(ms / 10::float8 ^ (floor(log(ms)) - 1) - 1e-9)
           * 10::float8 ^ (floor(log(ms)) - 1)
    ELSE ceil(ms * 10::float8 ^ (1 - floor(log(ms))) - 1e-9)
         / 10::float8 ^ (1 - floor(log(ms)))
  END
$$
"""


def _delta_sql(rollup: Rollup, op: str, new: str = "new_rows", old: str = "old_rows") -> str:
    keys = ", ".join(rollup.keys)
    values = ", ".join(rollup.values)
    sums = ", ".join(f"sum({v})" for v in rollup.values)
    nonzero = " OR ".join(f"sum({v}) <> 0" for v in rollup.values)
    parts = []
    if op in ("INSERT", "UPDATE"):
        parts.append(rollup.select.format(rel=new, sign="1"))
    if op in ("DELETE", "UPDATE"):
        parts.append(rollup.select.format(rel=old, sign="-1"))
    union = " UNION ALL ".join(f"({p})" for p in parts)
    return (f"INSERT INTO {rollup.table} ({keys}, {values}, compacted) "
            f"SELECT {keys}, {sums}, false FROM ({union}) AS d({keys}, {values}) "
            f"GROUP BY {keys} HAVING {nonzero};")


# Postback updates that touch no final state (claims, leases, sweeps, releases) change no
# rollup: the trigger returns at once for them (the hot path's most frequent statements).
FINAL_STATES = "('delivered', 'dead_lettered', 'skipped')"
SHORTCUTS = {
    "postbacks": ("IF TG_OP = 'UPDATE' THEN\n    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE "
                  f"state IN {FINAL_STATES}) AND NOT EXISTS (SELECT 1 FROM old_rows WHERE state "
                  f"IN {FINAL_STATES}) THEN\n      RETURN NULL;\n    END IF;\n  END IF;"),
}


def _one_statement(source: str, op: str, fed: Sequence[Rollup]) -> str:
    """Every rollup of a source with a view in one statement: the view (a join) is computed
    once per transition table, and each rollup's INSERT is a data-modifying CTE over it."""
    ctes = []
    if op in ("INSERT", "UPDATE"):
        ctes.append(f"v_new AS MATERIALIZED ({VIEWS[source].format(rel='new_rows')})")
    if op in ("DELETE", "UPDATE"):
        ctes.append(f"v_old AS MATERIALIZED ({VIEWS[source].format(rel='old_rows')})")
    inserts = [_delta_sql(r, op, "v_new", "v_old").rstrip(";") for r in fed]
    ctes += [f"d{i} AS ({sql})" for i, sql in enumerate(inserts[:-1])]
    return "WITH " + ",\n      ".join(ctes) + "\n    " + inserts[-1] + ";"


def _function_sql(source: str, chosen: Sequence[Rollup] = ROLLUPS,
                  row_inserts: Mapping[str, str] = ROW_INSERTS) -> str:
    branches = [SHORTCUTS[source]] if source in SHORTCUTS else []
    for op in ("INSERT", "UPDATE", "DELETE"):
        fed = [r for r in chosen if r.source == source and op in r.ops]
        if not fed or (op == "INSERT" and source in row_inserts):
            continue
        if source in VIEWS:
            body = _one_statement(source, op, fed)
        else:
            body = "\n    ".join(_delta_sql(r, op) for r in fed)
        branches.append(f"IF TG_OP = '{op}' THEN\n    {body}\n  END IF;")
    return (f"CREATE OR REPLACE FUNCTION pbw_rollup_{source}() RETURNS trigger "
            "LANGUAGE plpgsql AS $$\nBEGIN\n  " + "\n  ".join(branches)
            + "\n  RETURN NULL;\nEND\n$$")


def _row_function_sql(source: str, chosen: Sequence[Rollup]) -> str:
    """The INSERT deltas of one row (a ROW_INSERTS source), from the row itself."""
    body = "\n  ".join(_delta_sql(r, "INSERT", new="(SELECT NEW.*)")
                       for r in chosen if r.source == source and "INSERT" in r.ops)
    return (f"CREATE OR REPLACE FUNCTION pbw_rollup_{source}_row() RETURNS trigger "
            f"LANGUAGE plpgsql AS $$\nBEGIN\n  {body}\n  RETURN NULL;\nEND\n$$")


def _trigger_sql(source: str, chosen: Sequence[Rollup] = ROLLUPS,
                 row_inserts: Mapping[str, str] = ROW_INSERTS) -> list[str]:
    out = []
    fed = {op for r in chosen if r.source == source for op in r.ops}
    for op, ref in (("INSERT", "NEW TABLE AS new_rows"),
                    ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
                    ("DELETE", "OLD TABLE AS old_rows")):
        name = f"pbw_rollup_{source}_{op.lower()}"
        out.append(f"DROP TRIGGER IF EXISTS {name} ON {source}")
        if op not in fed:
            continue
        if op == "INSERT" and source in row_inserts:
            out.append(_row_function_sql(source, chosen))
            out.append(f"CREATE TRIGGER {name} AFTER INSERT ON {source} FOR EACH ROW "
                       f"WHEN ({row_inserts[source]}) EXECUTE FUNCTION pbw_rollup_{source}_row()")
            continue
        out.append(f"CREATE TRIGGER {name} AFTER {op} ON {source} REFERENCING {ref} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION pbw_rollup_{source}()")
    if source not in row_inserts or "INSERT" not in fed:
        out.append(f"DROP FUNCTION IF EXISTS pbw_rollup_{source}_row()")
    return out


def install_statements(without: Sequence[str] = (), rollups: Sequence[Rollup] = ROLLUPS,
                       row_inserts: Mapping[str, str] = ROW_INSERTS) -> list[str]:
    """DDL that creates the functions and triggers (PostgreSQL); `without`: rollup tables
    left out (a downgrade to before they existed); `rollups`, `row_inserts`: the definitions
    (a downgrade to older ones)."""
    chosen = [r for r in rollups if r.table not in without]
    stmts = [BUCKET_FUNCTION]
    for source in SOURCES:
        if any(r.source == source for r in chosen):
            stmts.append(_function_sql(source, chosen, row_inserts))
        else:
            stmts.append(f"DROP FUNCTION IF EXISTS pbw_rollup_{source}() CASCADE")
        stmts.extend(_trigger_sql(source, chosen, row_inserts))
    return stmts


def uninstall_statements() -> list[str]:
    stmts = []
    for source in SOURCES:
        for op in ("insert", "update", "delete"):
            stmts.append(f"DROP TRIGGER IF EXISTS pbw_rollup_{source}_{op} ON {source}")
        stmts.append(f"DROP FUNCTION IF EXISTS pbw_rollup_{source}()")
        stmts.append(f"DROP FUNCTION IF EXISTS pbw_rollup_{source}_row()")
    stmts.append("DROP FUNCTION IF EXISTS pbw_duration_bucket(double precision)")
    return stmts


# Hourly rollups with a day table (`<name>_days`, kept by `compact`).
DAYS = ("rollup_postbacks", "rollup_attempts", "rollup_durations", "rollup_conversions",
        "rollup_dead_letter_hours", "rollup_postback_events", "rollup_conversion_events")
# Fed from both sides of the dead_letters-postbacks join: the backfill counts each pair once.
DEAD_LETTER_ROLLUPS = ("rollup_dead_letters", "rollup_dead_letter_hours")


def days_statements(tables: Sequence[str]) -> list[str]:
    """Rebuild the day tables of these hourly rollups from their rows (all compacted)."""
    stmts = []
    for table in tables:
        if table not in DAYS:
            continue
        rollup = next(r for r in ROLLUPS if r.table == table)
        other = ", ".join(rollup.keys[1:])
        stmts += [f"DELETE FROM {table}_days",
                  f"INSERT INTO {table}_days (day, {other}, n) SELECT date_trunc('day', hour, "
                  f"'UTC'), {other}, sum(n) FROM {table} WHERE compacted GROUP BY 1, {other}"]
    return stmts


def backfill_statements(tables: Sequence[str] = TABLES, *, days: bool = True) -> list[str]:
    """Rebuild these rollups (and their day tables) from the raw rows (after the tables were
    locked against writes)."""
    stmts = [f"DELETE FROM {t}" for t in tables]
    for r in ROLLUPS:
        if r.table not in tables:
            continue
        if r.table in DEAD_LETTER_ROLLUPS and r.source == "postbacks":
            continue  # the dead_letters side counts each (dead letter, dead postback) once
        keys, values = ", ".join(r.keys), ", ".join(r.values)
        sums = ", ".join(f"sum({v})" for v in r.values)
        select = r.select.format(rel=_rel(r.source, r.source), sign="1")
        stmts.append(f"INSERT INTO {r.table} ({keys}, {values}, compacted) SELECT {keys}, "
                     f"{sums}, true FROM ({select}) AS d({keys}, {values}) GROUP BY {keys}")
    return stmts + (days_statements(tables) if days else [])


def install(conn: Connection, *, backfill: bool, tables: Sequence[str] = TABLES,
            without: Sequence[str] = (), days: bool = True) -> None:
    """Install the triggers (PostgreSQL only); with `backfill`, count what is already there
    into `tables` (default: every rollup) and, with `days`, their day tables. `without`:
    rollups a migration before them skips."""
    if conn.dialect.name != "postgresql":
        return
    chosen = [r for r in ROLLUPS if r.table not in without]
    if backfill:
        sources = sorted({r.source for r in chosen})
        conn.execute(text("LOCK TABLE " + ", ".join(sources) + " IN SHARE MODE"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": COMPACT_LOCK})
    for stmt in install_statements(without):
        conn.execute(text(stmt))
    if backfill:
        for stmt in backfill_statements([t for t in tables if t not in without], days=days):
            conn.execute(text(stmt))


COMPACT_LOCK = 0x70627772  # "pbwr"


def compact(conn: Connection, tables: Sequence[str] = TABLES) -> int:
    """Fold committed deltas into one compacted row per key; returns how many were folded.

    PostgreSQL only (a no-op elsewhere). Concurrent calls take turns on an advisory lock.
    """
    if conn.dialect.name != "postgresql":
        return 0
    if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"),
                        {"k": COMPACT_LOCK}).scalar():
        return 0
    folded = 0
    for table in tables:
        rollup = next(r for r in ROLLUPS if r.table == table)
        keys, values = ", ".join(rollup.keys), ", ".join(rollup.values)
        sums = ", ".join(f"sum({v})" for v in rollup.values)
        add = ", ".join(f"{v} = t.{v} + excluded.{v}" for v in rollup.values)
        days = ""
        if table in DAYS:  # the same deltas into the day table, in the same statement
            day_keys = ", ".join(("day", *rollup.keys[1:]))
            other = ", ".join(rollup.keys[1:])
            days = (f" days AS (INSERT INTO {table}_days AS t ({day_keys}, n) "
                    f"SELECT date_trunc('day', hour, 'UTC'), {other}, sum(n) FROM gone "
                    f"GROUP BY 1, {other} ON CONFLICT ({day_keys}) DO UPDATE SET "
                    "n = t.n + excluded.n RETURNING 1),")
        res = conn.execute(text(
            f"WITH gone AS (DELETE FROM {table} WHERE NOT compacted RETURNING {keys}, {values}),"
            f"{days} merged AS (INSERT INTO {table} AS t ({keys}, {values}, compacted) "
            f"SELECT {keys}, {sums}, true FROM gone GROUP BY {keys} "
            f"ON CONFLICT ({keys}) WHERE compacted DO UPDATE SET {add} "
            "RETURNING 1) SELECT (SELECT count(*) FROM gone)"))
        folded += int(res.scalar() or 0)
    return folded


def compact_all(store: StoreBase) -> int:
    """One compaction in its own transaction (beat task compact-rollups)."""
    with store.engine.begin() as conn:
        return compact(conn)
