"""rollups at scale: lifecycle and dead-letter rollups, one join per attempt statement,
indexes for retention and keyset pages

Revision ID: 0011
Revises: 0010
"""
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from postback_worker.store import rollups
from postback_worker.store.schema import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES: dict[str, list[tuple[str, sa.types.TypeEngine[Any]]]] = {
    "rollup_dead_letter_hours": [("partner_id", sa.String(64)), ("offer_id", sa.String(64)),
                                 ("failure_class", sa.String(20)),
                                 ("last_status", sa.Integer())],
    "rollup_postback_events": [("partner_id", sa.String(64)), ("event", sa.String(20))],
    "rollup_conversion_events": [("kind", sa.String(20)), ("status", sa.String(32)),
                                 ("previous_status", sa.String(32))],
}
# Retention of conversion events by time; dead-letter pages by (filter, time, id).
INDEXES = {
    "ix_conversion_events_recorded_at": ("conversion_events", ["recorded_at"]),
    "ix_dead_letters_partner_id_failure_class_created_at_postback_id": (
        "dead_letters", ["partner_id", "failure_class", "created_at", "postback_id"]),
}


# Hourly rollups of 0005 that get a day table too.
HOURLY_0005: dict[str, list[tuple[str, sa.types.TypeEngine[Any]]]] = {
    "rollup_postbacks": [("partner_id", sa.String(64)), ("bucket", sa.String(20)),
                         ("last_class", sa.String(20))],
    "rollup_attempts": [("partner_id", sa.String(64)), ("status_code", sa.Integer()),
                        ("failure_class", sa.String(20))],
    "rollup_durations": [("partner_id", sa.String(64)), ("bucket_ms", sa.Float())],
    "rollup_conversions": [("offer_id", sa.String(64)), ("state", sa.String(32))],
}


def upgrade() -> None:
    for name, cols in TABLES.items():
        columns: list[sa.Column[Any]] = [
            sa.Column("hour", UTCDateTime(timezone=True), nullable=False),
            *[sa.Column(c, typ, nullable=False) for c, typ in cols],
            sa.Column("n", sa.BigInteger(), nullable=False),
            sa.Column("compacted", sa.Boolean(), nullable=False)]
        op.create_table(name, *columns)
        op.create_index(f"uq_{name}_key", name, ["hour"] + [c for c, _ in cols], unique=True,
                        postgresql_where=sa.text("compacted"), sqlite_where=sa.text("compacted"))
        op.create_index(f"ix_{name}_hour", name, ["hour"])
    for name, cols in {**HOURLY_0005, **TABLES}.items():
        op.create_index(f"ix_{name}_deltas", name, ["hour"],
                        postgresql_where=sa.text("NOT compacted"),
                        sqlite_where=sa.text("NOT compacted"))
        op.create_table(f"{name}_days",
                        sa.Column("day", UTCDateTime(timezone=True), nullable=False),
                        *[sa.Column(c, typ, nullable=False) for c, typ in cols],
                        sa.Column("n", sa.BigInteger(), nullable=False))
        op.create_index(f"uq_{name}_days_key", f"{name}_days", ["day"] + [c for c, _ in cols],
                        unique=True)
    for index, (table, indexed) in INDEXES.items():
        op.create_index(index, table, indexed)
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        rollups.install(bind, backfill=True, tables=tuple(TABLES))  # and all day tables
        for stmt in rollups.days_statements(tuple(HOURLY_0005)):
            bind.execute(sa.text(stmt))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for stmt in rollups.uninstall_statements():
            bind.execute(sa.text(stmt))
        for stmt in rollups.install_statements(without=tuple(TABLES), row_inserts={}):
            bind.execute(sa.text(stmt))
    for index, (table, _) in INDEXES.items():
        op.drop_index(index, table_name=table)
    for name in {**HOURLY_0005, **TABLES}:
        op.drop_table(f"{name}_days")
        op.drop_index(f"ix_{name}_deltas", table_name=name)
    for name in TABLES:
        op.drop_table(name)
