"""Commands for operator events: list them, send now, send a test, make a secret."""

from __future__ import annotations

from typing import Any

import click

from postback_worker.cli.group import main
from postback_worker.cli.output import load_settings, open_store, print_json, print_table, utcnow
from postback_worker.domain import operator_events as oe


@main.group("events")
def events() -> None:
    """Operator events: dead letters, circuit and pause changes, alerts (signed webhook)."""


@events.command("list")
@click.option("--type", "type_", type=click.Choice(oe.TYPES), help="Only this type.")
@click.option("--partner", help="Only this partner's events.")
@click.option("--state", type=click.Choice([*oe.DELIVERY_STATES, "unplanned"]),
              help="Only events whose delivery is in this state.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
def events_list(type_: str | None, partner: str | None, state: str | None, limit: int,
                fmt: str) -> None:
    """Recent operator events, newest first, with the state of their webhook delivery."""
    from postback_worker.ops.visibility.operator_events import list_events

    rows = list_events(open_store(load_settings()), type_=type_, partner_id=partner,
                       state=state, limit=limit)
    if fmt == "json":
        print_json(rows)
        return
    for r in rows:
        r["summary"] = _summary(r)
    print_table(rows, ["occurred_at", "type", "partner_id", "state", "attempts", "delivery_id",
                       "summary"])


def _summary(row: dict[str, Any]) -> str:
    d = row["data"]
    if row["type"] == oe.DEAD_LETTERED:
        return f"{d.get('postback_id')}: {d.get('failure_class')}"
    if row["type"] in (oe.ALERT_FIRED, oe.ALERT_RESOLVED):
        return f"#{d.get('alert_id')} {d.get('key')}"
    if row["type"] == oe.PAUSED:
        return f"by {d.get('paused_by')}: {d.get('reason') or '-'}"
    if row["type"] == oe.CIRCUIT_OPENED:
        return str(d.get("reason"))
    if row["type"] == oe.CIRCUIT_CLOSED:
        return f"by {d.get('closed_by')}"
    if row["type"] == oe.RESUMED:
        return f"was paused by {d.get('paused_by')}"
    return str(d.get("message", ""))


def _relay_parts(settings: Any) -> tuple[Any, Any]:
    from postback_worker.delivery.sender import Sender

    settings.events.check()
    client = settings.redis.client()
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - circuit events wait in Redis for the next run
        click.echo(f"warning: Redis at {settings.redis.url} does not answer ({exc}); circuit "
                   "events stay there until the next run", err=True)
        client = None
    return Sender.from_settings(settings.delivery, concurrency=32), client


@events.command("send")
def events_send() -> None:
    """Plan and send pending operator events now (beat does this every
    POSTBACK_EVENTS_INTERVAL s)."""
    from postback_worker.ops.visibility.operator_events import Relay

    settings = load_settings()
    store = open_store(settings)
    sender, client = _relay_parts(settings)
    with sender:
        result = Relay(settings, store, sender, client, clock=utcnow).run()
    counts = result.as_dict()
    counts.pop("errors", None)
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing to do")


@events.command("send-test")
@click.option("--message", help="Text carried in the test event.")
def events_send_test(message: str | None) -> None:
    """Send a signed `operator.test` event to POSTBACK_EVENTS_URL now and show the answer."""
    from postback_worker.ops.visibility.operator_events import send_test

    settings = load_settings()
    store = open_store(settings)
    sender, _ = _relay_parts(settings)
    with sender:
        d = send_test(settings, store, sender, utcnow(), message)
    if d["state"] == oe.DELIVERED:
        click.echo(f"delivered {d['id']}: HTTP {d['last_status']}")
        return
    click.echo(f"not delivered {d['id']}: {d['last_error']} (retried by the relay)", err=True)
    raise SystemExit(1)


@events.command("secret")
def events_secret() -> None:
    """Print a new Standard Webhooks secret for POSTBACK_EVENTS_SECRET."""
    from postback_worker.ops.visibility.operator_events import new_secret

    click.echo(new_secret())
