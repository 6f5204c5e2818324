"""Delivery reports and the failed-postback export (shared by the CLI, the API and the dashboard).

Scope: postbacks created (their conversion processed) in [since, until), optionally one partner
or one offer; their attempts whenever they happened; lost conversions received in the range.
Test fires are never counted. Success rate = delivered / (delivered + failed), where failed
means dead-lettered; postbacks still retrying are reported as pending. Response-time
percentiles are nearest-rank over durations rounded up to two significant digits (123.4 ms
counts as 130 ms), so rollups can keep them exactly.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from postback_worker.domain.failures import FailureClass
from postback_worker.ops.visibility import figures as fg
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.store.figures import RawFigures, figures_for
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

    @property
    def args(self) -> tuple[Any, ...]:
        return (self.range.since, self.range.until, self.partner_id, self.offer_id)


def _empty_counts() -> dict[str, Any]:
    return {"postbacks": 0, "delivered": 0, "failed": 0, "pending": 0, "skipped": 0,
            "attempts": 0, "failed_attempts": 0}


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    row["pending"] = row["postbacks"] - row["delivered"] - row["failed"] - row["skipped"]
    decided = row["delivered"] + row["failed"]
    row["success_rate"] = fg.rate(row["delivered"], decided)
    row["failure_rate"] = fg.rate(row["failed"], decided)
    row["attempt_failure_rate"] = fg.rate(row["failed_attempts"], row["attempts"])
    return row


def delivery_report(store: Store, scope: Scope,
                    figures: RawFigures | None = None) -> dict[str, Any]:
    """Every figure of the delivery report, exact, as plain data."""
    figs = figures or figures_for(store)
    total = _empty_counts()
    partners: dict[str, dict[str, Any]] = {}

    def partner(pid: str) -> dict[str, Any]:
        return partners.setdefault(pid, {"partner_id": pid, **_empty_counts(),
                                         "status_codes": {}, "failure_classes": {}})

    failed_by_class: dict[str, int] = {}
    for (pid, bucket, cls), n in sorted(figs.report_postbacks(*scope.args).items()):
        for row in (total, partner(pid)):
            row[bucket] += n
        if bucket == "failed":
            failed_by_class[cls] = failed_by_class.get(cls, 0) + n
    status_codes: dict[str, int] = {}
    classes: dict[str, int] = {}
    for (pid, code, cls), n in sorted(figs.report_attempts(*scope.args).items(),
                                      key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        p = partner(pid)
        code_key = "none" if code is None else str(code)
        for row in (total, p):
            row["attempts"] += n
            row["failed_attempts"] += n if cls != FailureClass.DELIVERED else 0
        for counts in (status_codes, p["status_codes"]):
            counts[code_key] = counts.get(code_key, 0) + n
        for counts in (classes, p["failure_classes"]):
            counts[cls] = counts.get(cls, 0) + n
    durations = figs.report_durations(*scope.args)
    everything: dict[float, int] = {}
    per: dict[str, dict[float, int]] = {}
    for (pid, ms), n in durations.items():
        everything[ms] = everything.get(ms, 0) + n
        per.setdefault(pid, {})[ms] = per.get(pid, {}).get(ms, 0) + n
    lost = fg.lost_window(figs, scope.range.since, scope.range.until, scope.offer_id)
    lifecycle = figs.report_lifecycle(*scope.args)
    for pid, p in partners.items():
        p["response_ms"] = _quantiles(per.get(pid, {}))
        _finish(p)
    ranked = sorted(partners.values(), key=_worst_first)
    total["response_ms"] = _quantiles(everything)
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


def _quantiles(histogram: dict[float, int]) -> dict[str, float | None]:
    """p50/p95/p99 attempt durations (ms) by nearest rank over the duration buckets (each
    duration rounded up to two significant digits)."""
    return {name: fg.bucket_quantile(histogram.items(), q) for name, q in QUANTILES}


def _worst_first(p: dict[str, Any]) -> tuple[Any, ...]:
    rate = p["failure_rate"]
    attempt_rate = p["attempt_failure_rate"]
    return (rate is None, -(rate or 0.0), -(attempt_rate or 0.0), -p["failed"], p["partner_id"])


def _sorted_counts(counts: dict[str, int], key: str) -> list[dict[str, Any]]:
    return [{key: k, "attempts": n} for k, n in sorted(counts.items(), key=lambda kv: (-kv[1],
                                                                                        kv[0]))]


# -- failed postbacks export ------------------------------------------------------------------

def failed_postbacks(store: Store, scope: Scope, limit: int | None = None
                     ) -> Iterator[dict[str, Any]]:
    """Every dead-lettered postback in scope, oldest first, streamed from the database."""
    return RawFigures(store).failed_postbacks(scope.range.since, scope.range.until,
                                              scope.partner_id, scope.offer_id, limit)


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
        for metric in ("conversions", "expired_click", "unknown_click", "lost", "lost_rate",
                       *fg.INBOUND_STATES, "refused"):
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
