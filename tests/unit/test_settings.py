"""Settings: grouped by concern, one environment variable and one default per setting."""

from __future__ import annotations

import pytest

from postback_worker.domain.retry import RetryPolicy
from postback_worker.errors import InvalidInput
from postback_worker.settings import Settings, SettingsError


def test_to_env_and_from_env_round_trip() -> None:
    custom = Settings.build(
        database_url="postgresql://db/x", redis_url="redis://r:6379/3", lease_seconds=45,
        allow_networks=("10.0.0.0/8", "::1/128"), breaker_enabled=False, alert_failure_rate=0.1,
        flower_basic_auth=("a:1", "b:2"), retry=RetryPolicy(max_attempts=3, base_delay=1.5),
        click_retention_days=200, ingest_claim_batch=50,
    )
    assert Settings.from_env(custom.to_env()) == custom
    assert Settings.from_env(Settings().to_env()) == Settings()


@pytest.mark.parametrize(("env", "group", "field", "value"), [
    ({"DATABASE_URL": "sqlite:///x.db"}, "database", "url", "sqlite:///x.db"),
    ({"REDIS_URL": "redis://h:1/2"}, "redis", "url", "redis://h:1/2"),
    ({"POSTBACK_REDIS_SENTINEL_MASTER": "pbw"}, "redis", "sentinel_master", "pbw"),
    ({"POSTBACK_DELIVERY_CONCURRENCY": "64"}, "delivery", "concurrency", 64),
    ({"POSTBACK_LEASE_SECONDS": "30"}, "delivery", "lease_seconds", 30),
    ({"POSTBACK_ALLOW_NETWORKS": "127.0.0.0/8, ::1/128"}, "delivery", "allow_networks",
     ("127.0.0.0/8", "::1/128")),
    ({"POSTBACK_SWEEP_INTERVAL": "0.5"}, "sweep", "interval", 0.5),
    ({"POSTBACK_REQUEUE_AFTER": "60"}, "sweep", "requeue_after", 60),
    ({"POSTBACK_CLICK_RETENTION_DAYS": "365"}, "retention", "click_days", 365),
    ({"POSTBACK_RETENTION_BATCH": "50"}, "retention", "batch", 50),
    ({"POSTBACK_ALERT_FAILURE_RATE": "0.2"}, "alerts", "failure_rate", 0.2),
    ({"POSTBACK_METRICS_WINDOW_SECONDS": "60"}, "metrics", "window_seconds", 60),
    ({"POSTBACK_BREAKER_ENABLED": "off"}, "breaker", "enabled", False),
    ({"POSTBACK_BREAKER_COOLDOWN": "9"}, "breaker", "cooldown", 9.0),
    ({"POSTBACK_RETRY_MAX_ATTEMPTS": "2"}, "retry", "max_attempts", 2),
    ({"POSTBACK_FLOWER_BASIC_AUTH": "u:p"}, "flower", "basic_auth", ("u:p",)),
    ({"POSTBACK_REPLAY_RATE": "3"}, "oncall", "replay_rate", 3.0),
])
def test_environment_variables_land_in_their_group(env: dict[str, str], group: str, field: str,
                                                   value: object) -> None:
    assert getattr(getattr(Settings.from_env(env), group), field) == value


@pytest.mark.parametrize(("env", "message"), [
    ({"POSTBACK_LEASE_SECONDS": "soon"}, "POSTBACK_LEASE_SECONDS: invalid literal"),
    ({"POSTBACK_BREAKER_ENABLED": "maybe"}, "POSTBACK_BREAKER_ENABLED: expected true/false"),
    ({"POSTBACK_RETRY_BASE_DELAY": "x"}, "POSTBACK_RETRY_BASE_DELAY: could not convert"),
])
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, InvalidInput)


def test_overrides_by_setting_name_or_group() -> None:
    s = Settings().with_overrides(lease_seconds=5, admin_token="t")
    assert (s.delivery.lease_seconds, s.security.admin_token) == (5, "t")
    assert s.delivery.default_timeout == Settings().delivery.default_timeout
    assert s.with_overrides(retry=RetryPolicy(max_attempts=1)).retry.max_attempts == 1
    with pytest.raises(SettingsError, match="unknown setting 'lease'"):
        s.with_overrides(lease=1)


def test_breaker_defaults_live_in_the_domain_config_only() -> None:
    from postback_worker.domain.guards import BreakerConfig

    assert isinstance(Settings().breaker, BreakerConfig)
    assert Settings().breaker.min_attempts == BreakerConfig().min_attempts


def test_one_redis_settings_object_builds_broker_options() -> None:
    plain = Settings.build(redis_url="redis://h:6379/1", visibility_timeout=99).redis
    assert plain.broker_transport_options() == {"visibility_timeout": 99}
    assert plain.effective_broker_url == "redis://h:6379/1"
    sentinel = Settings.build(redis_url="sentinel://s:26379/0", redis_sentinel_master="m").redis
    assert sentinel.broker_transport_options()["master_name"] == "m"
