"""Alert evaluation against PostgreSQL and Redis, the alert history, and the sinks.

`evaluate()` gathers a snapshot, applies the pure rules (`alert_rules`), records one row per
episode in `alerts` (fired once, resolved once) and sends each change to the sinks (the log
and, if configured, a Slack-compatible webhook). A PostgreSQL advisory lock makes concurrent
evaluations (two beat messages, two workers) take turns, so nothing fires twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from postback_worker.domain import operator_events as oe
from postback_worker.domain.failures import NOT_THE_PARTNERS, FailureClass
from postback_worker.ops.visibility import figures as fg
from postback_worker.ops.visibility.alert_rules import (
    Condition,
    OfferLost,
    PartnerWindow,
    Snapshot,
    Thresholds,
    conditions,
    transitions,
)
from postback_worker.ops.visibility.metrics import backlog_age_seconds, circuit_states
from postback_worker.settings import Settings
from postback_worker.store import alerts as alert_store
from postback_worker.store.figures import RawFigures, figures_for
from postback_worker.store.repo import Store

log = logging.getLogger("postback_worker.alerts")


@dataclass(frozen=True)
class AlertEvent:
    """A change sent to the sinks."""

    action: str  # "fire" or "resolve"
    alert_id: int
    key: str
    kind: str
    severity: str
    partner_id: str | None
    text: str


class Sink(Protocol):
    def send(self, event: AlertEvent) -> None: ...


class LogSink:
    def send(self, event: AlertEvent) -> None:
        level = logging.WARNING if event.action == "fire" else logging.INFO
        log.log(level, "alert %s #%d %s: %s", event.action, event.alert_id, event.key,
                event.text)


class WebhookSink:
    """POSTs {"text": ...} (Slack incoming-webhook format); failures are logged, not raised."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    def send(self, event: AlertEvent) -> None:
        try:
            resp = requests.post(self.url, json={"text": event.text}, timeout=self.timeout,
                                 allow_redirects=False)
            if resp.status_code >= 300:
                log.error("alert webhook at %s answered HTTP %d", self.host, resp.status_code)
        except requests.RequestException as exc:
            log.error("alert webhook at %s failed: %s", self.host, type(exc).__name__)

    @property
    def host(self) -> str:
        """Only the host is logged: incoming-webhook URLs carry their secret in the path."""
        return urlsplit(self.url).netloc.rpartition("@")[2] or "(invalid URL)"


def sinks_for(settings: Settings) -> list[Sink]:
    sinks: list[Sink] = [LogSink()]
    if settings.alerts.webhook_url:
        sinks.append(WebhookSink(settings.alerts.webhook_url))
    return sinks


def thresholds(settings: Settings) -> Thresholds:
    return Thresholds(**asdict(settings.alerts), egress_ips=settings.delivery.egress_ips)


