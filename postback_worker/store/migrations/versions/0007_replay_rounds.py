"""replay rounds: attempts made before the current round

A replay gives a dead-lettered postback a new round of its retry policy's attempts; the
policy counts the attempts since `round_start_attempts`, while attempt numbers go on.

Revision ID: 0007
Revises: 0003
Create Date: 2026-12-02 01:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('postbacks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('round_start_attempts', sa.Integer(), nullable=False,
                                      server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('postbacks', schema=None) as batch_op:
        batch_op.drop_column('round_start_attempts')
