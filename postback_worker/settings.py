"""Typed settings grouped by concern, built once from the environment and passed in.

Each setting has one name, its environment variable (`POSTBACK_LEASE_SECONDS`, `DATABASE_URL`,
...), and one default, on its group's field. `Settings.from_env()` reads them, `to_env()` writes
them back, and `Settings.build(lease_seconds=5, ...)` / `with_overrides(...)` take the same names
in lower case without the `POSTBACK_` prefix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from postback_worker import redisconn
from postback_worker.domain.guards import BreakerConfig
from postback_worker.domain.retry import RetryPolicy
from postback_worker.errors import InvalidInput

DEFAULT_DATABASE_URL = "sqlite:///postback-worker.db"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class SettingsError(InvalidInput):
    """A setting has a value we cannot use."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def env(name: str) -> Any:
    """Field metadata: the environment variable of a setting whose name does not follow its
    group's prefix."""
    return {"env": name}


@dataclass(frozen=True)
class RedisSettings:
    """Redis for work queues (Celery broker), guardrails, metrics and alerts."""

    PREFIX: ClassVar[str] = "POSTBACK_"
    url: str = field(default=DEFAULT_REDIS_URL, metadata=env("REDIS_URL"))
    # Celery broker; defaults to url.
    broker_url: str = ""
    # Redis Sentinel: the monitored primary's name, for sentinel:// URLs in REDIS_URL and
    # POSTBACK_BROKER_URL ("sentinel://s1:26379;sentinel://s2:26379/0").
    sentinel_master: str = field(default="", metadata=env("POSTBACK_REDIS_SENTINEL_MASTER"))
    # Seconds a message may stay unacknowledged before Redis hands it to another worker.
    # Must exceed the longest batch (first attempts included).
    visibility_timeout: int = 3600

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.url

    def client(self, *, url: str | None = None, timeout: float = 5.0) -> Any:
        """A Redis client (following the Sentinel primary for sentinel:// URLs)."""
        return redisconn.client(url or self.url, master=self.sentinel_master, timeout=timeout)

    def broker_transport_options(self) -> dict[str, Any]:
        """Kombu transport options for the broker: visibility timeout, Sentinel primary."""
        options: dict[str, Any] = {"visibility_timeout": self.visibility_timeout}
        if self.sentinel_master:
            options["master_name"] = self.sentinel_master
        return options


@dataclass(frozen=True)
class DatabaseSettings:
    PREFIX: ClassVar[str] = "POSTBACK_"
    url: str = field(default=DEFAULT_DATABASE_URL, metadata=env("DATABASE_URL"))

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


@dataclass(frozen=True)
class IngestSettings:
    """Limits of what the API and the producer accept, and how events travel to Redis."""

    PREFIX: ClassVar[str] = "POSTBACK_"
    max_batch_size: int = 1000
    max_request_bytes: int = 2_000_000
    max_field_length: int = 255
    # Events per Celery message when a request carries many.
    enqueue_chunk_size: int = 1000
    # A woken worker takes up to this many accepted events per transaction (each batch
    # costs a claim, an admission and its saves: 100 made batches of 500 events 0.7x as fast
    # as the pre-journal 500-event messages) ...
    claim_batch: int = field(default=500, metadata=env("POSTBACK_INGEST_CLAIM_BATCH"))
    # ... and keeps taking batches while they come back full, at most this many times (a
    # full batch has woken another worker for the rest). 500 x 2 keeps a wake-up within the
    # longest batch deploy/ sizes shutdown grace and visibility timeout for (1000 events).
    claim_rounds: int = field(default=2, metadata=env("POSTBACK_INGEST_CLAIM_ROUNDS"))
    # A woken worker keeps taking events while they arrive, starting a short batch at most
    # this often (one-event producers then still make batches of rate x linger; producers
    # wake nobody meanwhile). Adds up to this much to ingest-to-delivery latency; 0: one
    # wake-up takes what waits (until a batch comes back short), and later commits wake
    # again.
    linger: float = field(default=0.1, metadata=env("POSTBACK_INGEST_LINGER"))
    # ... for at most this many seconds, then hands the rest to a fresh wake-up (bounds how
    # long a warm shutdown waits for an intake task).
    drain_seconds: float = field(default=2.0, metadata=env("POSTBACK_INGEST_DRAIN_SECONDS"))


