"""Prometheus metrics computed at scrape time from PostgreSQL and Redis.

Why scrape time and not per-process counters: workers run as many processes on many machines,
and PostgreSQL already holds every attempt and postback. Reading them when Prometheus scrapes
gives one exact, fleet-wide figure from any API replica, survives worker restarts, and needs no
multiprocess directory or per-worker scrape targets. On PostgreSQL the history-wide figures
come from trigger-kept rollups (store/rollups.py), so a scrape costs the same at 10 million
rows as at 10 thousand; windows read rows only for the window. The two histograms (attempt duration,
ingest-to-delivery latency) are built the same way over a sliding window
(`metrics_window_seconds`) and exposed as gauge histograms: `histogram_quantile()` reads their
`_bucket` series directly (no `rate()`), e.g. the p95 of the last 15 minutes.

Counters (`*_total`) count the rows PostgreSQL retains; a retention purge lowers them, which
Prometheus reads as a counter reset, so alert rules use the windowed gauges instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from postback_worker.domain.attribution import ConversionState
from postback_worker.domain.postback import PostbackState
from postback_worker.settings import Settings
from postback_worker.store.figures import TOTAL, RawFigures, figures_for
from postback_worker.store.repo import Store
from postback_worker.store.rollups import DURATION_BOUNDS, LATENCY_BOUNDS
from postback_worker.worker.queues import QUEUES

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = DURATION_BOUNDS
LATENCY_BUCKETS = LATENCY_BOUNDS
CIRCUIT_STATES = ("closed", "open", "half_open")
CIRCUIT_KEY = "pbw:circuit:{}"
# Kombu's Redis transport keeps priority messages in "<queue>\x06\x16<priority>" lists.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)

# Every metric this module exposes (deploy/ rules and dashboards use exactly these).
METRIC_NAMES = (
    "postback_postbacks_delivered_total",
    "postback_postbacks_failed_total",
    "postback_attempts_total",
    "postback_recent_attempts",
    "postback_attempt_duration_seconds",
    "postback_ingest_to_delivery_seconds",
    "postback_conversions",
    "postback_queue_depth",
    "postback_queue_unacked",
    "postback_dead_letters",
    "postback_retry_backlog",
    "postback_retry_oldest_due_timestamp_seconds",
    "postback_retry_overdue_seconds",
    "postback_backlog",
    "postback_backlog_age_seconds",
    "postback_circuit_state",
    "postback_alerts_open",
    "postback_operator_events_undelivered",
    "postback_operator_events_oldest_undelivered_seconds",
    "postback_metrics_window_seconds",
    "postback_scrape_error",
)


def queue_depths(redis_client: Any, queues: Sequence[str] = QUEUES) -> dict[str, int]:
    """Messages waiting in each Celery queue (a Redis list per queue and priority)."""
    pipe = redis_client.pipeline()
    for q in queues:
        pipe.llen(q)
        for p in PRIORITY_STEPS:
            pipe.llen(f"{q}{PRIORITY_SEP}{p}")
    values = pipe.execute()
    per = 1 + len(PRIORITY_STEPS)
    return {q: int(sum(values[i * per:(i + 1) * per])) for i, q in enumerate(queues)}


def circuit_states(redis_client: Any, partner_ids: Sequence[str]) -> dict[str, str]:
    """Each partner's circuit (`pbw:circuit:{id}` hash, field `state`); absent means closed."""
    if not partner_ids:
        return {}
    pipe = redis_client.pipeline()
    for pid in partner_ids:
        pipe.hget(CIRCUIT_KEY.format(pid), "state")
    out = {}
    for pid, raw in zip(partner_ids, pipe.execute(), strict=True):
        state = raw.decode() if isinstance(raw, bytes) else raw
        out[pid] = state if state in CIRCUIT_STATES else "closed"
    return out


