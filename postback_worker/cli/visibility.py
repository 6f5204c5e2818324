"""Commands for reports, alerts, the dashboard link and Flower."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import click

from postback_worker.cli.core import partners
from postback_worker.cli.group import main
from postback_worker.cli.output import cell, load_settings, open_store, print_json, print_table
from postback_worker.dev import state
from postback_worker.errors import InvalidInput, UnknownPartner

RANGE_HELP = ("ISO date or time (2026-11-25, 2026-11-25T10:00, UTC unless an offset is given) "
              "or a duration ago (30m, 24h, 7d).")


def _scope(since: str | None, until: str | None, partner: str | None,
           offer: str | None) -> Any:
    from postback_worker.ops.visibility.reports import Scope
    from postback_worker.ops.visibility.timerange import RangeError, parse_range

    try:
        rng = parse_range(since, until, datetime.now(UTC))
    except RangeError as exc:
        raise InvalidInput(f"--{exc.field}: {exc.errors[0].message}") from exc
    return Scope(rng, partner, offer)


def range_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--since", help="Start (inclusive). Default: 24h before --until. "
                     + RANGE_HELP),
        click.option("--until", help="End (exclusive). Default: now. " + RANGE_HELP),
        click.option("--partner", help="Only this partner."),
        click.option("--offer", help="Only this offer."),
    ]):
        fn = option(fn)
    return fn


# -- report ----------------------------------------------------------------------------------

@main.group("report", invoke_without_command=True)
@range_options
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="Output format.")
@click.pass_context
def report(ctx: click.Context, since: str | None, until: str | None, partner: str | None,
           offer: str | None, fmt: str) -> None:
    """Delivery report for a date range: success rate, failures, response times, partners
    ranked worst first, lost conversions per offer."""
    if ctx.invoked_subcommand is not None:
        return
    from postback_worker.ops.visibility import reports

    scope = _scope(since, until, partner, offer)
    data = reports.delivery_report(open_store(load_settings()), scope)
    if fmt == "json":
        print_json(data)
    elif fmt == "csv":
        for chunk in reports.csv_lines(reports.report_rows(data), reports.REPORT_CSV_COLUMNS):
            click.echo(chunk, nl=False)
    else:
        _print_report(data)


def _print_report(data: dict[str, Any]) -> None:
    from postback_worker.ops.visibility.reports import millis, percent

    s = data["summary"]
    click.echo(f"Delivery report {cell(data['since'])} to {cell(data['until'])} UTC"
               + (f", partner {data['partner_id']}" if data["partner_id"] else "")
               + (f", offer {data['offer_id']}" if data["offer_id"] else ""))
    click.echo(f"postbacks {s['postbacks']}: delivered {s['delivered']}, failed {s['failed']}, "
               f"pending {s['pending']}, skipped {s['skipped']}; success rate "
               f"{percent(s['success_rate'])}")
    r = s["response_ms"]
    click.echo(f"attempts {s['attempts']} ({s['failed_attempts']} failed); response ms "
               f"p50 {millis(r['p50'])}, p95 {millis(r['p95'])}, p99 {millis(r['p99'])}")
    click.echo("\nStatus codes (attempts):")
    print_table(data["status_codes"], ["status_code", "attempts"])
    click.echo("\nFailure classes:")
    print_table(data["failure_classes"], ["failure_class", "attempts", "failed_postbacks"])
    click.echo("\nPartners, worst first:")
    rows = [{**p, "success_rate": percent(p["success_rate"]),
             "failure_rate": percent(p["failure_rate"]),
             "p95_ms": millis(p["response_ms"]["p95"])} for p in data["partners"]]
    print_table(rows, ["partner_id", "postbacks", "delivered", "failed", "pending",
                       "failure_rate", "success_rate", "attempts", "failed_attempts", "p95_ms"])
    click.echo("\nLost and refused conversions by offer:")
    lost = [{**r, "lost_rate": percent(r["lost_rate"])} for r in data["lost_conversions"]]
    print_table(lost, ["offer_id", "conversions", "expired_click", "unknown_click", "lost",
                       "lost_rate", "too_soon", "too_late", "capped", "ip_not_allowed"])


@report.command("failed")
@range_options
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "table"]), default="csv",
              show_default=True, help="Output format.")
def report_failed(since: str | None, until: str | None, partner: str | None, offer: str | None,
                  fmt: str) -> None:
    """Every failed (dead-lettered) postback in the range: conversion, transaction and partner
    ids, last status and class, attempts, error text."""
    from postback_worker.ops.visibility import reports

    scope = _scope(since, until, partner, offer)
    rows = reports.failed_postbacks(open_store(load_settings()), scope)
    if fmt == "csv":
        for chunk in reports.csv_lines(rows, reports.FAILED_COLUMNS):
            click.echo(chunk, nl=False)
    elif fmt == "json":
        print_json(list(rows))
    else:
        print_table(list(rows), ["created_at", "postback_id", "partner_id", "transaction_id",
                                 "last_status", "last_class", "attempts", "error"])


# -- alerts ----------------------------------------------------------------------------------

@main.group("alerts")
def alerts() -> None:
    """Delivery alerts: history and evaluation."""


@alerts.command("list")
@click.option("--state", type=click.Choice(["open", "resolved", "all"]), default="all",
              show_default=True)
@click.option("--partner", help="Only this partner's alerts.")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
def alerts_list(state: str, partner: str | None, limit: int, fmt: str) -> None:
    """Alerts, newest first: one row per episode (started, resolved)."""
    from postback_worker.ops.visibility.alerts import list_alerts

    rows = list_alerts(open_store(load_settings()), state=state, partner_id=partner,
                       limit=limit)
    if fmt == "json":
        print_json(rows)
        return
    print_table(rows, ["id", "state", "severity", "kind", "partner_id", "started_at",
                       "resolved_at", "message"])


@alerts.command("evaluate")
def alerts_evaluate() -> None:
    """Evaluate the alert conditions now (beat does this every POSTBACK_ALERT_INTERVAL s)."""

    from postback_worker.ops.visibility.alerts import evaluate

    settings = load_settings()
    client = settings.redis.client()
    events = evaluate(settings, open_store(settings), client, now=datetime.now(UTC))
    for e in events:
        click.echo(f"{e.action} #{e.alert_id}: {e.text}")
    click.echo(f"{sum(e.action == 'fire' for e in events)} fired, "
               f"{sum(e.action == 'resolve' for e in events)} resolved")


# -- dashboard and Flower --------------------------------------------------------------------

@main.group("dashboard")
def dashboard() -> None:
    """The operator dashboard served by the API at /dashboard."""


@dashboard.command("link")
@click.option("--base-url", help="Where the API is reachable from your browser (default: the "
              "local stack's API, else http://127.0.0.1:8000).")
@click.option("--since", help="Open the dashboard on this range. " + RANGE_HELP)
@click.option("--until", help="End of the range. " + RANGE_HELP)
@click.option("--partner", help="Only this partner.")
def dashboard_link(base_url: str | None, since: str | None, until: str | None,
                   partner: str | None) -> None:
    """Print a sign-in link to the dashboard, valid for 10 minutes."""
    from urllib.parse import urlencode

    from postback_worker.ops.visibility.dashboard_auth import dashboard_link as make_link

    params = {k: v for k, v in (("since", since), ("until", until), ("partner", partner)) if v}
    if since or until:
        _scope(since, until, partner, None)  # refuse a bad range here, not in the browser
    path = "/dashboard" + (f"?{urlencode(params)}" if params else "")
    base_url = base_url or state.local_api_url(os.environ) or "http://127.0.0.1:8000"
    click.echo(make_link(load_settings(), base_url, datetime.now(UTC), path))


@partners.command("page-link")
@click.argument("partner_id")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="Where the API is reachable from the partner's browser.")
@click.option("--days", type=click.FloatRange(min=0.01, max=90), default=7.0, show_default=True,
              help="How long the link works.")
def partners_page_link(partner_id: str, base_url: str, days: float) -> None:
    """Print a link to the partner's own page (its postbacks only), to give to the partner."""
    from postback_worker.ops.visibility.partner_page import page_link

    settings = load_settings()
    if open_store(settings).get_partner(partner_id) is None:
        raise UnknownPartner(partner_id)
    click.echo(page_link(settings, base_url, partner_id, datetime.now(UTC), days))


@main.command("flower", context_settings={"ignore_unknown_options": True})
@click.option("--address", default="0.0.0.0", show_default=True)
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--dev", is_flag=True,
              help="Development: allow running without authentication on 127.0.0.1 only.")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(address: str, port: int, dev: bool, flower_args: tuple[str, ...]) -> None:
    """Run Flower (Celery monitoring) behind basic auth or OAuth from the settings."""
    from postback_worker.ops.visibility.flower import flower_command

    env = dict(os.environ)
    argv, extra_env = flower_command(load_settings(), env, address=address, port=port,
                                     dev=dev, extra=flower_args)
    env.update(extra_env)
    os.execve(argv[0], argv, env)