@dataclass(frozen=True)
class DeliverySettings:
    PREFIX: ClassVar[str] = "POSTBACK_"
    default_timeout: float = 10.0
    # Requests in flight at once per worker process.
    concurrency: int = field(default=256, metadata=env("POSTBACK_DELIVERY_CONCURRENCY"))
    response_excerpt_bytes: int = 512
    # Seconds a worker's claim on a postback lasts (renewed every third of it while the batch
    # is in flight). A worker refuses to start unless it is at least twice the longest timeout.
    lease_seconds: int = 120
    # Answers are saved as they arrive: a save starts once this many answers wait or the
    # oldest is record_wait_ms old, and takes every answer already received with it.
    record_batch: int = 32
    record_wait_ms: float = 20.0
    user_agent: str = "postback-worker/0.1"
    # CIDRs that outbound requests may reach although they are private/loopback (dev and tests).
    allow_networks: tuple[str, ...] = ()
    # Our outbound addresses, which partners must allowlist (shown in alerts and bundles).
    egress_ips: tuple[str, ...] = ()
    # Forward proxy for every postback (http://[user:password@]host:port, HTTP CONNECT to the
    # checked partner address); empty: direct. A partner's egress_proxy overrides it.
    egress_proxy: str = ""
    # Lifetime of cached offers/partners in a worker process.
    config_cache_seconds: float = 5.0
    # Seconds a postback waiting behind an earlier one of its conversion and partner (which
    # is in flight or not yet due) waits before it is checked again; delivery wakes it sooner.
    order_recheck: float = 1.0


@dataclass(frozen=True)
class SweepSettings:
    """Beat's sweep of due retries, stuck postbacks and stuck conversions."""

    PREFIX: ClassVar[str] = "POSTBACK_SWEEP_"
    interval: float = 1.0
    batch: int = 500
    # At most this many due postbacks are queued by one sweep run (batches of `batch`).
    max_per_run: int = 20000
    # A postback queued for retry but not claimed within this many seconds is queued again.
    requeue_after: int = field(default=300, metadata=env("POSTBACK_REQUEUE_AFTER"))
    # Accepted events still waiting for intake after this many seconds (their Redis wake-up
    # was lost) make beat wake the workers again. Waking is cheap and idempotent.
    stuck_conversion_after: int = field(default=60,
                                        metadata=env("POSTBACK_STUCK_CONVERSION_AFTER"))


@dataclass(frozen=True)
class SecuritySettings:
    PREFIX: ClassVar[str] = "POSTBACK_"
    # Bootstrap ("break-glass") admin API token, accepted with every scope. Empty: only API
    # keys from `postback-worker keys create` are accepted.
    admin_token: str = ""
    # Seconds an API key check is cached in the API process (a revoked key stops working after).
    api_key_cache_seconds: float = 5.0
    # Hours a rotated-out partner signing secret keeps signing (a second signature is sent).
    signing_grace_hours: float = 72.0
    # Key that signs dashboard links and sessions (empty: the admin token is used).
    dashboard_secret: str = ""


@dataclass(frozen=True)
class AuditSettings:
    """Configuration audit thresholds (`postback-worker audit`)."""

    PREFIX: ClassVar[str] = "POSTBACK_AUDIT_"
    silent_days: int = 7
    paused_days: int = 7
    failure_rate: float = 0.25
    expired_share: float = 0.05
    stale_days: int = 90


@dataclass(frozen=True)
class RetentionSettings:
    """Data retention (beat task purge-expired-data)."""

    PREFIX: ClassVar[str] = "POSTBACK_RETENTION_"
    # Days clicks are kept; never less than the longest offer lifespan (a shorter value is
    # clipped to it, with a warning), so a late conversion still finds its click.
    click_days: int = field(default=180, metadata=env("POSTBACK_CLICK_RETENTION_DAYS"))
    # Days attempt records are kept (by attempt time).
    attempt_days: int = field(default=90, metadata=env("POSTBACK_ATTEMPT_RETENTION_DAYS"))
    # Days delivered postbacks (and their attempts) are kept after delivery.
    delivered_days: int = field(default=90, metadata=env("POSTBACK_DELIVERED_RETENTION_DAYS"))
    # Days conversion events are kept once a later event of their conversion superseded them
    # (the last event of each conversion and those a waiting or dead postback carries stay).
    event_days: int = field(default=90, metadata=env("POSTBACK_EVENT_RETENTION_DAYS"))
    # How far before that horizon each run looks (events superseded later than this are kept).
    event_lookback_days: int = field(default=7,
                                     metadata=env("POSTBACK_EVENT_RETENTION_LOOKBACK_DAYS"))
    # Rows deleted per statement (each its own short transaction) and statements per table per
    # run; what is left is purged by the next run.
    batch: int = 1000
    max_batches: int = 100
    # Seconds between purge runs (beat).
    interval: float = 3600.0


