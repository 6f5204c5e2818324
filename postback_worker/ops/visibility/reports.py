"""Delivery reports and the failed-postback export (shared by the CLI, the API and the dashboard).

Scope: postbacks created (their conversion processed) in [since, until), optionally one partner
or one offer; their attempts whenever they happened; lost conversions received in the range.
Test fires are never counted. Success rate = delivered / (delivered + failed), where failed
means dead-lettered; postbacks still retrying are reported as pending.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.sql.elements import ColumnElement

from postback_worker.domain.masking import mask_url
from postback_worker.ops.visibility import figures as fg
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.store import schema as t
from postback_worker.store.lifecycle import event_counts
from postback_worker.store.repo import Store

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
FAILED_COLUMNS = ("postback_id", "conversion_id", "transaction_id", "offer_id", "partner_id",
                  "last_status", "last_class", "attempts", "created_at", "last_attempt_at",
                  "error", "url")


@dataclass(frozen=True)
class Scope:
    """Which postbacks a report covers."""

    range: TimeRange
    partner_id: str | None = None
    offer_id: str | None = None

    def where(self, ex: fg.Exclusions) -> list[ColumnElement[bool]]:
        conds = [fg.P.created_at >= self.range.since, fg.P.created_at < self.range.until,
                 ex.real_postback()]
        if self.partner_id:
            conds.append(fg.P.partner_id == self.partner_id)
        if self.offer_id:
            conds.append(fg.P.conversion_id.in_(
                select(fg.C.id).where(fg.C.offer_id == self.offer_id)))
        return conds


def _empty_counts() -> dict[str, Any]:
    return {"postbacks": 0, "delivered": 0, "failed": 0, "pending": 0, "skipped": 0,
            "attempts": 0, "failed_attempts": 0}


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    decided = row["delivered"] + row["failed"]
    row["success_rate"] = fg.rate(row["delivered"], decided)
    row["failure_rate"] = fg.rate(row["failed"], decided)
    row["attempt_failure_rate"] = fg.rate(row["failed_attempts"], row["attempts"])
    return row


def delivery_report(store: Store, scope: Scope) -> dict[str, Any]:
    """Every figure of the delivery report, exact, as plain data."""
    with store.engine.connect() as conn:
        ex = fg.Exclusions(conn)
        where = scope.where(ex)
        total = _empty_counts()
        partners: dict[str, dict[str, Any]] = {}

        def partner(pid: str) -> dict[str, Any]:
            return partners.setdefault(pid, {"partner_id": pid, **_empty_counts(),
                                             "status_codes": {}, "failure_classes": {}})

        for pid, state, n in conn.execute(
            select(fg.P.partner_id, fg.P.state, func.count()).where(*where)
            .group_by(fg.P.partner_id, fg.P.state)
        ):
            key = _state_bucket(state)
            for row in (total, partner(pid)):
                row["postbacks"] += int(n)
                row[key] += int(n)
        status_codes: dict[str, int] = {}
        classes: dict[str, int] = {}
        for pid, code, cls, n in conn.execute(
            select(fg.P.partner_id, fg.A.status_code, fg.A.failure_class, func.count())
            .select_from(t.attempts.join(t.postbacks, fg.P.id == fg.A.postback_id))
            .where(*where, fg.real_attempt())
            .group_by(fg.P.partner_id, fg.A.status_code, fg.A.failure_class)
        ):
            p = partner(pid)
            code_key = "none" if code is None else str(code)
            failed = cls != "delivered"
            for row in (total, p):
                row["attempts"] += int(n)
                row["failed_attempts"] += int(n) if failed else 0
            for bucket in (status_codes, p["status_codes"]):
                bucket[code_key] = bucket.get(code_key, 0) + int(n)
            for bucket in (classes, p["failure_classes"]):
                bucket[cls] = bucket.get(cls, 0) + int(n)
        failed_by_class = {
            cls or "config": int(n) for cls, n in conn.execute(
                select(fg.P.last_class, func.count())
                .where(*where, fg.P.state == fg.FAILED_POSTBACK).group_by(fg.P.last_class))
        }
        overall_q, partner_q = _response_times(conn, store.dialect, where)
        lost = fg.lost_window(conn, ex, scope.range.since, scope.range.until, scope.offer_id)
        lifecycle: dict[str, Any] = event_counts(conn, scope.range.since, scope.range.until)
        lifecycle["postbacks_by_event"] = {
            event: int(n) for event, n in conn.execute(
                select(fg.P.event, func.count()).where(*where, fg.P.event.is_not(None))
                .group_by(fg.P.event))}
    for pid, p in partners.items():
        p["response_ms"] = partner_q.get(pid, dict.fromkeys(q for q, _ in QUANTILES))
        _finish(p)
    ranked = sorted(partners.values(), key=_worst_first)
    total["response_ms"] = overall_q
    return {
        "since": scope.range.since,
        "until": scope.range.until,
        "partner_id": scope.partner_id,
        "offer_id": scope.offer_id,
        "summary": _finish(total),
        "status_codes": _sorted_counts(status_codes, "status_code"),
        "failure_classes": [
            {"failure_class": cls, "attempts": classes.get(cls, 0),
             "failed_postbacks": failed_by_class.get(cls, 0)}
            for cls in sorted(set(classes) | set(failed_by_class),
                              key=lambda c: (-classes.get(c, 0), c))
        ],
        "partners": ranked,
        "lost_conversions": lost,
        "lifecycle": lifecycle,
    }


def _state_bucket(state: str) -> str:
    if state == "delivered":
        return "delivered"
    if state == fg.FAILED_POSTBACK:
        return "failed"
    if state == "skipped":
        return "skipped"
    return "pending"


def _worst_first(p: dict[str, Any]) -> tuple[Any, ...]:
    rate = p["failure_rate"]
    attempt_rate = p["attempt_failure_rate"]
    return (rate is None, -(rate or 0.0), -(attempt_rate or 0.0), -p["failed"], p["partner_id"])


def _sorted_counts(counts: dict[str, int], key: str) -> list[dict[str, Any]]:
    return [{key: k, "attempts": n} for k, n in sorted(counts.items(), key=lambda kv: (-kv[1],
                                                                                        kv[0]))]


def _response_times(conn: Connection, dialect: str, where: list[ColumnElement[bool]]
                    ) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]]:
    """p50/p95/p99 attempt durations (ms) by nearest rank: overall and per partner."""
    joined = t.attempts.join(t.postbacks, fg.P.id == fg.A.postback_id)
    conds = [*where, fg.real_attempt()]
    if dialect == "postgresql":
        cols = [func.percentile_disc(q).within_group(fg.A.duration_ms) for _, q in QUANTILES]
        overall_row = conn.execute(select(*cols).select_from(joined).where(*conds)).one()
        overall = {name: _num(v) for (name, _), v in zip(QUANTILES, overall_row, strict=True)}
        per: dict[str, dict[str, float | None]] = {}
        for row in conn.execute(select(fg.P.partner_id, *cols).select_from(joined)
                                .where(*conds).group_by(fg.P.partner_id)):
            per[row[0]] = {name: _num(v) for (name, _), v in zip(QUANTILES, row[1:],
                                                                  strict=True)}
        return overall, per
    values: dict[str, list[float]] = {}
    for pid, ms in conn.execute(select(fg.P.partner_id, fg.A.duration_ms).select_from(joined)
                                .where(*conds)):
        values.setdefault(pid, []).append(float(ms))
    everything = sorted(v for vs in values.values() for v in vs)
    overall = {name: fg.nearest_rank(everything, q) for name, q in QUANTILES}
    per = {pid: {name: fg.nearest_rank(sorted(vs), q) for name, q in QUANTILES}
           for pid, vs in values.items()}
    return overall, per


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


# -- failed postbacks export ------------------------------------------------------------------

def failed_postbacks(store: Store, scope: Scope, limit: int | None = None
                     ) -> Iterator[dict[str, Any]]:
    """Every dead-lettered postback in scope, oldest first, streamed from the database."""
    last_url = (
        select(fg.A.url).where(fg.A.postback_id == fg.P.id, fg.real_attempt())
        .order_by(fg.A.attempt_no.desc(), fg.A.id.desc()).limit(1).scalar_subquery()
    )
    with store.engine.connect() as conn:
        ex = fg.Exclusions(conn)
        stmt = (
            select(fg.P.id, fg.P.conversion_id, fg.C.transaction_id, fg.C.offer_id,
                   fg.P.partner_id, fg.P.last_status, fg.P.last_class, fg.P.attempts,
                   fg.P.created_at, fg.P.last_attempt_at, fg.P.reason, last_url, fg.P.url)
            .select_from(t.postbacks.join(t.conversions, fg.C.id == fg.P.conversion_id))
            .where(*scope.where(ex), fg.P.state == fg.FAILED_POSTBACK)
            .order_by(fg.P.created_at, fg.P.id)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        result = conn.execution_options(yield_per=1000).execute(stmt)
        for row in result:
            yield {
                "postback_id": row[0], "conversion_id": row[1], "transaction_id": row[2],
                "offer_id": row[3], "partner_id": row[4], "last_status": row[5],
                "last_class": row[6] or "config", "attempts": int(row[7]),
                "created_at": fg.utc(row[8]), "last_attempt_at": fg.utc(row[9]),
                "error": row[10] or "", "url": row[11] or mask_url(row[12] or ""),
            }


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def csv_lines(rows: Any, columns: tuple[str, ...] | list[str]) -> Iterator[str]:
    """CSV text, one chunk per row (header first), for streaming."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    yield buf.getvalue()
    for row in rows:
        buf.seek(0)
        buf.truncate()
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
        yield buf.getvalue()


