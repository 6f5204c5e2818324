"""trace context: the W3C traceparent of the request that accepted a conversion event

Stored on the event's conversion row and copied to the postbacks it creates, so intake,
every attempt (a retry hours later too) and its recording join the conversion's trace.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 04:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ('conversions', 'postbacks'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('trace_context', sa.String(length=64), nullable=True))


def downgrade() -> None:
    for table in ('postbacks', 'conversions'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('trace_context')
