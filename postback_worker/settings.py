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
    # Seconds a message may stay unacknowledged before Redis hands it to another worker.
    # Must exceed the longest batch (first attempts included).
    visibility_timeout: int = 3600

    # Ingestion limits.
    max_batch_size: int = 1000
    max_request_bytes: int = 2_000_000
    max_field_length: int = 255
    # Events per Celery message when a request carries many.
    enqueue_chunk_size: int = 1000

    # Delivery.
    default_timeout: float = 10.0
    delivery_concurrency: int = 32
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
    # A postback queued for retry but not claimed within this many seconds is queued again.
    requeue_after: int = 300
    # Conversions received but not processed after this many seconds are enqueued again.
    stuck_conversion_after: int = 600

    # Admin API token; empty means admin endpoints are open (development only).
    admin_token: str = ""
    # Lifetime of cached offers/partners in a worker process.
    config_cache_seconds: float = 5.0

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
