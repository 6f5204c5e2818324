"""partner request bodies and headers, signing scheme, egress proxy, pause source; offer
inbound rules (advertiser networks, click-to-conversion time, daily caps)

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-02 01:00:00
"""
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PARTNER_COLUMNS = (
    ('body_format', sa.String(length=10)),
    ('body_template', sa.Text()),
    ('custom_headers', sa.Text()),
    ('signature_scheme', sa.String(length=20)),
    ('egress_proxy', sa.Text()),
    ('paused_by', sa.String(length=20)),
)
_OFFER_COLUMNS: tuple[tuple[str, Any], ...] = (
    ('allowed_ips', sa.Text()),
    ('min_click_seconds', sa.Integer()),
    ('max_click_seconds', sa.Integer()),
    ('daily_cap', sa.Integer()),
    ('daily_payout_cap', sa.Float()),
    ('affiliate_daily_cap', sa.Integer()),
    ('affiliate_daily_payout_cap', sa.Float()),
)


def upgrade() -> None:
    with op.batch_alter_table('partners', schema=None) as batch_op:
        for name, type_ in _PARTNER_COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
    with op.batch_alter_table('offers', schema=None) as batch_op:
        for name, type_ in _OFFER_COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
    with op.batch_alter_table('conversions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_ip', sa.String(length=45), nullable=True))
    with op.batch_alter_table('postbacks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('body', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('conversions', schema=None) as batch_op:
        batch_op.drop_column('source_ip')
    with op.batch_alter_table('offers', schema=None) as batch_op:
        for name, _ in reversed(_OFFER_COLUMNS):
            batch_op.drop_column(name)
    with op.batch_alter_table('postbacks', schema=None) as batch_op:
        batch_op.drop_column('body')
    with op.batch_alter_table('partners', schema=None) as batch_op:
        for name, _ in reversed(_PARTNER_COLUMNS):
            batch_op.drop_column(name)
