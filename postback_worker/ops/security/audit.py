"""Quarterly configuration audit of every offer and partner (`postback-worker audit`).

Findings have a severity: "error" (the exit code is non-zero, for CI and cron), "warning" or
"info". Time is passed in; the figures come from store/audit.py. Test-fire attempts and
test conversions are left out of every figure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from postback_worker.domain.campaigns import (
    RECOMMENDED_LIFESPAN_DAYS,
    lifespan_in_range,
    parse_campaign_type,
)
from postback_worker.domain.masking import SECRET_PARAM
from postback_worker.domain.validator import validate, validate_body
from postback_worker.settings import Settings
from postback_worker.store import audit as audit_store
from postback_worker.store.repo import Store

EXPIRED_WINDOW_DAYS = 30
FAILURE_WINDOW_DAYS = 7
MIN_ATTEMPTS = 20
MIN_CONVERSIONS = 20
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    severity: str
    kind: str  # "offer" | "partner"
    object_id: str
    check: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class AuditReport:
    generated_at: datetime
    offers: int
    partners: int
    findings: list[Finding]

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def to_dict(self) -> dict[str, Any]:
        return {"generated_at": self.generated_at, "offers": self.offers,
                "partners": self.partners, "counts": self.counts(),
                "findings": [f.to_dict() for f in self.findings]}


def _days(delta: timedelta) -> int:
    return int(delta.total_seconds() // 86400)


def _offer_findings(offers: list[dict[str, Any]], expired: dict[str, tuple[int, int]],
                    now: datetime, s: Settings) -> Iterable[Finding]:
    for o in offers:
        oid = o["id"]
        try:
            ct = parse_campaign_type(o["campaign_type"])
        except ValueError:
            yield Finding("error", "offer", oid, "campaign_type",
                          f"unknown campaign type {o['campaign_type']!r}")
            continue
        low, high = RECOMMENDED_LIFESPAN_DAYS[ct]
        days = o["lifespan_days"]
        if not lifespan_in_range(ct, days):
            span = f"{low}" if low == high else f"{low}-{high}"
            yield Finding("warning", "offer", oid, "lifespan",
                          f"click session lifespan is {days} days; {span} days is recommended "
                          f"for {ct.value}")
        lost, attributed = expired.get(oid, (0, 0))
        total = lost + attributed
        if total >= MIN_CONVERSIONS and lost / total >= s.audit.expired_share:
            yield Finding("warning", "offer", oid, "expired_clicks",
                          f"{lost} of {total} conversions in the last {EXPIRED_WINDOW_DAYS} days "
                          f"({lost / total:.0%}) came after the {days}-day lifespan and were "
                          "lost; consider a longer lifespan, then re-attribute")
        if now - o["updated_at"] > timedelta(days=s.audit.stale_days):
            yield Finding("info", "offer", oid, "unchanged",
                          f"configuration unchanged for {_days(now - o['updated_at'])} days; "
                          "review it")


def _request_findings(p: dict[str, Any]) -> Iterable[Finding]:
    """Body template problems, and secrets that travel where they are easily logged."""
    pid = p["id"]
    fmt, body = p.get("body_format"), p.get("body_template")
    if fmt and body:
        for problem in validate_body(body, fmt):
            yield Finding(problem.severity, "partner", pid, "body_template",
                          f"body_template ({fmt}) {problem.describe()}")
        if p.get("method") != "POST":
            yield Finding("error", "partner", pid, "body_template",
                          f"a {fmt} body is configured but the method is {p.get('method')}; "
                          "bodies are only sent with POST")
    secret_params = sorted({name for name in _query_names(p["postback_url"])
                            if SECRET_PARAM.search(name)})
    if secret_params:
        yield Finding("warning", "partner", pid, "secret_in_url",
                      f"the postback URL carries {', '.join(secret_params)}: URLs end up in "
                      "partners' and proxies' access logs; if the partner accepts it, send it "
                      "as a custom header instead (partners add --header 'Name: value')")


def _query_names(url: str) -> list[str]:
    query = url.split("?", 1)[1] if "?" in url else ""
    return [part.split("=", 1)[0] for part in query.split("&") if part]


def _partner_findings(partners: list[dict[str, Any]], stats: dict[str, dict[str, Any]],
                      now: datetime, s: Settings) -> Iterable[Finding]:
    for p in partners:
        pid = p["id"]
        for problem in validate(p["postback_url"]):
            yield Finding(problem.severity, "partner", pid, "template",
                          f"postback_url {problem.describe()}")
        yield from _request_findings(p)
        st = stats.get(pid, {})
        if not p["enabled"]:
            if now - p["updated_at"] > timedelta(days=s.audit.paused_days):
                yield Finding("warning", "partner", pid, "disabled",
                              f"disabled for {_days(now - p['updated_at'])} days; enable it "
                              "or remove it")
            continue
        if p.get("paused") and p.get("paused_at") is not None and \
                now - p["paused_at"] > timedelta(days=s.audit.paused_days):
            reason = f" ({p['paused_reason']})" if p.get("paused_reason") else ""
            yield Finding("warning", "partner", pid, "paused",
                          f"paused for {_days(now - p['paused_at'])} days{reason}; its "
                          "postbacks are waiting")
        last = st.get("last_delivered")
        recent = st.get("recent_attempts", 0)
        if last is None or now - last > timedelta(days=s.audit.silent_days):
            since = "never" if last is None else f"not for {_days(now - last)} days"
            if recent:
                yield Finding("error", "partner", pid, "no_delivery",
                              f"no successful delivery in {s.audit.silent_days} days ({since}) "
                              f"despite {recent} attempts")
            else:
                yield Finding("warning", "partner", pid, "no_delivery",
                              f"no successful delivery in {s.audit.silent_days} days ({since}); "
                              "no attempts either")
        attempts, failed = st.get("window_attempts", 0), st.get("window_failed", 0)
        if attempts >= MIN_ATTEMPTS and failed / attempts >= s.audit.failure_rate:
            yield Finding("error", "partner", pid, "failure_rate",
                          f"{failed} of {attempts} attempts in the last {FAILURE_WINDOW_DAYS} "
                          f"days failed ({failed / attempts:.0%})")
        if now - p["updated_at"] > timedelta(days=s.audit.stale_days):
            yield Finding("info", "partner", pid, "unchanged",
                          f"configuration unchanged for {_days(now - p['updated_at'])} days; "
                          "review it")


def run_audit(store: Store, settings: Settings, now: datetime) -> AuditReport:
    """Check every offer and partner; findings sorted by severity, kind and id."""
    offers, partners = audit_store.catalog(store)
    stats = audit_store.partner_stats(
        store, now, now - timedelta(days=settings.audit.silent_days),
        now - timedelta(days=FAILURE_WINDOW_DAYS))
    expired = audit_store.expired_by_offer(store, now, EXPIRED_WINDOW_DAYS)
    findings = [*_offer_findings(offers, expired, now, settings),
                *_partner_findings(partners, stats, now, settings)]
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), f.kind, f.object_id, f.check))
    return AuditReport(now, len(offers), len(partners), findings)
