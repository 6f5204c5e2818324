"""journal outside rollups: conversions waiting for intake (`received`) leave the
conversions rollup and are counted from rows, so a producer's one-event INSERT writes no
delta row

Revision ID: 0013
Revises: 0012
"""
from collections.abc import Sequence
from dataclasses import replace

import sqlalchemy as sa
from alembic import op

from postback_worker.store import rollups

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("rollup_conversions", "rollup_conversions_days")


def _lock(bind: sa.Connection) -> None:
    # No conversion is written (and no compaction runs) while the definition changes.
    bind.execute(sa.text("LOCK TABLE conversions IN SHARE MODE"))
    bind.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": rollups.COMPACT_LOCK})


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    _lock(bind)
    for stmt in rollups.install_statements():
        bind.execute(sa.text(stmt))
    # What `received` rows contributed (+1 in, -1 out) nets to the waiting ones: those are
    # counted from rows now.
    for table in TABLES:
        bind.execute(sa.text(f"DELETE FROM {table} WHERE state = 'received'"))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    _lock(bind)
    before = [replace(r, select=rollups.CONVERSIONS_SELECT) if r.table == TABLES[0] else r
              for r in rollups.ROLLUPS]
    for stmt in rollups.install_statements(rollups=before, row_inserts={}):
        bind.execute(sa.text(stmt))
    bind.execute(sa.text(
        f"INSERT INTO {TABLES[0]} (hour, offer_id, state, n, compacted) "
        "SELECT date_trunc('hour', received_at, 'UTC'), coalesce(offer_id, ''), state, "
        "count(*), false FROM conversions WHERE state = 'received' GROUP BY 1, 2, 3"))
