"""rollups kept by triggers, and indexes for figures that must not scan history

Revision ID: 0005
Revises: 0003
"""
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from postback_worker.store import rollups
from postback_worker.store.schema import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES: dict[str, tuple[str | None, list[tuple[str, sa.types.TypeEngine]]]] = {
    "rollup_postbacks": ("hour", [("partner_id", sa.String(64)), ("bucket", sa.String(20)),
                                  ("last_class", sa.String(20))]),
    "rollup_attempts": ("hour", [("partner_id", sa.String(64)), ("status_code", sa.Integer()),
                                 ("failure_class", sa.String(20))]),
    "rollup_durations": ("hour", [("partner_id", sa.String(64)), ("bucket_ms", sa.Float())]),
    "rollup_attempt_minutes": ("minute", [("partner_id", sa.String(64)),
                                          ("status_code", sa.Integer()),
                                          ("failure_class", sa.String(20))]),
    "rollup_attempt_durations": ("minute", [("partner_id", sa.String(64)),
                                            ("bound", sa.Float())]),
    "rollup_latencies": ("minute", [("partner_id", sa.String(64)), ("bound", sa.Float())]),
    "rollup_conversions": ("hour", [("offer_id", sa.String(64)), ("state", sa.String(32))]),
    "rollup_dead_letters": (None, [("partner_id", sa.String(64)),
                                   ("failure_class", sa.String(20))]),
}
SUMMED = ("rollup_attempt_durations", "rollup_latencies")
# Rollups of later migrations (0012): their tables do not exist yet.
LATER = ("rollup_dead_letter_hours", "rollup_postback_events", "rollup_conversion_events")
BACKLOG = "state IN ('pending', 'queued', 'in_flight', 'retry_scheduled')"


def upgrade() -> None:
    for name, (time_col, cols) in TABLES.items():
        columns: list[sa.Column[Any]] = ([sa.Column(time_col, UTCDateTime(timezone=True), nullable=False)]
                   if time_col else [])
        columns += [sa.Column(c, typ, nullable=False) for c, typ in cols]
        values = ["n", "total_us"] if name in SUMMED else ["n"]
        columns += [sa.Column(v, sa.BigInteger(), nullable=False) for v in values]
        op.create_table(name, *columns, sa.Column("compacted", sa.Boolean(), nullable=False))
        keys = ([time_col] if time_col else []) + [c for c, _ in cols]
        op.create_index(f"uq_{name}_key", name, keys, unique=True,
                        postgresql_where=sa.text("compacted"), sqlite_where=sa.text("compacted"))
        if time_col:
            op.create_index(f"ix_{name}_{time_col}", name, [time_col])
    # Raw-row figures that must not scan history: the few test fires, the backlog per
    # partner, report edges and exports by creation time, new dead letters by time.
    op.create_index("ix_attempts_test_postback", "attempts", ["postback_id"],
                    postgresql_where=sa.text("is_test"), sqlite_where=sa.text("is_test"))
    op.create_index("ix_postbacks_backlog", "postbacks", ["partner_id", "created_at"],
                    postgresql_where=sa.text(BACKLOG), sqlite_where=sa.text(BACKLOG))
    op.create_index("ix_postbacks_created_at", "postbacks", ["created_at"])
    op.create_index("ix_postbacks_failed_created", "postbacks", ["created_at"],
                    postgresql_where=sa.text("state = 'dead_lettered'"),
                    sqlite_where=sa.text("state = 'dead_lettered'"))
    op.create_index("ix_dead_letters_created_at", "dead_letters", ["created_at"])
    rollups.install(op.get_bind(), backfill=True, without=LATER, days=False)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for stmt in rollups.uninstall_statements():
            bind.execute(sa.text(stmt))
    for name in ("ix_dead_letters_created_at", "ix_postbacks_failed_created",
                 "ix_postbacks_created_at", "ix_postbacks_backlog", "ix_attempts_test_postback"):
        op.drop_index(name)
    for name in TABLES:
        op.drop_table(name)