@dataclass(frozen=True)
class MetricsSettings:
    PREFIX: ClassVar[str] = "POSTBACK_METRICS_"
    # Bearer token Prometheus sends to GET /metrics (empty: the admin credential is required).
    token: str = ""
    # Seconds of attempts/deliveries the /metrics histograms cover (a sliding window).
    window_seconds: int = 3600
    # Seconds between compactions of the rollup deltas (beat; PostgreSQL only).
    compact_interval: float = 10.0


@dataclass(frozen=True)
class AlertSettings:
    """Alert evaluation: how often (beat), over which sliding window, and the thresholds."""

    PREFIX: ClassVar[str] = "POSTBACK_ALERT_"
    interval: float = 60.0
    window_seconds: int = 900
    # Partner failure rate (failed / all attempts) that fires an alert, and the minimum volume.
    failure_rate: float = 0.05
    min_volume: int = 20
    # Hysteresis: an open alert resolves only once its figure is below threshold * this ratio.
    clear_ratio: float = 0.5
    # New dead letters within the window that fire the "dead letters growing" alert.
    dead_letter_growth: int = 10
    # Seconds a due retry may wait unclaimed before the "retry backlog" alert fires.
    retry_overdue_seconds: int = 600
    # A partner's oldest undelivered postback older than this raises backlog_age:<partner>.
    backlog_age_seconds: int = 1800
    # Lost conversions (expired / unknown click) share per offer, and the minimum volume.
    lost_rate: float = 0.05
    lost_min_volume: int = 20
    # Slack-compatible incoming webhook ({"text": ...}) for alerts; empty: log only.
    webhook_url: str = ""


@dataclass(frozen=True)
class EventSettings:
    """Operator events (docs/operator-events.md): a signed webhook for dead letters, circuit
    and pause changes, and alerts, so an on-call system can react without polling."""

    PREFIX: ClassVar[str] = "POSTBACK_EVENTS_"
    # Receiver URL (http or https; the egress guard and proxy apply). Empty: events are only
    # logged and listed.
    url: str = ""
    # Standard Webhooks secret ("whsec_" + base64 of at least 24 random bytes); required with
    # a URL. `postback-worker events secret` makes one.
    secret: str = ""
    # While rotating: the old secret also signs (two signatures) as long as this is set.
    previous_secret: str = ""
    # Types sent (comma-separated); empty: all. Others are logged and listed only.
    types: tuple[str, ...] = ()
    # Seconds a partner's dead letters wait to share one delivery (a full batch goes at once).
    batch_window: float = 30.0
    max_batch: int = 500
    # Seconds between relay runs (beat).
    interval: float = 2.0
    timeout: float = 5.0
    # Attempts per delivery before it is given up, with capped, jittered exponential backoff.
    max_attempts: int = 15
    retry_base_delay: float = 5.0
    retry_max_delay: float = 900.0
    # Days finished deliveries (and their events) are kept.
    retention_days: int = 30

    def problems(self) -> list[str]:
        """What makes these settings unusable, one line each naming the variable."""
        from postback_worker.delivery.signing import standard_key
        from postback_worker.domain.operator_events import check_types

        out: list[str] = []
        unknown = check_types(self.types)
        if unknown:
            out.append(f"POSTBACK_EVENTS_TYPES: unknown event type(s) {', '.join(unknown)}")
        if self.url:
            scheme, _, rest = self.url.partition("://")
            if scheme.lower() not in ("http", "https") or not rest.strip("/"):
                out.append("POSTBACK_EVENTS_URL: must be an http:// or https:// URL")
            for name, value in (("SECRET", self.secret), ("PREVIOUS_SECRET",
                                                          self.previous_secret)):
                if name == "SECRET" and not value:
                    out.append("POSTBACK_EVENTS_SECRET: required when POSTBACK_EVENTS_URL is "
                               "set (make one with: postback-worker events secret)")
                elif value and (not value.startswith("whsec_")
                                or len(standard_key(value)) < 24):
                    out.append(f"POSTBACK_EVENTS_{name}: must be whsec_ followed by the base64 "
                               "of at least 24 random bytes")
        for name in ("batch_window", "timeout", "retry_base_delay", "retry_max_delay",
                     "interval"):
            if getattr(self, name) < 0 or (name in ("timeout", "interval")
                                           and getattr(self, name) == 0):
                out.append(f"POSTBACK_EVENTS_{name.upper()}: must be a positive number")
        if self.max_batch < 1 or self.max_attempts < 1:
            out.append("POSTBACK_EVENTS_MAX_BATCH and POSTBACK_EVENTS_MAX_ATTEMPTS: must be at "
                       "least 1")
        return out

    def check(self) -> None:
        """Raise SettingsError listing every problem."""
        problems = self.problems()
        if problems:
            raise SettingsError("; ".join(problems))


