"""journal row trigger: conversions feed their rollup on INSERT through a row trigger that
fires only for rows not `received`, so a producer's one-event INSERT runs no trigger

Revision ID: 0014
Revises: 0013
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from postback_worker.store import rollups

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _reinstall(row_inserts: dict[str, str]) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # No conversion is written while the triggers change (the figures stay exact).
    bind.execute(sa.text("LOCK TABLE conversions IN SHARE MODE"))
    for stmt in rollups.install_statements(row_inserts=row_inserts):
        bind.execute(sa.text(stmt))


def upgrade() -> None:
    _reinstall(rollups.ROW_INSERTS)


def downgrade() -> None:
    _reinstall({})
