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
from sqlalchemy import Connection, func, insert, select, text, update

from postback_worker.domain.failures import NOT_THE_PARTNERS
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
from postback_worker.ops.visibility.metrics import circuit_states
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store

log = logging.getLogger("postback_worker.alerts")
ADVISORY_LOCK = 0x70627761  # "pbwa"
AL = t.alerts.c


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


def snapshot(conn: Connection, redis_client: Any, now: datetime,
             window_seconds: int) -> Snapshot:
    """The figures the rules need, from PostgreSQL (and circuit states from Redis)."""
    since = now - timedelta(seconds=window_seconds)
    until = now + timedelta(microseconds=1)
    ex = fg.Exclusions(conn)
    partners: dict[str, dict[str, Any]] = {}
    for row in fg.attempt_window(conn, ex, since, until):
        if row["failure_class"] in NOT_THE_PARTNERS:
            continue  # our egress proxy failed: not the partner's failure rate
        p = partners.setdefault(row["partner_id"], {"attempts": 0, "failed": 0, "codes": {},
                                                    "classes": {}})
        p["attempts"] += row["count"]
        if row["failure_class"] != "delivered":
            p["failed"] += row["count"]
            code = "none" if row["status_code"] is None else str(row["status_code"])
            p["codes"][code] = p["codes"].get(code, 0) + row["count"]
            p["classes"][row["failure_class"]] = (
                p["classes"].get(row["failure_class"], 0) + row["count"])
    by_partner: dict[str, int] = {}
    by_class: dict[str, int] = {}
    for pid, cls, n in conn.execute(
        select(fg.D.partner_id, fg.D.failure_class, func.count())
        .select_from(t.dead_letters.join(t.postbacks, fg.P.id == fg.D.postback_id))
        .where(fg.D.created_at >= since, fg.D.created_at < until,
               fg.P.state == fg.FAILED_POSTBACK, ex.real_postback(fg.D.postback_id))
        .group_by(fg.D.partner_id, fg.D.failure_class)
    ):
        by_partner[pid] = by_partner.get(pid, 0) + int(n)
        by_class[cls] = by_class.get(cls, 0) + int(n)
    backlog, oldest = conn.execute(
        select(func.count(), func.min(fg.P.next_attempt_at))
        .where(fg.P.state.in_(["retry_scheduled", "queued"]), ex.real_postback())
    ).one()
    partner_ids = [r[0] for r in conn.execute(select(t.partners.c.id).order_by(t.partners.c.id))]
    gone = {r.id: r.paused_reason or "410 Gone" for r in conn.execute(
        select(t.partners.c.id, t.partners.c.paused_reason).where(
            t.partners.c.paused.is_(True), t.partners.c.paused_by == "gone"))}
    circuits = circuit_states(redis_client, partner_ids) if redis_client is not None else {}
    lost = [OfferLost(r["offer_id"], r["conversions"], r["expired_click"], r["unknown_click"])
            for r in fg.lost_window(conn, ex, since, until)]
    return Snapshot(
        now=now,
        partners=[PartnerWindow(pid, p["attempts"], p["failed"], p["codes"], p["classes"])
                  for pid, p in sorted(partners.items())],
        new_dead_letters=sum(by_partner.values()),
        dead_letters_by_partner=by_partner, dead_letters_by_class=by_class,
        retry_backlog=int(backlog), oldest_due=fg.utc(oldest), circuits=circuits, lost=lost,
        gone=gone,
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
    with store.engine.begin() as conn:
        if store.dialect == "postgresql" and not conn.execute(
            text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK}
        ).scalar():
            log.info("alert evaluation skipped: another evaluation is running")
            return []
        snap = snapshot(conn, redis_client, now, settings.alerts.window_seconds)
        observed = conditions(snap, thresholds(settings))
        open_rows = {r["key"]: dict(r) for r in conn.execute(
            select(t.alerts).where(AL.state == "open")).mappings()}
        for tr in transitions(observed, set(open_rows)):
            if tr.action == "fire":
                assert tr.condition is not None
                events.append(_fire(conn, tr.condition, now))
            else:
                events.append(_resolve(conn, open_rows.pop(tr.key), tr.condition, now))
        by_key = {c.key: c for c in observed}
        for key, row in open_rows.items():
            c = by_key.get(key)
            if c is None or any(e.key == key for e in events):
                continue
            details = {**json.loads(row["details"] or "{}"), "latest": _jsonable(c.details)}
            conn.execute(update(t.alerts).where(AL.id == row["id"]).values(
                last_evaluated_at=now, details=json.dumps(details)))
    for event in events:
        for sink in sinks if sinks is not None else sinks_for(settings):
            sink.send(event)
    return events


def _jsonable(details: Any) -> Any:
    return json.loads(json.dumps(details, default=str))


def _fire(conn: Connection, c: Condition, now: datetime) -> AlertEvent:
    details = {**_jsonable(c.details), "summary": c.summary}
    alert_id = conn.execute(insert(t.alerts).values(
        key=c.key, kind=c.kind, partner_id=c.partner_id, severity=c.severity, state="open",
        message=c.message, details=json.dumps(details), started_at=now, resolved_at=None,
        last_evaluated_at=now,
    ).returning(AL.id)).scalar_one()
    return AlertEvent("fire", int(alert_id), c.key, c.kind, c.severity, c.partner_id,
                      _fire_text(c))


def _resolve(conn: Connection, row: dict[str, Any], c: Condition | None,
             now: datetime) -> AlertEvent:
    text_ = _resolve_text(row, c)
    details = json.loads(row["details"] or "{}")
    details["resolved"] = text_
    if c is not None:
        details["latest"] = _jsonable(c.details)
    conn.execute(update(t.alerts).where(AL.id == row["id"]).values(
        state="resolved", resolved_at=now, last_evaluated_at=now, details=json.dumps(details)))
    return AlertEvent("resolve", int(row["id"]), row["key"], row["kind"], row["severity"],
                      row["partner_id"], text_)


def list_alerts(store: Store, *, state: str = "all", partner_id: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
    """Alert history, newest first; `state` is open, resolved or all."""
    stmt = select(t.alerts).order_by(AL.started_at.desc(), AL.id.desc()).limit(limit)
    if state != "all":
        stmt = stmt.where(AL.state == state)
    if partner_id:
        stmt = stmt.where(AL.partner_id == partner_id)
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
    for r in rows:
        r["details"] = json.loads(r["details"] or "{}")
        for k in ("started_at", "resolved_at", "last_evaluated_at"):
            r[k] = fg.utc(r[k])
    return rows

