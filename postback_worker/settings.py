"""Typed settings, built once from the environment and passed in."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from postback_worker.domain.retry import RetryPolicy

DEFAULT_DATABASE_URL = "sqlite:///postback-worker.db"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class SettingsError(ValueError):
    """A setting has a value we cannot use."""


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError(f"expected true/false, got {value!r}")


def _list(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    """Every knob of the system; `from_env` reads `POSTBACK_*`, `DATABASE_URL` and `REDIS_URL`."""

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    # Celery broker; defaults to redis_url.
    broker_url: str = ""
    # Redis Sentinel: the monitored primary's name, for sentinel:// URLs in REDIS_URL and
    # POSTBACK_BROKER_URL ("sentinel://s1:26379;sentinel://s2:26379/0").
    redis_sentinel_master: str = ""
    # Seconds a message may stay unacknowledged before Redis hands it to another worker.
    # Must exceed the longest batch (first attempts included).
    visibility_timeout: int = 3600

    # Ingestion limits.
    max_batch_size: int = 1000
    max_request_bytes: int = 2_000_000
    max_field_length: int = 255
    # Events per Celery message when a request carries many.
    enqueue_chunk_size: int = 1000
    # Seconds a single-event request (GET /postback) may wait to share a Redis message with
    # others arriving meanwhile (group commit); 0 publishes each one alone. Workers pay a fixed
    # cost per message (about 7 ms of database round trips), so at hundreds of requests/s a
    # short wait keeps them ahead.
    ingest_batch_wait: float = 0.02
    # ... or until this many events are waiting (then they go at once).
    ingest_batch_events: int = 16

    # Delivery.
    default_timeout: float = 10.0
    delivery_concurrency: int = 256
    response_excerpt_bytes: int = 512
    lease_seconds: int = 120
    user_agent: str = "postback-worker/0.1"
    # CIDRs that outbound requests may reach although they are private/loopback (dev and tests).
    allow_networks: tuple[str, ...] = ()
    egress_ips: tuple[str, ...] = ()

    # Retry policy defaults (per-partner overrides live on the partner).
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    # Beat sweep.
    sweep_interval: float = 1.0
    sweep_batch: int = 500
    # At most this many due postbacks are queued by one sweep run (batches of sweep_batch).
    sweep_max_per_run: int = 20000
    # A postback queued for retry but not claimed within this many seconds is queued again.
    requeue_after: int = 300
    # Conversions received but not processed after this many seconds are enqueued again.
    stuck_conversion_after: int = 600

    # Bootstrap ("break-glass") admin API token, accepted with every scope. Empty: only API
    # keys from `postback-worker keys create` are accepted (every endpoint but /click, /health,
    # /healthz and the advertiser /postback needs one).
    admin_token: str = ""
    # Seconds an API key check is cached in the API process (a revoked key stops working after).
    api_key_cache_seconds: float = 5.0
    # Hours a rotated-out partner signing secret keeps signing (a second signature is sent).
    signing_grace_hours: float = 72.0
    # Configuration audit thresholds (`postback-worker audit`).
    audit_silent_days: int = 7
    audit_paused_days: int = 7
    audit_failure_rate: float = 0.25
    audit_expired_share: float = 0.05
    audit_stale_days: int = 90
    # Lifetime of cached offers/partners in a worker process.
    config_cache_seconds: float = 5.0

    # -- data retention (beat task purge-expired-data) --
    # Days clicks are kept; never less than the longest offer lifespan (a shorter value is
    # clipped to it, with a warning), so a late conversion still finds its click.
    click_retention_days: int = 180
    # Days attempt records are kept (by attempt time).
    attempt_retention_days: int = 90
    # Days delivered postbacks (and their attempts) are kept after delivery.
    delivered_retention_days: int = 90
    # Rows deleted per statement (each its own short transaction) and statements per table per
    # run; what is left is purged by the next run.
    retention_batch: int = 1000
    retention_max_batches: int = 100
    # Seconds between purge runs (beat).
    retention_interval: float = 3600.0

    # -- visibility (metrics, alerts, dashboard, Flower) --
    # Bearer token Prometheus sends to GET /metrics (empty: the admin credential is required).
    metrics_token: str = ""
    # Seconds of attempts/deliveries the /metrics histograms cover (a sliding window).
    metrics_window_seconds: int = 3600
    # Alert evaluation: how often (beat), over which sliding window, and the thresholds.
    alert_interval: float = 60.0
    alert_window_seconds: int = 900
    # Partner failure rate (failed / all attempts) that fires an alert, and the minimum volume.
    alert_failure_rate: float = 0.05
    alert_min_volume: int = 20
    # Hysteresis: an open alert resolves only once its figure is below threshold * this ratio.
    alert_clear_ratio: float = 0.5
    # New dead letters within the window that fire the "dead letters growing" alert.
    alert_dead_letter_growth: int = 10
    # Seconds a due retry may wait unclaimed before the "retry backlog" alert fires.
    alert_retry_overdue_seconds: int = 600
    # Lost conversions (expired / unknown click) share per offer, and the minimum volume.
    alert_lost_rate: float = 0.05
    alert_lost_min_volume: int = 20
    # Slack-compatible incoming webhook ({"text": ...}) for alerts; empty: log only.
    alert_webhook_url: str = ""
    # Key that signs dashboard links and sessions (empty: the admin token is used).
    dashboard_secret: str = ""
    # Flower: basic auth "user:password" pairs, or OAuth (Flower's auth provider class, a
    # regex of allowed e-mails, client key/secret and redirect URI). Outside development one
    # of the two is required; `postback-worker flower --dev` may run open on loopback only.
    flower_basic_auth: tuple[str, ...] = ()
    flower_auth_provider: str = ""
    flower_auth: str = ""
    flower_oauth2_key: str = ""
    flower_oauth2_secret: str = ""
    flower_oauth2_redirect_uri: str = ""

    # On-call guardrails (per partner, shared by every worker through Redis).
    # Circuit breaker: opens when, within breaker_window seconds, at least breaker_min_attempts
    # attempts were made and at least breaker_failure_ratio of them failed with retryable classes.
    breaker_enabled: bool = True
    breaker_min_attempts: int = 20
    breaker_failure_ratio: float = 0.5
    breaker_window: float = 60.0
    # Seconds an open circuit waits before one probe; doubles after each failed probe, capped.
    breaker_cooldown: float = 5.0
    breaker_max_cooldown: float = 300.0
    # A probe not answered within this many seconds may be replaced by another probe.
    breaker_probe_timeout: float = 30.0
    # Over a partner's rate limit or concurrency cap, postbacks wait about this long.
    guard_wait: float = 1.0
    # Postbacks of a paused partner are looked at again this often (resume releases them at once).
    pause_recheck: float = 30.0
    # Dead-letter replay: default postbacks per second.
    replay_rate: float = 10.0

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment variables that make `from_env` return these settings."""
        env = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}
        for f in fields(self):
            if f.name in {"database_url", "redis_url", "retry"}:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(value)
            else:
                text = str(value)
            env["POSTBACK_" + f.name.upper()] = text
        for f in fields(self.retry):
            env["POSTBACK_RETRY_" + f.name.upper()] = str(getattr(self.retry, f.name))
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        if "DATABASE_URL" in env:
            kwargs["database_url"] = env["DATABASE_URL"]
        if "REDIS_URL" in env:
            kwargs["redis_url"] = env["REDIS_URL"]
        defaults = cls()
        for f in fields(cls):
            if f.name in {"database_url", "redis_url", "retry"}:
                continue
            key = "POSTBACK_" + f.name.upper()
            if key not in env:
                continue
            raw = env[key]
            current = getattr(defaults, f.name)
            try:
                if isinstance(current, bool):
                    kwargs[f.name] = _bool(raw)
                elif isinstance(current, int):
                    kwargs[f.name] = int(raw)
                elif isinstance(current, float):
                    kwargs[f.name] = float(raw)
                elif isinstance(current, tuple):
                    kwargs[f.name] = _list(raw)
                else:
                    kwargs[f.name] = raw
            except ValueError as exc:
                raise SettingsError(f"{key}: {exc}") from exc
        retry_kwargs: dict[str, Any] = {}
        for name, conv in (
            ("max_attempts", int),
            ("base_delay", float),
            ("max_delay", float),
            ("horizon", float),
            ("max_retry_after", float),
            ("jitter", float),
        ):
            key = "POSTBACK_RETRY_" + name.upper()
            if key in env:
                try:
                    retry_kwargs[name] = conv(env[key])
                except ValueError as exc:
                    raise SettingsError(f"{key}: {exc}") from exc
        if retry_kwargs:
            kwargs["retry"] = RetryPolicy(**retry_kwargs)
        return cls(**kwargs)
