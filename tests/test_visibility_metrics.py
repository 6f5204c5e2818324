"""GET /metrics: figures computed at scrape time from PostgreSQL and Redis, compared with what
the partner server received; deploy/ rules and dashboards use only names that exist."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import requests
import yaml
from conftest import ADMIN, ROOT
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from support.partner import PartnerServer
from support.visibility_seed import Clock, Scenario, Served, seed

from postback_worker.ops.visibility import metrics
from postback_worker.pipeline.processing import Pipeline
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store import schema
from postback_worker.store.repo import Store


@pytest.fixture()
def scenario(store: Store, partner: PartnerServer, pipeline: Pipeline,
             clock: Clock) -> Scenario:
    return seed(store, partner, pipeline, clock)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(settings: Settings, store: Store, client: redis.Redis, clock: Clock) -> Samples:
    return parse(metrics.render(settings, store, client, clock).decode())


def test_metrics_match_partner_and_database(
    settings: Settings, store: Store, partner: PartnerServer, scenario: Scenario,
    clock: Clock, redis_client: redis.Redis,
) -> None:
    redis_client.hset("pbw:circuit:p-down", mapping={"state": "open", "opened_at": "1"})
    redis_client.hset("pbw:circuit:p-blocked", "state", "half_open")
    Producer(settings).send_conversions([{"transaction_id": "tx-queued-1"},
                                         {"transaction_id": "tx-queued-2"}])
    redis_client.rpush("retries", "x", "y", "z")
    s = scrape(settings, store, redis_client, clock)
    received = partner.received()
    by_path = Counter(r.path for r in received)
    assert value(s, "postback_postbacks_delivered_total", partner="p-ok") == by_path["/ok"] == 6
    assert value(s, "postback_postbacks_failed_total", partner="p-down",
                 failure_class="partner_5xx") == 3
    assert value(s, "postback_postbacks_failed_total", partner="p-blocked",
                 failure_class="blocked") == 2
    assert value(s, "postback_postbacks_failed_total", partner="p-gone",
                 failure_class="config") == 1
    # The test fire (a p-ok postback answered 500) is nowhere.
    assert value(s, "postback_postbacks_failed_total", partner="p-ok",
                 failure_class="partner_5xx") == 0
    assert value(s, "postback_attempts_total", partner="p-down",
                 failure_class="partner_5xx") == by_path["/down"] == 13
    assert sum(v for (n, _), v in s.items() if n == "postback_attempts_total") == len(received)
    # Histograms over the window: every attempt is in the +Inf bucket, none is the test's 10 s.
    for pid, path in (("p-ok", "/ok"), ("p-down", "/down")):
        assert value(s, "postback_attempt_duration_seconds_bucket", partner=pid,
                     le="+Inf") == by_path[path]
        assert value(s, "postback_attempt_duration_seconds_gcount", partner=pid) == by_path[path]
    assert value(s, "postback_attempt_duration_seconds_bucket", partner="p-ok", le="5.0") == 6
    assert value(s, "postback_ingest_to_delivery_seconds_gcount", partner="p-ok") == 6
    assert value(s, "postback_ingest_to_delivery_seconds_bucket", partner="p-ok",
                 le="0.5") == 6
    # Conversions by final state, lost ones included; the test fire's conversion is not.
    assert value(s, "postback_conversions", state="expired_click") == 2
    assert value(s, "postback_conversions", state="unknown_click") == 1
    with store.engine.connect() as conn:
        attributed = conn.execute(select(schema.conversions.c.id).where(
            schema.conversions.c.state == "attributed")).all()
    assert value(s, "postback_conversions", state="attributed") == len(attributed) - 1 == 13
    # Accepted and committed, waiting for a worker: 2 events, one wake-up message.
    assert value(s, "postback_conversions", state="received") == 2
    assert value(s, "postback_queue_depth", queue="conversions") == 1
    assert value(s, "postback_queue_depth", queue="retries") == 3
    assert value(s, "postback_queue_depth", queue="replay") == 0
    assert value(s, "postback_dead_letters", failure_class="partner_5xx") == 3
    assert value(s, "postback_dead_letters", failure_class="blocked") == 2
    assert value(s, "postback_retry_backlog") == 1
    with store.engine.connect() as conn:
        due = conn.execute(select(schema.postbacks.c.next_attempt_at).where(
            schema.postbacks.c.state == "retry_scheduled")).scalar_one()
    assert value(s, "postback_retry_oldest_due_timestamp_seconds") == due.timestamp()
    assert value(s, "postback_retry_overdue_seconds") == 0
    clock.advance(900)
    later = scrape(settings, store, redis_client, clock)
    assert value(later, "postback_retry_overdue_seconds") == pytest.approx(
        (clock() - due).total_seconds())
    # Backlog age per partner: only p-down has a postback not yet delivered nor given up.
    with store.engine.connect() as conn:
        created = conn.execute(select(schema.postbacks.c.created_at).where(
            schema.postbacks.c.state == "retry_scheduled")).scalar_one()
    assert value(s, "postback_backlog", partner="p-down") == 1
    assert value(s, "postback_backlog_age_seconds", partner="p-down") == pytest.approx(
        (clock() - timedelta(seconds=900) - created).total_seconds())
    assert value(later, "postback_backlog_age_seconds", partner="p-down") == pytest.approx(
        (clock() - created).total_seconds())
    assert ("postback_backlog_age_seconds", (("partner", "p-ok"),)) not in s
    assert value(s, "postback_circuit_state", partner="p-down", state="open") == 1
    assert value(s, "postback_circuit_state", partner="p-down", state="closed") == 0
    assert value(s, "postback_circuit_state", partner="p-blocked", state="half_open") == 1
    assert value(s, "postback_circuit_state", partner="p-ok", state="closed") == 1
    assert value(s, "postback_scrape_error", source="database") == 0
    assert value(s, "postback_scrape_error", source="redis") == 0


def test_metrics_window_moves_with_time(settings: Settings, store: Store, scenario: Scenario,
                                        clock: Clock, redis_client: redis.Redis) -> None:
    clock.advance(settings.metrics.window_seconds + 60)
    s = scrape(settings, store, redis_client, clock)
    assert value(s, "postback_attempt_duration_seconds_gcount", partner="p-ok") == 0
    assert value(s, "postback_recent_attempts", partner="p-ok", failure_class="delivered") == 0
    assert value(s, "postback_postbacks_delivered_total", partner="p-ok") == 6


def test_metrics_endpoint_auth(settings: Settings, store: Store,
                               redis_client: redis.Redis) -> None:
    with Served(settings.with_overrides(metrics_token="scrape-me")) as api:
        assert requests.get(f"{api}/metrics").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(f"{api}/metrics", headers=wrong).status_code == 401
        for headers in (ADMIN, {"Authorization": "Bearer scrape-me"}):
            r = requests.get(f"{api}/metrics", headers=headers)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert "postback_queue_depth" in r.text


def test_redis_down_is_reported_not_fatal(settings: Settings, store: Store) -> None:
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    s = parse(metrics.render(settings, store, dead).decode())
    assert value(s, "postback_scrape_error", source="redis") == 1
    assert value(s, "postback_scrape_error", source="database") == 0
    assert value(s, "postback_conversions", state="expired_click") == 0


def _deploy_metric_names() -> set[str]:
    names: set[str] = set()
    for path in [*Path(ROOT, "deploy/prometheus").glob("*.yml"),
                 *Path(ROOT, "deploy/grafana").glob("*.json")]:
        text = path.read_text()
        if path.suffix == ".json":
            assert json.loads(text)["panels"]
        elif path.name == "alerts.yml":


            rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
            assert rules and all({"alert", "expr", "labels"} <= set(r) for r in rules)
        else:
            assert yaml.safe_load(text)["scrape_configs"][0]["metrics_path"] == "/metrics"
        names.update(re.findall(r"\bpostback_[a-z_]+", text))
    return names


def test_deploy_rules_and_dashboard_use_exposed_names(settings: Settings, store: Store,
                                                      redis_client: redis.Redis) -> None:
    used = _deploy_metric_names()
    assert used, "deploy/prometheus and deploy/grafana reference no metric"
    exposed = set(metrics.METRIC_NAMES)
    suffixes = ("_bucket", "_gcount", "_gsum")
    unknown = {n for n in used if n not in exposed
               and not any(n.endswith(x) and n[: -len(x)] in exposed for x in suffixes)
               and n not in {"postback_worker"}}
    assert unknown == set()
    text = metrics.render(settings, store, redis_client).decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    # Every declared name is really exposed (counters are declared with their _total).
    declared = {n.removesuffix("_total") for n in metrics.METRIC_NAMES}
    assert declared - families == set()