@dataclass(frozen=True)
class FlowerSettings:
    """Basic auth "user:password" pairs, or OAuth (Flower's auth provider class, a regex of
    allowed e-mails, client key/secret and redirect URI). Outside development one of the two
    is required; `postback-worker flower --dev` may run open on loopback only."""

    PREFIX: ClassVar[str] = "POSTBACK_FLOWER_"
    basic_auth: tuple[str, ...] = ()
    auth_provider: str = ""
    auth: str = ""
    oauth2_key: str = ""
    oauth2_secret: str = ""
    oauth2_redirect_uri: str = ""


@dataclass(frozen=True)
class BreakerSettings(BreakerConfig):
    """The circuit breaker (domain.guards.BreakerConfig holds the figures and defaults)."""

    PREFIX: ClassVar[str] = "POSTBACK_BREAKER_"
    enabled: bool = True


@dataclass(frozen=True)
class OnCallSettings:
    PREFIX: ClassVar[str] = "POSTBACK_"
    # Over a partner's rate limit or concurrency cap, postbacks wait about this long.
    guard_wait: float = 1.0
    # Postbacks of a paused partner are looked at again this often (resume releases them at once).
    pause_recheck: float = 30.0
    # Dead-letter replay: default postbacks per second.
    replay_rate: float = 10.0


GROUPS: dict[str, type] = {
    "database": DatabaseSettings, "redis": RedisSettings, "ingest": IngestSettings,
    "delivery": DeliverySettings, "retry": RetryPolicy, "sweep": SweepSettings,
    "security": SecuritySettings, "audit": AuditSettings, "retention": RetentionSettings,
    "metrics": MetricsSettings, "alerts": AlertSettings, "flower": FlowerSettings,
    "breaker": BreakerSettings, "oncall": OnCallSettings, "events": EventSettings,
}
_PREFIXES = {"retry": "POSTBACK_RETRY_"}


def _env_name(group: str, f: Any) -> str:
    if "env" in f.metadata:
        return str(f.metadata["env"])
    prefix = _PREFIXES.get(group) or getattr(GROUPS[group], "PREFIX", "POSTBACK_")
    return prefix + f.name.upper()


def _settings_fields() -> dict[str, tuple[str, str]]:
    """Every setting: its name (env name, lower case, no POSTBACK_) -> (group, field)."""
    names: dict[str, tuple[str, str]] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            names[_env_name(group, f).removeprefix("POSTBACK_").lower()] = (group, f.name)
    return names


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _parse(raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        return _bool(raw)
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, tuple):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return raw


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


@dataclass(frozen=True)
class Settings:
    """Every knob of the system, one group per concern."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    # Retry policy defaults (per-partner overrides live on the partner).
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    flower: FlowerSettings = field(default_factory=FlowerSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    oncall: OnCallSettings = field(default_factory=OnCallSettings)
    events: EventSettings = field(default_factory=EventSettings)

    @property
    def is_sqlite(self) -> bool:
        return self.database.is_sqlite

    @classmethod
    def build(cls, **changes: Any) -> Settings:
        """Defaults with some settings changed, by name (`lease_seconds=5`) or by group."""
        return cls().with_overrides(**changes)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with settings changed by name (`lease_seconds=5`, `database_url=...`) or
        whole groups replaced (`retry=RetryPolicy(...)`)."""
        names = _settings_fields()
        groups: dict[str, dict[str, Any]] = {}
        whole: dict[str, Any] = {}
        for name, value in changes.items():
            if name in GROUPS:
                whole[name] = value
            elif name in names:
                group, attr = names[name]
                groups.setdefault(group, {})[attr] = value
            else:
                raise SettingsError(f"unknown setting {name!r}")
        new = replace(self, **whole) if whole else self
        return replace(new, **{g: replace(getattr(new, g), **v) for g, v in groups.items()})

    def to_env(self) -> dict[str, str]:
        """The environment variables that make `from_env` return these settings."""
        out: dict[str, str] = {}
        for group in GROUPS:
            value = getattr(self, group)
            for f in fields(value):
                out[_env_name(group, f)] = _text(getattr(value, f.name))
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for group, group_cls in GROUPS.items():
            defaults = group_cls()
            values: dict[str, Any] = {}
            for f in fields(group_cls):
                key = _env_name(group, f)
                if key not in environ:
                    continue
                try:
                    values[f.name] = _parse(environ[key], getattr(defaults, f.name))
                except ValueError as exc:
                    raise SettingsError(f"{key}: {exc}") from exc
            if values:
                kwargs[group] = group_cls(**values)
        return cls(**kwargs)
