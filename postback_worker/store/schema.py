"""Tables: one schema for PostgreSQL and SQLite (Alembic migrations follow it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


BigId = BigInteger().with_variant(Integer, "sqlite")

offers = Table(
    "offers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("campaign_type", String(20), nullable=False),
    Column("lifespan_days", Integer, nullable=False),
    Column("landing_url", Text, nullable=True),
    Column("allow_multiple", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # SHA-256 of the advertiser's security token for GET /postback (the token is shown once).
    Column("security_token_hash", String(128)),
    # Inbound rules: advertiser networks for GET /postback (comma-separated CIDRs), click-to-
    # conversion time bounds (seconds), daily caps per offer and per affiliate (UTC days).
    Column("allowed_ips", Text),
    Column("min_click_seconds", Integer),
    Column("max_click_seconds", Integer),
    Column("daily_cap", Integer),
    Column("daily_payout_cap", Float),
    Column("affiliate_daily_cap", Integer),
    Column("affiliate_daily_payout_cap", Float),
    # Lifecycle: a new event for a known conversion is an update (default), ignored, or a
    # separate conversion (None: 'separate' when allow_multiple, else 'update').
    Column("duplicate_mode", String(10)),
    # Hours an approved postback waits before firing (a reversal meanwhile cancels it).
    Column("hold_hours", Float),
    # Payout rules overriding the partners' own: JSON {"partner id" or "*": "percent:40"}.
    Column("payout_rules", Text),
)

partners = Table(
    "partners",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("postback_url", Text, nullable=False),
    Column("method", String(8), nullable=False, default="GET"),
    Column("timeout", Float, nullable=False, default=10.0),
    Column("success_check", String(200), nullable=True),
    # Comma-separated conversion statuses that fire this partner.
    Column("fire_statuses", String(200), nullable=False, default="approved"),
    Column("enabled", Boolean, nullable=False, default=True),
    # "own": conversions of clicks with aff_id == id; "global": every attributed conversion.
    Column("scope", String(10), nullable=False, default="own"),
    # For global partners: comma-separated offer ids (empty: all offers).
    Column("offer_ids", Text, nullable=True),
    Column("max_attempts", Integer, nullable=True),
    Column("base_delay", Float, nullable=True),
    Column("max_delay", Float, nullable=True),
    Column("horizon", Float, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Manual pause: postbacks wait (nothing is dropped) until resumed.
    Column("paused", Boolean, nullable=False, default=False, server_default="0"),
    Column("paused_at", UTCDateTime),
    Column("paused_reason", Text),
    # Requests per second and requests at once, across all workers (None: unlimited).
    Column("rate_limit", Float),
    Column("max_concurrency", Integer),
    # Optional HMAC-SHA256 request signing; the secret is never shown or exported.
    Column("hmac_secret", Text),
    Column("signature_header", String(100)),
    # Secret rotation: the previous secret still signs (a second signature) until this time.
    Column("hmac_secret_previous", Text),
    Column("hmac_previous_until", UTCDateTime),
    # "hmac" (X-Postback-Signature, the default) or "standard" (Standard Webhooks).
    Column("signature_scheme", String(20)),
    # POST bodies: "form" or "json" from body_template (None: the URL's query string as a form).
    Column("body_format", String(10)),
    Column("body_template", Text),
    # Custom request headers, a JSON object; secrets: never shown, exported or logged.
    Column("custom_headers", Text),
    # Forward proxy for this partner's postbacks (overrides POSTBACK_EGRESS_PROXY; "direct":
    # none). May carry credentials: masked when shown.
    Column("egress_proxy", Text),
    # Who paused the partner: "operator", or "gone" (the partner answered 410 Gone).
    Column("paused_by", String(20)),
    # Lifecycle: comma-separated events that fire (approved, reversal, adjustment, status; None:
    # approved), JSON templates per trigger, JSON status names for {status}, the payout rule
    # (advertiser, fixed:AMOUNT, percent:P) and a hold period overriding the offer's.
    Column("fire_events", String(100)),
    Column("templates", Text),
    Column("status_map", Text),
    Column("payout_rule", String(40)),
    Column("hold_hours", Float),
)

# Every saved version of an offer or partner (secrets redacted), for audits and bundles.
config_history = Table(
    "config_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("kind", String(20), nullable=False),
    Column("object_id", String(64), nullable=False),
    Column("changed_at", UTCDateTime, nullable=False),
    Column("changed_by", String(200)),
    Column("snapshot", Text, nullable=False),
    Index(None, "kind", "object_id", "changed_at"),
)

clicks = Table(
    "clicks",
    metadata,
    Column("transaction_id", String(64), primary_key=True),
    Column("offer_id", String(64), nullable=False),
    Column("aff_id", String(64), nullable=False),
    Column("aff_sub", String(255)),
    Column("aff_sub2", String(255)),
    Column("aff_sub3", String(255)),
    Column("aff_sub4", String(255)),
    Column("aff_sub5", String(255)),
    Column("source", String(255)),
    Column("ip", String(45)),
    Column("device_id", String(255)),
    Column("user_agent", Text),
    Column("clicked_at", UTCDateTime, nullable=False, index=True),
    Index(None, "offer_id", "clicked_at"),
)

conversions = Table(
    "conversions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("transaction_id", String(255), nullable=False, index=True),
    Column("offer_id", String(64)),
    Column("aff_id", String(64)),
    Column("goal_id", String(64), nullable=False, default=""),
    Column("payout", String(40)),
    Column("sale_amount", String(40)),
    Column("currency", String(3)),
    Column("status", String(32), nullable=False),
    Column("adv_sub", String(255)),
    Column("ip", String(45)),
    Column("device_id", String(255)),
    # The address that reported it by GET /postback with the offer's token (else None).
    Column("source_ip", String(45)),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("received_at", UTCDateTime, nullable=False, index=True),
    Column("state", String(20), nullable=False),
    Column("reason", Text),
    Column("processed_at", UTCDateTime),
    Column("reattributed_at", UTCDateTime),
    # An event that updates an earlier conversion (state 'updated'): that conversion's id.
    Column("update_of", String(64), index=True),
    Index(None, "state", "received_at"),
    Index(None, "offer_id", "received_at"),
)

# One row per (offer, transaction, goal) that was attributed: the race-safe duplicate check.
conversion_keys = Table(
    "conversion_keys",
    metadata,
    Column("key", String(400), primary_key=True),
    Column("conversion_id", String(64), nullable=False),
)

# The history of a conversion: one row per advertiser event folded into it (seq 1: created).
conversion_events = Table(
    "conversion_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("conversion_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    # The accepted event (its row in conversions) this entry records.
    Column("event_id", String(64), nullable=False, unique=True),
    # created, status_changed, adjusted, repeat
    Column("kind", String(20), nullable=False),
    Column("status", String(32), nullable=False),
    Column("previous_status", String(32)),
    Column("payout", String(40)),
    Column("sale_amount", String(40)),
    Column("currency", String(3)),
    Column("summary", Text, nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    UniqueConstraint("conversion_id", "seq"),
    Index(None, "kind", "recorded_at"),
    Index(None, "recorded_at"),  # retention
)

postbacks = Table(
    "postbacks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("conversion_id", String(64), ForeignKey("conversions.id"), nullable=False),
    Column("partner_id", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("method", String(8), nullable=False),
    # The rendered request body (POST with a body template), else None.
    Column("body", Text),
    # pending, queued, in_flight, retry_scheduled, delivered, dead_lettered, skipped
    Column("state", String(20), nullable=False),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    # Attempts made before the current round: a replay starts a new round of the retry policy.
    Column("round_start_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("next_attempt_at", UTCDateTime),
    Column("lease_until", UTCDateTime),
    Column("lease_token", String(32)),
    Column("first_attempt_at", UTCDateTime),
    Column("last_attempt_at", UTCDateTime),
    Column("last_status", Integer),
    Column("last_class", String(20)),
    Column("received_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime, index=True),
    Column("triggered_by", String(200)),
    # The conversion event this postback carries (conversion_events.seq) and its trigger
    # (approved, reversal, adjustment, status); per conversion and partner, lower seqs first.
    Column("event_seq", Integer, nullable=False, default=1, server_default="1"),
    Column("event", String(20)),
    UniqueConstraint("conversion_id", "partner_id", "event_seq"),
    Index(None, "state", "next_attempt_at"),
    Index(None, "partner_id", "created_at"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("postback_id", String(64), ForeignKey("postbacks.id"), nullable=False, index=True),
    Column("attempt_no", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("url", Text, nullable=False),
    Column("status_code", Integer),
    Column("failure_class", String(20), nullable=False),
    Column("error", Text),
    Column("response_excerpt", Text),
    Column("worker", String(200)),
    Column("is_test", Boolean, nullable=False, default=False),
    Index(None, "started_at"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("postback_id", String(64), ForeignKey("postbacks.id"), primary_key=True),
    Column("partner_id", String(64), nullable=False),
    Column("offer_id", String(64)),
    Column("failure_class", String(20), nullable=False),
    Column("last_status", Integer),
    Column("reason", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("replayed_at", UTCDateTime),
    Column("replay_count", Integer, nullable=False, default=0),
    Index(None, "partner_id", "created_at"),
    Index(None, "failure_class", "created_at"),
    Index(None, "partner_id", "failure_class", "created_at", "postback_id"),  # `dlq list` pages
)

# One row per replay run (dead-letter replay or re-attribution), with its tally.
replay_runs = Table(
    "replay_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("triggered_by", String(200), nullable=False),
    Column("filters", Text, nullable=False),
    Column("dry_run", Boolean, nullable=False),
    Column("selected", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("delivered", Integer),
    Column("failed", Integer),
    Column("pending", Integer),
)

# Alerts: one row per episode (fires once when it starts, resolves once when it clears).
alerts = Table(
    "alerts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(200), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("partner_id", String(64)),
    Column("severity", String(10), nullable=False),
    Column("state", String(10), nullable=False),
    Column("message", Text, nullable=False),
    Column("details", Text),
    Column("started_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime),
    Column("last_evaluated_at", UTCDateTime),
    Index(None, "key", "state"),
    Index(None, "started_at"),
)

# API keys: only a hash is stored; scopes such as "ingest", "admin".
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(128), nullable=False, unique=True),
    Column("scopes", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
)


# Operator events (store/events.py): an outbox written in the transaction of the change each
# describes, and the webhook deliveries the relay makes of them (dead letters batched).
operator_events = Table(
    "operator_events",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("type", String(40), nullable=False),
    Column("partner_id", String(64)),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("data", Text, nullable=False),
    # The delivery carrying it; None until the relay has planned it.
    Column("delivery_id", String(64)),
    Index(None, "occurred_at"),
    Index(None, "delivery_id"),
)
operator_deliveries = Table(
    "operator_deliveries",
    metadata,
    Column("id", String(64), primary_key=True),  # webhook-id: the same on every retry
    Column("type", String(40), nullable=False),
    Column("partner_id", String(64)),
    Column("state", String(10), nullable=False),  # pending, delivered, failed, skipped
    Column("payload", Text, nullable=False),
    Column("event_count", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Index(None, "state", "next_attempt_at"),
    Index(None, "created_at"),
)


# -- rollups (store/rollups.py): counts kept exact by PostgreSQL triggers ---------------------
# Each row is a delta (compacted = false, appended by a trigger) or the sum of folded deltas
# (compacted = true, one per key). Readers sum both. Unused on SQLite (figures come from rows).

def _rollup(name: str, time_column: str | None, *columns: Column[Any],
            values: tuple[str, ...] = ("n",)) -> Table:
    keys = ([time_column] if time_column else []) + [c.name for c in columns]
    time_cols = [Column(time_column, UTCDateTime, nullable=False)] if time_column else []
    table = Table(
        name, metadata, *time_cols, *columns,
        *[Column(v, BigInteger, nullable=False) for v in values],
        Column("compacted", Boolean, nullable=False, default=False),
    )
    Index(f"uq_{name}_key", *[table.c[k] for k in keys], unique=True,
          postgresql_where=table.c.compacted, sqlite_where=table.c.compacted)
    if time_column:
        Index(f"ix_{name}_{time_column}", table.c[time_column])
    if time_column == "hour":  # deltas not yet folded into the day table (migration 0011)
        Index(f"ix_{name}_deltas", table.c.hour, postgresql_where=~table.c.compacted,
              sqlite_where=~table.c.compacted)
    return table


def _days(hourly: Table) -> Table:
    """Per-day sums of an hourly rollup's compacted rows, kept by the compaction (read for
    whole days, so long ranges and history-wide totals read 24 times fewer rows)."""
    keys = [c for c in hourly.c if c.name not in ("hour", "n", "compacted")]
    table = Table(f"{hourly.name}_days", metadata, Column("day", UTCDateTime, nullable=False),
                  *[Column(c.name, c.type, nullable=False) for c in keys],
                  Column("n", BigInteger, nullable=False))
    Index(f"uq_{table.name}_key", table.c.day, *[table.c[c.name] for c in keys], unique=True)
    return table


rollup_postbacks = _rollup(
    "rollup_postbacks", "hour", Column("partner_id", String(64), nullable=False),
    # postbacks (every one created), delivered, failed (dead-lettered), skipped
    Column("bucket", String(20), nullable=False),
    Column("last_class", String(20), nullable=False))
rollup_attempts = _rollup(
    "rollup_attempts", "hour", Column("partner_id", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),  # -1: no HTTP status
    Column("failure_class", String(20), nullable=False))
rollup_durations = _rollup(
    "rollup_durations", "hour", Column("partner_id", String(64), nullable=False),
    Column("bucket_ms", Float, nullable=False))
rollup_attempt_minutes = _rollup(
    "rollup_attempt_minutes", "minute", Column("partner_id", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("failure_class", String(20), nullable=False))
# Per minute, per partner, per /metrics histogram bound (store/rollups.py DURATION_BOUNDS,
# LATENCY_BOUNDS; infinity above the last): how many, and their total in microseconds.
rollup_attempt_durations = _rollup(
    "rollup_attempt_durations", "minute", Column("partner_id", String(64), nullable=False),
    Column("bound", Float, nullable=False), values=("n", "total_us"))
rollup_latencies = _rollup(
    "rollup_latencies", "minute", Column("partner_id", String(64), nullable=False),
    Column("bound", Float, nullable=False), values=("n", "total_us"))
rollup_conversions = _rollup(
    "rollup_conversions", "hour", Column("offer_id", String(64), nullable=False),
    Column("state", String(32), nullable=False))
rollup_dead_letters = _rollup(
    "rollup_dead_letters", None, Column("partner_id", String(64), nullable=False),
    Column("failure_class", String(20), nullable=False))
rollup_dead_letter_hours = _rollup(
    "rollup_dead_letter_hours", "hour", Column("partner_id", String(64), nullable=False),
    Column("offer_id", String(64), nullable=False),  # '' for none
    Column("failure_class", String(20), nullable=False),
    Column("last_status", Integer, nullable=False))  # -1: no HTTP status
# Lifecycle (migration 0011): postbacks per event they carry, by creation hour; conversion
# events other than `created`, by the hour recorded.
rollup_postback_events = _rollup(
    "rollup_postback_events", "hour", Column("partner_id", String(64), nullable=False),
    Column("event", String(20), nullable=False))
rollup_conversion_events = _rollup(
    "rollup_conversion_events", "hour", Column("kind", String(20), nullable=False),
    Column("status", String(32), nullable=False),
    Column("previous_status", String(32), nullable=False))  # '' for none
# Day tables of the hourly rollups (migration 0011), by hourly table name.
DAYS = {h.name: _days(h) for h in (
    rollup_postbacks, rollup_attempts, rollup_durations, rollup_conversions,
    rollup_dead_letter_hours, rollup_postback_events, rollup_conversion_events)}

# Raw-row figures that must not scan history (migration 0005).
_BACKLOG = postbacks.c.state.in_(["pending", "queued", "in_flight", "retry_scheduled"])
Index("ix_attempts_test_postback", attempts.c.postback_id,
      postgresql_where=attempts.c.is_test, sqlite_where=attempts.c.is_test)
Index("ix_postbacks_backlog", postbacks.c.partner_id, postbacks.c.created_at,
      postgresql_where=_BACKLOG, sqlite_where=_BACKLOG)
Index("ix_postbacks_created_at", postbacks.c.created_at)
Index("ix_postbacks_failed_created", postbacks.c.created_at,
      postgresql_where=postbacks.c.state == "dead_lettered",
      sqlite_where=postbacks.c.state == "dead_lettered")
Index("ix_dead_letters_created_at", dead_letters.c.created_at)
