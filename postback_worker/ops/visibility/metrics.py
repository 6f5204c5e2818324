"""Prometheus metrics computed at scrape time from PostgreSQL and Redis.

Why scrape time and not per-process counters: workers run as many processes on many machines,
and PostgreSQL already holds every attempt and postback. Counting rows when Prometheus scrapes
gives one exact, fleet-wide figure from any API replica, survives worker restarts, and needs no
multiprocess directory or per-worker scrape targets. The two histograms (attempt duration,
ingest-to-delivery latency) are built the same way over a sliding window
(`metrics_window_seconds`) and exposed as gauge histograms: `histogram_quantile()` reads their
`_bucket` series directly (no `rate()`), e.g. the p95 of the last 15 minutes.

Counters (`*_total`) count the rows PostgreSQL retains; a retention purge lowers them, which
Prometheus reads as a counter reset, so alert rules use the windowed gauges instead.
"""

from __future__ import annotations

import logging
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
from sqlalchemy import func, select

from postback_worker.domain.attribution import ConversionState
from postback_worker.ops.visibility import figures as fg
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store
from postback_worker.worker.queues import QUEUES

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
                   86400.0)
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
    "postback_circuit_state",
    "postback_alerts_open",
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
        with self.store.engine.connect() as conn:
            ex = fg.Exclusions(conn)
            return [
                *self._postbacks(conn, ex),
                self._attempts_total(conn, ex),
                self._recent_attempts(conn, ex, since, now),
                self._durations(conn, ex, since, now),
                self._latency(conn, ex, since, now),
                self._conversions(conn, ex),
                self._dead_letters(conn, ex),
                *self._backlog(conn, ex, now),
                self._alerts(conn),
            ]

    def _postbacks(self, conn: Any, ex: fg.Exclusions) -> list[Metric]:
        delivered = CounterMetricFamily(
            "postback_postbacks_delivered", "Postbacks delivered, by partner", labels=["partner"])
        failed = CounterMetricFamily(
            "postback_postbacks_failed",
            "Postbacks that failed for good (dead-lettered), by partner and failure class",
            labels=["partner", "failure_class"])
        rows = conn.execute(
            select(fg.P.partner_id, fg.P.state, fg.P.last_class, func.count())
            .where(fg.P.state.in_(["delivered", fg.FAILED_POSTBACK]), ex.real_postback())
            .group_by(fg.P.partner_id, fg.P.state, fg.P.last_class)
        )
        for partner, state, cls, n in rows:
            if state == "delivered":
                delivered.add_metric([partner], int(n))
            else:
                failed.add_metric([partner, cls or "config"], int(n))
        return [delivered, failed]

    def _attempts_total(self, conn: Any, ex: fg.Exclusions) -> Metric:
        fam = CounterMetricFamily(
            "postback_attempts", "Delivery attempts, by partner and failure class "
            "(failure_class=\"delivered\" for successes)", labels=["partner", "failure_class"])
        rows = conn.execute(
            select(fg.P.partner_id, fg.A.failure_class, func.count())
            .select_from(t.attempts.join(t.postbacks, fg.P.id == fg.A.postback_id))
            .where(fg.real_attempt(), ex.real_postback())
            .group_by(fg.P.partner_id, fg.A.failure_class)
        )
        for partner, cls, n in rows:
            fam.add_metric([partner, cls], int(n))
        return fam

    def _recent_attempts(self, conn: Any, ex: fg.Exclusions, since: datetime,
                         now: datetime) -> Metric:
        fam = GaugeMetricFamily(
            "postback_recent_attempts",
            "Attempts within the last postback_metrics_window_seconds, by partner and class",
            labels=["partner", "failure_class"])
        totals: dict[tuple[str, str], int] = {}
        for row in fg.attempt_window(conn, ex, since, now + timedelta(seconds=1)):
            key = (row["partner_id"], row["failure_class"])
            totals[key] = totals.get(key, 0) + row["count"]
        for (partner, cls), n in sorted(totals.items()):
            fam.add_metric([partner, cls], n)
        return fam

    def _durations(self, conn: Any, ex: fg.Exclusions, since: datetime,
                   now: datetime) -> Metric:
        fam = GaugeHistogramMetricFamily(
            "postback_attempt_duration_seconds",
            "Attempt durations within the last postback_metrics_window_seconds, by partner",
            labels=["partner"])
        value = fg.duration_seconds()
        rows = conn.execute(
            select(fg.P.partner_id, *fg.bucket_counts(value, DURATION_BUCKETS), func.count(),
                   func.coalesce(func.sum(value), 0.0))
            .select_from(t.attempts.join(t.postbacks, fg.P.id == fg.A.postback_id))
            .where(fg.A.started_at >= since, fg.A.started_at <= now, fg.real_attempt(),
                   ex.real_postback())
            .group_by(fg.P.partner_id)
        )
        for row in rows:
            _add_histogram(fam, row[0], DURATION_BUCKETS, row[1:])
        return fam

    def _latency(self, conn: Any, ex: fg.Exclusions, since: datetime, now: datetime) -> Metric:
        fam = GaugeHistogramMetricFamily(
            "postback_ingest_to_delivery_seconds",
            "Seconds from conversion received to postback delivered, for postbacks delivered "
            "within the last postback_metrics_window_seconds, by partner", labels=["partner"])
        value = fg.seconds_between(fg.P.delivered_at, fg.P.received_at, self.store.dialect)
        rows = conn.execute(
            select(fg.P.partner_id, *fg.bucket_counts(value, LATENCY_BUCKETS), func.count(),
                   func.coalesce(func.sum(value), 0.0))
            .where(fg.P.state == "delivered", fg.P.delivered_at >= since,
                   fg.P.delivered_at <= now, ex.real_postback())
            .group_by(fg.P.partner_id)
        )
        for row in rows:
            _add_histogram(fam, row[0], LATENCY_BUCKETS, row[1:])
        return fam

    def _conversions(self, conn: Any, ex: fg.Exclusions) -> Metric:
        fam = GaugeMetricFamily(
            "postback_conversions",
            "Conversions by state (expired_click and unknown_click are lost conversions)",
            labels=["state"])
        counts = {s.value: 0 for s in ConversionState}
        for state, n in conn.execute(
            select(fg.C.state, func.count()).where(ex.real_conversion()).group_by(fg.C.state)
        ):
            counts[state] = int(n)
        for state, n in sorted(counts.items()):
            fam.add_metric([state], n)
        return fam

    def _dead_letters(self, conn: Any, ex: fg.Exclusions) -> Metric:
        fam = GaugeMetricFamily(
            "postback_dead_letters",
            "Dead letters waiting for action (postback still dead-lettered), by failure class",
            labels=["failure_class"])
        for cls, n in conn.execute(
            select(fg.D.failure_class, func.count())
            .select_from(t.dead_letters.join(t.postbacks, fg.P.id == fg.D.postback_id))
            .where(fg.P.state == fg.FAILED_POSTBACK, ex.real_postback(fg.D.postback_id))
            .group_by(fg.D.failure_class)
        ):
            fam.add_metric([cls], int(n))
        return fam

    def _backlog(self, conn: Any, ex: fg.Exclusions, now: datetime) -> list[Metric]:
        n, oldest = conn.execute(
            select(func.count(), func.min(fg.P.next_attempt_at))
            .where(fg.P.state.in_(["retry_scheduled", "queued"]), ex.real_postback())
        ).one()
        oldest = fg.utc(oldest)
        backlog = GaugeMetricFamily("postback_retry_backlog",
                                    "Postbacks waiting for a retry (retry_scheduled or queued)")
        backlog.add_metric([], int(n))
        due = GaugeMetricFamily(
            "postback_retry_oldest_due_timestamp_seconds",
            "Unix time the oldest waiting retry is due (absent when the backlog is empty)")
        overdue = GaugeMetricFamily(
            "postback_retry_overdue_seconds",
            "Seconds the oldest waiting retry is past its due time (0 when none is overdue)")
        if oldest is not None:
            due.add_metric([], oldest.timestamp())
        overdue.add_metric([], overdue_seconds(oldest, now))
        return [backlog, due, overdue]

    def _alerts(self, conn: Any) -> Metric:
        fam = GaugeMetricFamily("postback_alerts_open", "Open alerts by kind", labels=["kind"])
        for kind, n in conn.execute(
            select(t.alerts.c.kind, func.count()).where(t.alerts.c.state == "open")
            .group_by(t.alerts.c.kind)
        ):
            fam.add_metric([kind], int(n))
        return fam

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


def _add_histogram(fam: GaugeHistogramMetricFamily, partner: str, bounds: Sequence[float],
                   values: Sequence[Any]) -> None:
    cumulative = [int(v) for v in values[:len(bounds)]]
    count, total = int(values[len(bounds)]), float(values[len(bounds) + 1] or 0.0)
    buckets = [(_le(b), float(n)) for b, n in zip(bounds, cumulative, strict=True)]
    buckets.append(("+Inf", float(count)))
    fam.add_metric([partner], buckets, gsum_value=total)


def _le(bound: float) -> str:
    return repr(float(bound))


def render(settings: Settings, store: Store, redis_client: Any,
           clock: Callable[[], datetime] | None = None, broker_client: Any = None) -> bytes:
    """The Prometheus text exposition of every metric."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VisibilityCollector(settings, store, redis_client, clock, broker_client))
    return generate_latest(registry)
