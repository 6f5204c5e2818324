"""operator events: the outbox and its webhook deliveries

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 04:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import postback_worker.store.schema

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = postback_worker.store.schema.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'operator_events',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('type', sa.String(length=40), nullable=False),
        sa.Column('partner_id', sa.String(length=64), nullable=True),
        sa.Column('occurred_at', UTC, nullable=False),
        sa.Column('data', sa.Text(), nullable=False),
        sa.Column('delivery_id', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_operator_events')),
    )
    op.create_index(op.f('ix_operator_events_occurred_at'), 'operator_events',
                    ['occurred_at'], unique=False)
    op.create_index(op.f('ix_operator_events_delivery_id'), 'operator_events',
                    ['delivery_id'], unique=False)
    op.create_table(
        'operator_deliveries',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('type', sa.String(length=40), nullable=False),
        sa.Column('partner_id', sa.String(length=64), nullable=True),
        sa.Column('state', sa.String(length=10), nullable=False),
        sa.Column('payload', sa.Text(), nullable=False),
        sa.Column('event_count', sa.Integer(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', UTC, nullable=True),
        sa.Column('last_status', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', UTC, nullable=False),
        sa.Column('finished_at', UTC, nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_operator_deliveries')),
    )
    op.create_index(op.f('ix_operator_deliveries_state_next_attempt_at'),
                    'operator_deliveries', ['state', 'next_attempt_at'], unique=False)
    op.create_index(op.f('ix_operator_deliveries_created_at'), 'operator_deliveries',
                    ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_table('operator_deliveries')
    op.drop_table('operator_events')
