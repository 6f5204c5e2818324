"""The operator dashboard: figures gathered from PostgreSQL/Redis and one server-rendered page.

The numbers come from store/figures.py (rollups on PostgreSQL), so the page costs the same
whatever the history holds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from html import escape
from typing import Any
from urllib.parse import urlencode

from postback_worker.domain.failures import FailureClass
from postback_worker.ops.visibility import figures as fg
from postback_worker.ops.visibility.alerts import list_alerts
from postback_worker.ops.visibility.charts import hbars, line_chart, stacked_bars
from postback_worker.ops.visibility.metrics import (
    backlog_age_seconds,
    circuit_states,
    overdue_seconds,
    queue_depths,
)
from postback_worker.ops.visibility.reports import Scope, delivery_report, millis, percent
from postback_worker.ops.visibility.timerange import TimeRange
from postback_worker.store.figures import RawFigures, figures_for
from postback_worker.store.repo import Store

BUCKET_STEPS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 48
WORST_PARTNERS = 10


def bucket_seconds(span_seconds: float) -> int:
    """The smallest step that keeps the chart at or under MAX_BUCKETS buckets."""
    for step in BUCKET_STEPS:
        if span_seconds / step <= MAX_BUCKETS:
            return step
    return BUCKET_STEPS[-1]


def _bucket_labels(rng: TimeRange, step: int) -> list[str]:
    n = max(1, int(-(-rng.seconds // step)))
    fmt = "%m-%d" if step >= 86400 else ("%m-%d %H:%M" if rng.seconds > 86400 else "%H:%M")
    return [(rng.since + timedelta(seconds=step * i)).strftime(fmt) for i in range(n)]


def attempt_series(store: Store, scope: Scope, step: int,
                   figures: RawFigures | None = None) -> dict[str, Any]:
    """Attempts per time bucket: totals, delivered, and failures by class. An attempt counts
    in the bucket its start minute falls in (the first bucket also takes the partial minute
    before it)."""
    labels = _bucket_labels(scope.range, step)
    n = len(labels)
    totals, delivered = [0] * n, [0] * n
    failures: dict[str, list[int]] = {}
    figs = figures or figures_for(store)
    since = scope.range.since
    for (minute, cls), count in figs.attempt_minutes(since, scope.range.until,
                                                     scope.partner_id).items():
        i = min(max(int((minute - since).total_seconds() // step), 0), n - 1)
        totals[i] += count
        if cls == FailureClass.DELIVERED:
            delivered[i] += count
        else:
            failures.setdefault(cls, [0] * n)[i] += count
    success = [fg.rate(d, tot) for d, tot in zip(delivered, totals, strict=True)]
    return {"labels": labels, "attempts": totals, "delivered": delivered,
            "success_rate": success, "failures": dict(sorted(failures.items())),
            "bucket_seconds": step}


def gather(store: Store, redis_client: Any, scope: Scope, now: datetime,
           broker_client: Any = None, figures: RawFigures | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain data (also served as JSON)."""
    figs = figures or figures_for(store)
    report = delivery_report(store, scope, figs)
    series = attempt_series(store, scope, bucket_seconds(scope.range.seconds), figs)
    partner_ids = [p["partner_id"] for p in report["partners"]]
    try:
        queues: dict[str, int] | None = queue_depths(broker_client or redis_client)
        circuits = circuit_states(redis_client, partner_ids)
    except Exception:  # noqa: BLE001 - the page still shows the database's figures
        queues, circuits = None, {}
    backlog, oldest = figs.retry_backlog()
    dead: dict[str, int] = {}
    for (_partner, cls), n in figs.dead_letters().items():
        dead[cls] = dead.get(cls, 0) + n
    ages = {pid: {"postbacks": count, "age_seconds": backlog_age_seconds(created, now)}
            for pid, (count, created) in figs.backlog_by_partner().items()}
    return {
        "since": scope.range.since, "until": scope.range.until, "partner_id": scope.partner_id,
        "report": report, "series": series, "queues": queues,
        "retry_backlog": backlog, "retry_overdue_seconds": overdue_seconds(oldest, now),
        "backlog_age": dict(sorted(ages.items(), key=lambda kv: -kv[1]["age_seconds"])),
        "dead_letters": dict(sorted(dead.items(), key=lambda kv: (-kv[1], kv[0]))),
        "circuits": circuits, "open_alerts": list_alerts(store, state="open", limit=50),
    }