# -- flat forms of the delivery report (CSV and the CLI table) -------------------------------

REPORT_CSV_COLUMNS = ("section", "key", "metric", "value")
PARTNER_FIGURES = ("postbacks", "delivered", "failed", "pending", "skipped", "success_rate",
                   "failure_rate", "attempts", "failed_attempts", "attempt_failure_rate")


LIFECYCLE_FIGURES = ("status_changes", "reversals", "adjustments", "repeats")


def report_rows(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The report as tidy rows: section, key, metric, value (every figure once)."""
    s = report["summary"]
    for metric in PARTNER_FIGURES:
        yield {"section": "summary", "key": "", "metric": metric, "value": s[metric]}
    for name, value in s["response_ms"].items():
        yield {"section": "summary", "key": "", "metric": f"response_ms_{name}", "value": value}
    for row in report["status_codes"]:
        yield {"section": "status_code", "key": row["status_code"], "metric": "attempts",
               "value": row["attempts"]}
    for row in report["failure_classes"]:
        for metric in ("attempts", "failed_postbacks"):
            yield {"section": "failure_class", "key": row["failure_class"], "metric": metric,
                   "value": row[metric]}
    for p in report["partners"]:
        for metric in PARTNER_FIGURES:
            yield {"section": "partner", "key": p["partner_id"], "metric": metric,
                   "value": p[metric]}
        for name, value in p["response_ms"].items():
            yield {"section": "partner", "key": p["partner_id"],
                   "metric": f"response_ms_{name}", "value": value}
    for row in report["lost_conversions"]:
        for metric in ("conversions", "expired_click", "unknown_click", "lost", "lost_rate"):
            yield {"section": "lost_conversions", "key": row["offer_id"] or "", "metric": metric,
                   "value": row[metric]}
    life = report["lifecycle"]
    for metric in LIFECYCLE_FIGURES:
        yield {"section": "conversion_events", "key": "", "metric": metric,
               "value": life[metric]}
    for event, n in sorted(life["postbacks_by_event"].items()):
        yield {"section": "postbacks_by_event", "key": event, "metric": "postbacks", "value": n}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def millis(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
