"""Core commands: database, offers, partners, show, api, up."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click

from postback_worker.cli.group import main
from postback_worker.cli.output import (
    FORMAT,
    cell,
    load_settings,
    open_store,
    print_json,
    print_table,
)
from postback_worker.dev.demo import DEMO_PARTNER_PORT
from postback_worker.domain.postback import PostbackState
from postback_worker.errors import InvalidInput, NotFound

# -- db --------------------------------------------------------------------------------------

@main.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations to DATABASE_URL."""
    from postback_worker.store.db import upgrade

    settings = load_settings()
    upgrade(settings.database.url, revision)
    click.echo(f"database at {_safe_url(settings.database.url)} is at revision {revision}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision of DATABASE_URL."""
    from postback_worker.store.db import sqlite_path

    settings = load_settings()
    path = sqlite_path(settings.database.url)
    missing = path is not None and not path.exists()  # not created just to look at it
    revision = None if missing else open_store(settings, migrated=False).schema_revision()
    click.echo(revision or "none (run: postback-worker db upgrade)")


def _safe_url(url: str) -> str:
    from postback_worker.domain.masking import mask_url

    return mask_url(url)


# -- offers ----------------------------------------------------------------------------------

@main.group()
def offers() -> None:
    """Offers and their click session lifespans."""


@offers.command("add")
@click.option("--id", "offer_id", required=True, help="Offer id (used in clicks).")
@click.option("--name", help="Display name (default: the id).")
@click.option("--campaign-type", default="ecommerce", show_default=True,
              type=click.Choice(["lead_gen", "ecommerce", "b2b_saas", "financial"]),
              help="Sets the default click session lifespan (14/30/90/120 days).")
@click.option("--lifespan-days", type=int, help="Override the click session lifespan.")
@click.option("--landing-url", help="Where /click redirects; may contain {transaction_id}.")
@click.option("--allow-multiple", is_flag=True,
              help="Count every conversion of a click+goal, not only the first (same as "
                   "--duplicate-mode separate).")
@click.option("--allowed-ips", help="Advertiser networks allowed to call GET /postback with the "
                                    "offer's token (comma-separated CIDRs); default: any.")
@click.option("--min-click-seconds", type=int,
              help="A conversion sooner after its click is recorded as too_soon.")
@click.option("--max-click-seconds", type=int,
              help="A conversion later after its click is recorded as too_late.")
@click.option("--daily-cap", type=int, help="Attributed conversions per UTC day (then capped).")
@click.option("--daily-payout-cap", type=float, help="Payout per UTC day (then capped).")
@click.option("--affiliate-daily-cap", type=int, help="Conversions per affiliate per UTC day.")
@click.option("--affiliate-daily-payout-cap", type=float,
              help="Payout per affiliate per UTC day.")
@click.option("--duplicate-mode", type=click.Choice(["update", "ignore", "separate"]),
              help="A new event for a known conversion (offer + transaction + goal): update "
                   "it (default), ignore it, or count it as a separate conversion.")
@click.option("--hold-hours", type=float,
              help="Approved postbacks wait this long; a reversal meanwhile fires nothing.")
@click.option("--payout-rule", "payout_rules", multiple=True, metavar="PARTNER=RULE",
              help="Payout rule for a partner on this offer ('*' for any partner), "
                   "e.g. '*=percent:40'. Repeatable.")
def offers_add(offer_id: str, name: str | None, campaign_type: str, lifespan_days: int | None,
               landing_url: str | None, allow_multiple: bool, duplicate_mode: str | None,
               hold_hours: float | None, payout_rules: tuple[str, ...], **rules: Any) -> None:
    """Create or update an offer."""
    from postback_worker.ops.config import parse_offer

    data: dict[str, Any] = {"id": offer_id, "campaign_type": campaign_type,
                            "allow_multiple": allow_multiple}
    for key, value in (("name", name), ("lifespan_days", lifespan_days),
                       ("landing_url", landing_url), ("duplicate_mode", duplicate_mode),
                       ("hold_hours", hold_hours), *rules.items()):
        if value is not None:
            data[key] = value
    if payout_rules:
        data["payout_rules"] = ",".join(payout_rules)
    row = parse_offer(data, datetime.now(UTC))
    open_store(load_settings()).upsert_offer(row)
    mode = row["duplicate_mode"]
    extra = (f", duplicates: {mode}" if mode != "update" else "") + (
        f", hold {row['hold_hours']:g} h" if row["hold_hours"] else "")
    click.echo(f"offer {row['id']}: {row['campaign_type']}, lifespan {row['lifespan_days']} "
               f"days{extra}")


@offers.command("list")
@FORMAT
def offers_list(fmt: str) -> None:
    """List offers."""
    rows = open_store(load_settings()).list_offers()
    if fmt == "json":
        print_json(rows)
    else:
        print_table(rows, ["id", "name", "campaign_type", "lifespan_days", "duplicate_mode",
                           "hold_hours", "landing_url"])


# -- partners --------------------------------------------------------------------------------

@main.group()
def partners() -> None:
    """Partners (postback destinations)."""


@partners.command("add")
@click.option("--id", "partner_id", required=True,
              help="Partner id; clicks with this aff_id fire its postbacks.")
@click.option("--name", help="Display name (default: the id).")
@click.option("--url", "postback_url", required=True,
              help="Postback URL template with {macros}, e.g. "
                   "'https://p.example/pb?click={transaction_id}&amount={payout}'.")
@click.option("--method", type=click.Choice(["GET", "POST"]), default="GET", show_default=True)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds.")
@click.option("--success-check", help="Text the response body must contain, e.g. success=true.")
@click.option("--fire-on", default="approved", show_default=True,
              help="Comma-separated conversion statuses that fire this partner.")
@click.option("--disabled", is_flag=True, help="Create the partner disabled.")
@click.option("--scope", type=click.Choice(["own", "global"]), default="own", show_default=True,
              help="own: conversions of its clicks; global: every attributed conversion.")
@click.option("--offer-ids", help="For global partners: only these offers (comma-separated).")
@click.option("--max-attempts", type=int, help="Override the retry policy.")
@click.option("--base-delay", type=float, help="Override the first retry delay (seconds).")
@click.option("--max-delay", type=float, help="Override the retry delay cap (seconds).")
@click.option("--horizon", type=float, help="Override how long retries may go on (seconds).")
@click.option("--body-format", type=click.Choice(["form", "json"]),
              help="POST body built from --body (default: the URL's query string as a form).")
@click.option("--body", "body_template",
              help="Body template with {macros}, e.g. "
                   "'{\"click\": \"{transaction_id}\", \"amount\": \"{payout}\"}'; "
                   "@FILE reads it from a file.")
@click.option("--header", "headers", multiple=True,
              help="Custom header 'Name: value' (repeatable); stored as a secret, never shown. "
                   "Without --header the partner's headers are kept.")
@click.option("--no-headers", is_flag=True, help="Remove the partner's custom headers.")
@click.option("--egress-proxy",
              help="Forward proxy for this partner (http://host:port), or 'direct'; default: "
                   "POSTBACK_EGRESS_PROXY.")
@click.option("--fire-events", help="Comma-separated events that fire this partner: approved "
                                    "(entering a --fire-on status; the default), reversal, "
                                    "adjustment, status (any status change).")
@click.option("--template", "templates", multiple=True, metavar="EVENT=URL",
              help="A URL template for one event, e.g. 'reversal=https://p.example/"
                   "refund?t={transaction_id}'. Repeatable.")
@click.option("--status-map", help="{status} as the partner names it, e.g. "
                                   "'approved=sale,pending=lead'.")
@click.option("--payout-rule", help="The affiliate's {payout}: advertiser (default), "
                                    "fixed:AMOUNT or percent:P of the sale amount.")
@click.option("--hold-hours", type=float, help="Override the offers' hold period (hours).")
def partners_add(partner_id: str, name: str | None, postback_url: str, method: str,
                 timeout: float, success_check: str | None, fire_on: str, disabled: bool,
                 scope: str, offer_ids: str | None, max_attempts: int | None,
                 base_delay: float | None, max_delay: float | None,
                 horizon: float | None, body_format: str | None, body_template: str | None,
                 headers: tuple[str, ...], no_headers: bool, egress_proxy: str | None,
                 fire_events: str | None, templates: tuple[str, ...], status_map: str | None,
                 payout_rule: str | None, hold_hours: float | None) -> None:
    """Create or update a partner; an invalid template is refused with every problem."""
    from postback_worker.ops.config import parse_partner

    data: dict[str, Any] = {
        "id": partner_id, "postback_url": postback_url, "method": method, "timeout": timeout,
        "fire_statuses": fire_on, "enabled": not disabled, "scope": scope,
    }
    for key, value in (("name", name), ("success_check", success_check),
                       ("offer_ids", offer_ids), ("max_attempts", max_attempts),
                       ("base_delay", base_delay), ("max_delay", max_delay),
                       ("horizon", horizon), ("body_format", body_format),
                       ("egress_proxy", egress_proxy), ("fire_events", fire_events),
                       ("status_map", status_map), ("payout_rule", payout_rule),
                       ("hold_hours", hold_hours)):
        if value is not None:
            data[key] = value
    if body_template is not None:
        data["body_template"] = _read_at_file(body_template)
    if headers or no_headers:
        data["headers"] = [] if no_headers else list(headers)
    if templates:
        data["templates"] = dict(_pair(t) for t in templates)
    row = parse_partner(data, datetime.now(UTC))
    open_store(load_settings()).upsert_partner(row)
    state = "enabled" if row["enabled"] else "disabled"
    click.echo(f"partner {row['id']} ({state}): {row['method']} {_safe_url(row['postback_url'])}")


def _read_at_file(value: str) -> str:
    """The value, or the contents of FILE for '@FILE'."""
    if not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        click.echo(f"error: --body: cannot read {value[1:]}: {exc.strerror}", err=True)
        sys.exit(2)


def _pair(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq:
        raise InvalidInput(f"--template {text!r}: write EVENT=URL, e.g. reversal=https://...")
    return key.strip(), value.strip()


@partners.command("list")
@FORMAT
def partners_list(fmt: str) -> None:
    """List partners."""
    from postback_worker.ops.config import redact_partner

    rows = [redact_partner(r) for r in open_store(load_settings()).list_partners()]
    if fmt == "json":
        print_json(rows)
    else:
        print_table(rows, ["id", "name", "enabled", "method", "fire_statuses", "fire_events",
                           "scope", "postback_url"])


# -- inspection ------------------------------------------------------------------------------

@main.command("show")
@click.argument("conversion_id")
@FORMAT
def show(conversion_id: str, fmt: str) -> None:
    """Show a conversion's attribution, its postbacks and every attempt."""
    from postback_worker.ops.lookup import conversion_detail

    detail = conversion_detail(open_store(load_settings()), conversion_id)
    if detail is None:
        raise NotFound(f"no conversion {conversion_id!r}")
    if fmt == "json":
        print_json(detail)
        return
    c = detail["conversion"]
    click.echo(f"conversion {c['id']}: {c['state']} - {c['reason'] or ''}")
    click.echo(f"  transaction {c['transaction_id']}  offer {cell(c['offer_id'])}  "
               f"affiliate {cell(c['aff_id'])}  goal {c['goal_id'] or '-'}  "
               f"status {c['status']}  payout {cell(c['payout'])} {c['currency'] or ''}")
    click.echo(f"  occurred {cell(c['occurred_at'])}  received {cell(c['received_at'])}  "
               f"processed {cell(c['processed_at'])}")
    asked = detail["requested_event"]
    if asked:
        click.echo(f"  ({asked['id']} is an event of this conversion: {asked['state']} - "
                   f"{asked['reason'] or ''})")
    click.echo("events:")
    for e in detail["events"]:
        click.echo(f"  {e['seq']} {cell(e['received_at'])} {e['summary']} "
                   f"(payout {cell(e['payout'])} {e['currency'] or ''}; event {e['event_id']})")
        for p in e["postbacks"]:
            click.echo(f"      {p['partner_id']} {p['event'] or '-'}: {p['state']} after "
                       f"{p['attempts']} attempt(s)" + (f" - {p['reason']}" if p["reason"]
                                                        else ""))
    if not detail["postbacks"]:
        click.echo("  no postbacks")
    for p in detail["postbacks"]:
        click.echo(f"postback {p['id']} -> partner {p['partner_id']}: {p['state']}"
                   f" after {p['attempts']} attempt(s)"
                   + (f" - {p['reason']}" if p["reason"] else ""))
        if p["event"]:
            click.echo(f"  for event {p['event_seq']} ({p['event']})")
        click.echo(f"  {p['method']} {p['url']}")
        if p["next_attempt_at"] and p["state"] == PostbackState.RETRY_SCHEDULED:
            click.echo(f"  next attempt at {cell(p['next_attempt_at'])}")
        for a in p["attempts_log"]:
            click.echo(f"  #{a['attempt_no']} {cell(a['started_at'])} {a['duration_ms']:.1f} ms "
                       f"status {cell(a['status_code'])} {a['failure_class']}"
                       + (f" - {a['error']}" if a["error"] else ""))


@main.group("conversions")
def conversions() -> None:
    """Conversions: explicit updates by conversion id."""


@conversions.command("update")
@click.argument("conversion_id")
@click.option("--status", help="The new status, e.g. approved, rejected, reversed.")
@click.option("--payout", help="The new payout (the advertiser's amount).")
@click.option("--sale-amount", help="The new sale amount.")
@click.option("--currency", help="The currency of the amounts (3 letters).")
@click.option("--id", "event_id", help="Idempotency key of this update (default: a new id).")
def conversions_update(conversion_id: str, status: str | None, payout: str | None,
                       sale_amount: str | None, currency: str | None,
                       event_id: str | None) -> None:
    """Send a new status and/or amounts for a conversion (like the advertiser would)."""
    from postback_worker.ops.conversions import update_event
    from postback_worker.producer import Producer

    settings = load_settings()
    changes = {"status": status, "payout": payout, "sale_amount": sale_amount,
               "currency": currency, "id": event_id}
    item = update_event(open_store(settings), conversion_id,
                        {k: v for k, v in changes.items() if v is not None})
    producer = Producer(settings)
    try:
        (accepted,) = producer.send_conversions([item])
    finally:
        producer.close()
    click.echo(f"accepted update {accepted} of conversion {conversion_id}")


# -- running ---------------------------------------------------------------------------------

@main.command("api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int)
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    load_settings()
    uvicorn.run("postback_worker.api.app:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level="info", access_log=False)


@main.command("up")
@click.option("--demo", is_flag=True,
              help="Also run the demo: offer, partners, clicks, conversions, and a local "
                   "partner that keeps answering while the stack runs.")
@click.option("--exit-after-demo", is_flag=True, help="Stop everything once the demo has printed.")
@click.option("--api-port", default=8000, show_default=True, type=int)
@click.option("--flower-port", default=5555, show_default=True, type=int)
@click.option("--partner-port", default=DEMO_PARTNER_PORT, show_default=True, type=int,
              help="Port of the demo's local partner.")
@click.option("--data-dir", default=".postback-worker", show_default=True,
              help="Where the SQLite file, local Redis data, logs and stack.json go.")
def up(demo: bool, exit_after_demo: bool, api_port: int, flower_port: int, partner_port: int,
       data_dir: str) -> None:
    """Bring up API, worker, beat and Flower on local defaults (SQLite, Redis database 1).

    Writes DATA_DIR/stack.json (readable by you only) so that commands run in another
    terminal of this directory (or below it) use this stack without any exported setting;
    they look for .postback-worker/stack.json, the default DATA_DIR."""
    from postback_worker.dev.stack import run_stack

    sys.exit(run_stack(demo=demo or exit_after_demo, exit_after_demo=exit_after_demo,
                       api_port=api_port, flower_port=flower_port, data_dir=data_dir,
                       partner_port=partner_port))