# -- HTML -------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;
color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}
.muted{color:#666;font-size:13px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px}
.kpis{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.kpi{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.kpi .v{font-size:22px;font-weight:600}.kpi .l{font-size:12px;color:#666}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eee}th{color:#555}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.sev-critical{color:#b00020;font-weight:600}.sev-warning{color:#b26a00;font-weight:600}
form{display:inline-block;margin-top:6px}input{width:170px}
.state-open{color:#b00020;font-weight:600}.state-half_open{color:#b26a00}
#failed td:last-child{word-break:break-all;min-width:260px}
"""


def _kpi(label: str, value: str, kpi_id: str) -> str:
    return (f'<div class="kpi" id="kpi-{kpi_id}"><div class="v">{escape(value)}</div>'
            f'<div class="l">{escape(label)}</div></div>')


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _link(path: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return escape(f"{path}?{query}")


def render_html(data: dict[str, Any], *, link: Callable[..., str] = _link) -> str:
    rep = data["report"]
    s = rep["summary"]
    since, until = _iso(data["since"]), _iso(data["until"])
    series = data["series"]
    lost_total = sum(r["lost"] for r in rep["lost_conversions"])
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>Postback delivery dashboard</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>Postback delivery</h1>",
        f'<div class="muted" id="range">{escape(since)} to {escape(until)}'
        + (f" &middot; partner {escape(data['partner_id'])}" if data["partner_id"] else "")
        + "</div>",
        '<form method="get" action="/dashboard">since <input name="since" value="'
        f'{escape(since)}"> until <input name="until" value="{escape(until)}"> '
        '<button type="submit">Show</button></form> '
        f'<span class="muted"><a href="{link("/dashboard", since="1h")}">1 h</a> '
        f'<a href="{link("/dashboard", since="24h")}">24 h</a> '
        f'<a href="{link("/dashboard", since="7d")}">7 d</a> '
        f'<a href="{link("/dashboard", since="30d")}">30 d</a></span>',
        '<div class="kpis">',
        _kpi("postbacks", str(s["postbacks"]), "postbacks"),
        _kpi("delivered", str(s["delivered"]), "delivered"),
        _kpi("failed (dead-lettered)", str(s["failed"]), "failed"),
        _kpi("pending", str(s["pending"]), "pending"),
        _kpi("skipped", str(s["skipped"]), "skipped"),
        _kpi("success rate", percent(s["success_rate"]), "success-rate"),
        _kpi("p95 response ms", millis(s["response_ms"]["p95"]), "p95"),
        _kpi("lost conversions", str(lost_total), "lost"),
        _kpi("open alerts", str(len(data["open_alerts"])), "alerts"),
        "</div>",
        '<p class="muted" id="kpi-sum">postbacks = delivered + failed + pending + skipped '
        f'({s["postbacks"]} = {s["delivered"]} + {s["failed"]} + {s["pending"]} + '
        f'{s["skipped"]})</p>',
        '<div class="grid">',
        '<div class="card"><h2>Attempt success rate over time</h2>',
        line_chart("chart-success-rate", "Attempt success rate over time", series["labels"],
                   series["success_rate"]),
        "</div>",
        '<div class="card"><h2>Failed attempts by class over time</h2>',
        stacked_bars("chart-failures", "Failed attempts by class over time", series["labels"],
                     series["failures"]),
        "</div>",
        _worst_partners(data, link, since, until),
        _queues(data),
        "</div>",
        _alerts(data["open_alerts"]),
        _lost(rep["lost_conversions"]),
        '<p class="muted">Figures exclude test fires. Success rate = delivered / (delivered + '
        "dead-lettered) for postbacks created in the range; the charts count attempts. "
        f'Export: <a href="{link("/v1/reports/delivery", since=since, until=until, format="csv")}'
        '">delivery report (CSV)</a> &middot; <a href="'
        f'{link("/v1/reports/failed", since=since, until=until, format="csv")}">all failed '
        'postbacks (CSV)</a> &middot; <a href="/metrics">metrics</a></p>',
        "</body></html>",
    ]
    return "".join(parts)


def _worst_partners(data: dict[str, Any], link: Callable[..., str], since: str,
                    until: str) -> str:
    partners = data["report"]["partners"][:WORST_PARTNERS]
    bars = hbars("chart-worst-partners", "Failure rate by partner, worst first",
                 [(p["partner_id"], p["failure_rate"] or 0.0,
                   f"{percent(p['failure_rate'])} failed") for p in partners], top=1.0,
                 text_w=100)
    rows = []
    for p in partners:
        failures = ((c, n) for c, n in p["failure_classes"].items()
                    if c != FailureClass.DELIVERED)
        top_class = max(failures, key=lambda cn: cn[1], default=("-", 0))[0]
        circuit = data["circuits"].get(p["partner_id"], "closed")
        rows.append(
            f'<tr class="partner" data-partner="{escape(p["partner_id"])}">'
            f"<td>{escape(p['partner_id'])}</td><td class=\"n\">{p['postbacks']}</td>"
            f"<td class=\"n\">{p['delivered']}</td><td class=\"n\">{p['failed']}</td>"
            f"<td class=\"n\">{percent(p['failure_rate'])}</td><td>{escape(top_class)}</td>"
            f'<td class="state-{escape(circuit)}">{escape(circuit)}</td>'
            f'<td><a class="failed-link" href="{link("/v1/reports/failed", partner=p["partner_id"], since=since, until=until, format="html")}">list</a> '  # noqa: E501
            f'<a href="{link("/v1/reports/failed", partner=p["partner_id"], since=since, until=until, format="csv")}">CSV</a></td></tr>'  # noqa: E501
        )
    table = ("<table id=\"worst-partners\"><tr><th>partner</th><th>postbacks</th>"
             "<th>delivered</th><th>failed</th><th>failure rate</th><th>top failure</th>"
             "<th>circuit</th><th>failed postbacks</th></tr>" + "".join(rows) + "</table>")
    if not partners:
        table = '<p class="muted">No postbacks in this range.</p>'
    note = ('<p class="muted">Failure rate = failed (dead-lettered) / (delivered + failed), '
            "for the postbacks created in the range; the bars and the column show the same "
            "figure.</p>")
    return f'<div class="card"><h2>Worst partners</h2>{bars}{table}{note}</div>'


def _queues(data: dict[str, Any]) -> str:
    queues = data["queues"]
    if queues is None:
        q_html = '<p class="muted">Redis is unavailable: queue depths unknown.</p>'
    else:
        q_html = hbars("chart-queues", "Queue depths",
                       [(q, float(n), str(n)) for q, n in queues.items()], color="#1f77b4")
    dead = "".join(f"<tr><td>{escape(c)}</td><td class=\"n\">{n}</td></tr>"
                   for c, n in data["dead_letters"].items())
    overdue = data["retry_overdue_seconds"]
    ages = "".join(
        f'<tr data-partner="{escape(pid)}"><td>{escape(pid)}</td><td class="n">'
        f'{a["postbacks"]}</td><td class="n">{duration(a["age_seconds"])}</td></tr>'
        for pid, a in data["backlog_age"].items())
    return (
        '<div class="card"><h2>Queues</h2>' + q_html +
        '<table id="backlog"><tr><th>retry backlog</th><td class="n">'
        f"{data['retry_backlog']}</td></tr><tr><th>oldest retry overdue</th>"
        f'<td class="n">{duration(overdue)}</td></tr></table>'
        '<h2 style="margin-top:10px">Backlog age by partner</h2>'
        '<table id="backlog-age"><tr><th>partner</th><th>not delivered</th><th>oldest</th>'
        f'</tr>{ages or "<tr><td>none</td></tr>"}</table>'
        '<h2 style="margin-top:10px">Dead letters by class</h2>'
        f'<table id="dead-letters">{dead or "<tr><td>none</td></tr>"}</table></div>'
    )


def duration(seconds: float) -> str:
    """0 s, 45 s, 12 min, 9 h 5 min, 3 d 4 h."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _alerts(alerts: list[dict[str, Any]]) -> str:
    if not alerts:
        return ('<div class="card" style="margin-top:16px"><h2>Open alerts</h2>'
                '<p class="muted" id="alerts">No open alerts.</p></div>')
    rows = "".join(
        f'<tr><td class="sev-{escape(a["severity"])}">{escape(a["severity"])}</td>'
        f'<td style="white-space:nowrap">{escape(_iso(a["started_at"]))}</td>'
        f"<td>{escape(a['message'])}</td></tr>"
        for a in alerts)
    return ('<div class="card" style="margin-top:16px"><h2>Open alerts</h2>'
            f'<table id="alerts"><tr><th>severity</th><th>since</th><th>alert</th></tr>{rows}'
            "</table></div>")


def _lost(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{escape(r['offer_id'] or '(no offer)')}</td><td class=\"n\">"
        f"{r['conversions']}</td><td class=\"n\">{r['expired_click']}</td><td class=\"n\">"
        f"{r['unknown_click']}</td><td class=\"n\">{percent(r['lost_rate'])}</td>"
        + "".join(f'<td class="n">{r[s]}</td>' for s in fg.INBOUND_STATES) + "</tr>"
        for r in rows)
    return ('<div class="card" style="margin-top:16px"><h2>Lost and refused conversions by '
            'offer</h2><table id="lost"><tr><th>offer</th><th>conversions</th><th>expired '
            "click</th><th>unknown click</th><th>lost</th><th>too soon</th><th>too late</th>"
            f"<th>capped</th><th>IP not allowed</th></tr>{body}</table></div>")


FAILED_HEADINGS = {"created_at": "created", "partner_id": "partner", "postback_id": "postback",
                   "conversion_id": "conversion", "transaction_id": "transaction",
                   "offer_id": "offer", "last_status": "last status",
                   "last_class": "last class", "url": "URL (secrets masked)"}


def failed_html(rows: list[dict[str, Any]], title: str) -> str:
    """A plain HTML list of failed postbacks (the dashboard's per-partner drill-down)."""
    cols = ("created_at", "partner_id", "postback_id", "conversion_id", "transaction_id",
            "offer_id", "last_status", "last_class", "attempts", "error", "url")
    head = "".join(f"<th>{FAILED_HEADINGS.get(c, c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_cell(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows)
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
            f"{escape(title)}</title><style>{STYLE}</style></head><body><h1>{escape(title)}"
            f'</h1><p class="muted">{len(rows)} failed postbacks</p>'
            f'<table id="failed"><tr>{head}</tr>{body}</table></body></html>')


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return _iso(value)
    return str(value)