class VisibilityCollector(Collector):
    """Builds every metric family on each scrape."""

    def __init__(self, settings: Settings, store: Store, redis_client: Any,
                 clock: Callable[[], datetime] | None = None, broker_client: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.redis = redis_client  # circuit states (settings.redis.url)
        self.broker = broker_client or redis_client  # Celery queues (the broker)
        self.clock = clock or (lambda: datetime.now(UTC))

    def collect(self) -> Iterable[Metric]:
        now = self.clock()
        errors = GaugeMetricFamily("postback_scrape_error",
                                   "1 when a source could not be read during this scrape",
                                   labels=["source"])
        families: list[Metric] = []
        partner_ids: list[str] = []
        try:
            families.extend(self._database(now))
            partner_ids = [p["id"] for p in self.store.list_partners()]
            errors.add_metric(["database"], 0)
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.error("metrics: database unavailable: %s", exc)
            errors.add_metric(["database"], 1)
        try:
            families.extend(self._redis(partner_ids))
            errors.add_metric(["redis"], 0)
        except Exception as exc:  # noqa: BLE001
            log.error("metrics: redis unavailable: %s", exc)
            errors.add_metric(["redis"], 1)
        window = GaugeMetricFamily("postback_metrics_window_seconds",
                                   "Window the postback_recent_* gauges and histograms cover")
        window.add_metric([], float(self.settings.metrics.window_seconds))
        families.extend([window, errors])
        return families

    # -- PostgreSQL -----------------------------------------------------------------------

    def _database(self, now: datetime) -> list[Metric]:
        since = now - timedelta(seconds=self.settings.metrics.window_seconds)
        until = now + timedelta(microseconds=1)  # the window includes `now`
        figs = figures_for(self.store)
        return [
            *self._postbacks(figs),
            self._attempts_total(figs),
            self._recent_attempts(figs, since, now),
            self._histogram(
                "postback_attempt_duration_seconds",
                "Attempt durations within the last postback_metrics_window_seconds, by partner",
                DURATION_BUCKETS, figs.duration_histogram(since, until)),
            self._histogram(
                "postback_ingest_to_delivery_seconds",
                "Seconds from conversion received to postback delivered, for postbacks "
                "delivered within the last postback_metrics_window_seconds, by partner",
                LATENCY_BUCKETS, figs.latency_histogram(since, until)),
            self._conversions(figs),
            self._dead_letters(figs),
            *self._backlog(figs, now),
            self._alerts(figs),
            *self._operator_events(now),
        ]

    def _postbacks(self, figs: RawFigures) -> list[Metric]:
        delivered = CounterMetricFamily(
            "postback_postbacks_delivered", "Postbacks delivered, by partner", labels=["partner"])
        failed = CounterMetricFamily(
            "postback_postbacks_failed",
            "Postbacks that failed for good (dead-lettered), by partner and failure class",
            labels=["partner", "failure_class"])
        for (partner, bucket, cls), n in sorted(figs.postback_outcomes().items()):
            if bucket == PostbackState.DELIVERED:
                delivered.add_metric([partner], n)
            else:
                failed.add_metric([partner, cls], n)
        return [delivered, failed]

    def _attempts_total(self, figs: RawFigures) -> Metric:
        fam = CounterMetricFamily(
            "postback_attempts", "Delivery attempts, by partner and failure class "
            "(failure_class=\"delivered\" for successes)", labels=["partner", "failure_class"])
        for (partner, cls), n in sorted(figs.attempt_totals().items()):
            fam.add_metric([partner, cls], n)
        return fam

    def _recent_attempts(self, figs: RawFigures, since: datetime, now: datetime) -> Metric:
        fam = GaugeMetricFamily(
            "postback_recent_attempts",
            "Attempts within the last postback_metrics_window_seconds, by partner and class",
            labels=["partner", "failure_class"])
        totals: dict[tuple[str, str], int] = {}
        for (partner, _code, cls), n in figs.attempt_window(
                since, now + timedelta(seconds=1)).items():
            totals[(partner, cls)] = totals.get((partner, cls), 0) + n
        for (partner, cls), n in sorted(totals.items()):
            fam.add_metric([partner, cls], n)
        return fam

    def _histogram(self, name: str, doc: str, bounds: Sequence[float],
                   counts: dict[tuple[str, float], int]) -> Metric:
        """Cumulative buckets from per-bound counts; the sum from the total microseconds."""
        fam = GaugeHistogramMetricFamily(name, doc, labels=["partner"])
        for partner in sorted({p for p, _ in counts}):
            seen, buckets = 0, []
            for b in bounds:
                seen += counts.get((partner, b), 0)
                buckets.append((_le(b), float(seen)))
            seen += counts.get((partner, math.inf), 0)
            buckets.append(("+Inf", float(seen)))
            total = counts.get((partner, TOTAL), 0) / 1_000_000
            fam.add_metric([partner], buckets, gsum_value=total)
        return fam

    def _conversions(self, figs: RawFigures) -> Metric:
        fam = GaugeMetricFamily(
            "postback_conversions",
            "Conversions by state (expired_click and unknown_click are lost conversions)",
            labels=["state"])
        counts = {s.value: 0 for s in ConversionState}
        counts.update(figs.conversion_states())
        for state, n in sorted(counts.items()):
            fam.add_metric([state], n)
        return fam

    def _dead_letters(self, figs: RawFigures) -> Metric:
        fam = GaugeMetricFamily(
            "postback_dead_letters",
            "Dead letters waiting for action (postback still dead-lettered), by failure class",
            labels=["failure_class"])
        by_class: dict[str, int] = {}
        for (_partner, cls), n in figs.dead_letters().items():
            by_class[cls] = by_class.get(cls, 0) + n
        for cls, n in sorted(by_class.items()):
            fam.add_metric([cls], n)
        return fam

    def _backlog(self, figs: RawFigures, now: datetime) -> list[Metric]:
        n, oldest = figs.retry_backlog()
        backlog = GaugeMetricFamily("postback_retry_backlog",
                                    "Postbacks waiting for a retry (retry_scheduled or queued)")
        backlog.add_metric([], n)
        due = GaugeMetricFamily(
            "postback_retry_oldest_due_timestamp_seconds",
            "Unix time the oldest waiting retry is due (absent when the backlog is empty)")
        overdue = GaugeMetricFamily(
            "postback_retry_overdue_seconds",
            "Seconds the oldest waiting retry is past its due time (0 when none is overdue)")
        if oldest is not None:
            due.add_metric([], oldest.timestamp())
        overdue.add_metric([], overdue_seconds(oldest, now))
        age = GaugeMetricFamily(
            "postback_backlog_age_seconds",
            "Per partner: seconds since the oldest postback not yet delivered nor given up "
            "was created (waiting for a retry, a limit, the breaker or a pause all count); "
            "absent when the partner has no backlog", labels=["partner"])
        size = GaugeMetricFamily(
            "postback_backlog", "Per partner: postbacks not yet delivered nor given up",
            labels=["partner"])
        for partner, (count, created) in sorted(figs.backlog_by_partner().items()):
            age.add_metric([partner], backlog_age_seconds(created, now))
            size.add_metric([partner], count)
        return [backlog, due, overdue, age, size]

    def _alerts(self, figs: RawFigures) -> Metric:
        fam = GaugeMetricFamily("postback_alerts_open", "Open alerts by kind", labels=["kind"])
        for kind, n in sorted(figs.open_alerts_by_kind().items()):
            fam.add_metric([kind], n)
        return fam

    def _operator_events(self, now: datetime) -> list[Metric]:
        n, oldest = self.store.undelivered_events()
        count = GaugeMetricFamily(
            "postback_operator_events_undelivered",
            "Operator events not yet received by the webhook (not planned yet, or in a "
            "delivery still being retried)")
        count.add_metric([], n)
        age = GaugeMetricFamily(
            "postback_operator_events_oldest_undelivered_seconds",
            "Seconds since the oldest undelivered operator event happened (0 when none)")
        age.add_metric([], backlog_age_seconds(oldest, now) if oldest is not None else 0.0)
        return [count, age]

    # -- Redis ----------------------------------------------------------------------------

    def _redis(self, partner_ids: Sequence[str]) -> list[Metric]:
        depth = GaugeMetricFamily("postback_queue_depth",
                                  "Messages waiting in each Celery queue", labels=["queue"])
        for q, n in queue_depths(self.broker).items():
            depth.add_metric([q], n)
        unacked = GaugeMetricFamily(
            "postback_queue_unacked",
            "Messages handed to workers and not yet acknowledged (all queues)")
        unacked.add_metric([], int(self.broker.hlen("unacked")))
        circuit = GaugeMetricFamily(
            "postback_circuit_state",
            "Circuit breaker state per partner: 1 for the current state, 0 for the others",
            labels=["partner", "state"])
        for pid, state in sorted(circuit_states(self.redis, partner_ids).items()):
            for s in CIRCUIT_STATES:
                circuit.add_metric([pid, s], 1 if s == state else 0)
        return [depth, unacked, circuit]


def overdue_seconds(oldest_due: datetime | None, now: datetime) -> float:
    if oldest_due is None:
        return 0.0
    return max(0.0, (now - oldest_due).total_seconds())


def backlog_age_seconds(oldest_created: datetime, now: datetime) -> float:
    return max(0.0, (now - oldest_created).total_seconds())


def _le(bound: float) -> str:
    return repr(float(bound))


def render(settings: Settings, store: Store, redis_client: Any,
           clock: Callable[[], datetime] | None = None, broker_client: Any = None) -> bytes:
    """The Prometheus text exposition of every metric."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VisibilityCollector(settings, store, redis_client, clock, broker_client))
    return generate_latest(registry)
