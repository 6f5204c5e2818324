"""conversion lifecycle: events, per-event postbacks, partner and offer options

Revision ID: 0009
Revises: 0003
Create Date: 2026-12-02 01:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import postback_worker.store.schema

revision: str = '0009'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = postback_worker.store.schema.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'conversion_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  autoincrement=True, nullable=False),
        sa.Column('conversion_id', sa.String(length=64), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('event_id', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('status', sa.String(length=32), nullable=False),
        sa.Column('previous_status', sa.String(length=32), nullable=True),
        sa.Column('payout', sa.String(length=40), nullable=True),
        sa.Column('sale_amount', sa.String(length=40), nullable=True),
        sa.Column('currency', sa.String(length=3), nullable=True),
        sa.Column('summary', sa.Text(), nullable=False),
        sa.Column('occurred_at', UTC, nullable=False),
        sa.Column('received_at', UTC, nullable=False),
        sa.Column('recorded_at', UTC, nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_conversion_events')),
        sa.UniqueConstraint('conversion_id', 'seq',
                            name=op.f('uq_conversion_events_conversion_id_seq')),
        sa.UniqueConstraint('event_id', name=op.f('uq_conversion_events_event_id')),
    )
    with op.batch_alter_table('conversion_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversion_events_kind_recorded_at'),
                              ['kind', 'recorded_at'], unique=False)

    with op.batch_alter_table('conversions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('update_of', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_conversions_update_of'), ['update_of'],
                              unique=False)

    with op.batch_alter_table('offers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('duplicate_mode', sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column('hold_hours', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('payout_rules', sa.Text(), nullable=True))

    with op.batch_alter_table('partners', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fire_events', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('templates', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('status_map', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('payout_rule', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('hold_hours', sa.Float(), nullable=True))

    # One postback per (conversion, partner, event) instead of per (conversion, partner).
    with op.batch_alter_table('postbacks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('event_seq', sa.Integer(), server_default='1',
                                      nullable=False))
        batch_op.add_column(sa.Column('event', sa.String(length=20), nullable=True))
        batch_op.drop_constraint('uq_postbacks_conversion_id_partner_id', type_='unique')
        batch_op.create_unique_constraint(
            batch_op.f('uq_postbacks_conversion_id_partner_id_event_seq'),
            ['conversion_id', 'partner_id', 'event_seq'])


def downgrade() -> None:
    with op.batch_alter_table('postbacks', schema=None) as batch_op:
        batch_op.drop_constraint('uq_postbacks_conversion_id_partner_id_event_seq',
                                 type_='unique')
        batch_op.create_unique_constraint('uq_postbacks_conversion_id_partner_id',
                                          ['conversion_id', 'partner_id'])
        batch_op.drop_column('event')
        batch_op.drop_column('event_seq')

    with op.batch_alter_table('partners', schema=None) as batch_op:
        for name in ('hold_hours', 'payout_rule', 'status_map', 'templates', 'fire_events'):
            batch_op.drop_column(name)

    with op.batch_alter_table('offers', schema=None) as batch_op:
        for name in ('payout_rules', 'hold_hours', 'duplicate_mode'):
            batch_op.drop_column(name)

    with op.batch_alter_table('conversions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversions_update_of'))
        batch_op.drop_column('update_of')

    with op.batch_alter_table('conversion_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversion_events_kind_recorded_at'))
    op.drop_table('conversion_events')