def snapshot(figures: RawFigures, redis_client: Any, now: datetime,
             window_seconds: int) -> Snapshot:
    """The figures the rules need, from PostgreSQL (and circuit states from Redis)."""
    since = now - timedelta(seconds=window_seconds)
    until = now + timedelta(microseconds=1)
    partners: dict[str, dict[str, Any]] = {}
    for (pid, status, cls), n in sorted(figures.attempt_window(since, until).items(),
                                        key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        if cls in NOT_THE_PARTNERS:
            continue  # our egress proxy failed: not the partner's failure rate
        p = partners.setdefault(pid, {"attempts": 0, "failed": 0, "codes": {}, "classes": {}})
        p["attempts"] += n
        if cls != FailureClass.DELIVERED:
            p["failed"] += n
            code = "none" if status is None else str(status)
            p["codes"][code] = p["codes"].get(code, 0) + n
            p["classes"][cls] = p["classes"].get(cls, 0) + n
    by_partner: dict[str, int] = {}
    by_class: dict[str, int] = {}
    for (pid, cls), n in sorted(figures.dead_letters_window(since, until).items()):
        by_partner[pid] = by_partner.get(pid, 0) + n
        by_class[cls] = by_class.get(cls, 0) + n
    backlog, oldest = figures.retry_backlog()
    rows = figures.store.list_partners()
    partner_ids = [p["id"] for p in rows]
    # Partners paused because they answered 410 Gone -> their pause reason.
    gone = {p["id"]: p["paused_reason"] or "410 Gone" for p in rows
            if p["paused"] and p.get("paused_by") == "gone"}
    circuits = circuit_states(redis_client, partner_ids) if redis_client is not None else {}
    lost = [OfferLost(r["offer_id"], r["conversions"], r["expired_click"], r["unknown_click"])
            for r in fg.lost_window(figures, since, until)]
    ages = {pid: (n, backlog_age_seconds(created, now))
            for pid, (n, created) in figures.backlog_by_partner().items()}
    return Snapshot(
        now=now,
        partners=[PartnerWindow(pid, p["attempts"], p["failed"], p["codes"], p["classes"])
                  for pid, p in sorted(partners.items())],
        new_dead_letters=sum(by_partner.values()),
        dead_letters_by_partner=by_partner, dead_letters_by_class=by_class,
        retry_backlog=backlog, oldest_due=oldest, circuits=circuits, lost=lost,
        backlog_age=ages, gone=gone,
    )


def _fire_text(c: Condition) -> str:
    return f"FIRING ({c.severity}): {c.message}"


def _resolve_text(row: dict[str, Any], c: Condition | None) -> str:
    started = fg.utc(row["started_at"])
    since = started.strftime("%Y-%m-%d %H:%M UTC") if started else "?"
    now_figure = (f"now {c.summary}" if c is not None
                  else "no longer observed (no traffic in the window)")
    return f"RESOLVED: {row['key']} (firing since {since}): {now_figure}."


def evaluate(settings: Settings, store: Store, redis_client: Any, *,
             now: datetime, sinks: Sequence[Sink] | None = None) -> list[AlertEvent]:
    """One evaluation at `now`: record fired/resolved alerts and send them to the sinks."""
    events: list[AlertEvent] = []
    with alert_store.evaluation(store) as tx:
        if tx is None:
            log.info("alert evaluation skipped: another evaluation is running")
            return []
        snap = snapshot(figures_for(store), redis_client, now, settings.alerts.window_seconds)
        observed = conditions(snap, thresholds(settings))
        open_rows = tx.open_alerts()
        for tr in transitions(observed, set(open_rows)):
            if tr.action == "fire":
                assert tr.condition is not None
                events.append(_fire(tx, tr.condition, now))
            else:
                events.append(_resolve(tx, open_rows.pop(tr.key), tr.condition, now))
        by_key = {c.key: c for c in observed}
        for key, row in open_rows.items():
            c = by_key.get(key)
            if c is None or any(e.key == key for e in events):
                continue
            details = {**json.loads(row["details"] or "{}"), "latest": _jsonable(c.details)}
            tx.touch(row["id"], details, now)
    for event in events:
        for sink in sinks if sinks is not None else sinks_for(settings):
            sink.send(event)
    return events


def _jsonable(details: Any) -> Any:
    return json.loads(json.dumps(details, default=str))


def _fire(tx: alert_store.AlertTx, c: Condition, now: datetime) -> AlertEvent:
    details = {**_jsonable(c.details), "summary": c.summary}
    alert_id = tx.fire(key=c.key, kind=c.kind, partner_id=c.partner_id, severity=c.severity,
                       message=c.message, details=details, now=now)
    tx.event(oe.ALERT_FIRED, now, {
        "alert_id": alert_id, "key": c.key, "kind": c.kind, "severity": c.severity,
        "partner_id": c.partner_id, "message": c.message, "summary": c.summary,
        "started_at": oe.iso(now)}, c.partner_id)
    return AlertEvent("fire", alert_id, c.key, c.kind, c.severity, c.partner_id, _fire_text(c))


def _resolve(tx: alert_store.AlertTx, row: dict[str, Any], c: Condition | None,
             now: datetime) -> AlertEvent:
    text_ = _resolve_text(row, c)
    details = json.loads(row["details"] or "{}")
    details["resolved"] = text_
    if c is not None:
        details["latest"] = _jsonable(c.details)
    tx.resolve(row["id"], details, now)
    started = fg.utc(row["started_at"])
    tx.event(oe.ALERT_RESOLVED, now, {
        "alert_id": int(row["id"]), "key": row["key"], "kind": row["kind"],
        "severity": row["severity"], "partner_id": row["partner_id"], "message": text_,
        "started_at": oe.iso(started) if started else None, "resolved_at": oe.iso(now)},
        row["partner_id"])
    return AlertEvent("resolve", int(row["id"]), row["key"], row["kind"], row["severity"],
                      row["partner_id"], text_)


list_alerts = alert_store.list_alerts
