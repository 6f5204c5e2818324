"""Commands for template validation, test-fire, signing, security tokens, audit and API keys."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import click

from postback_worker.cli.core import offers, partners
from postback_worker.cli.group import main
from postback_worker.cli.output import (
    FORMAT,
    cell,
    load_settings,
    open_store,
    print_json,
    print_table,
    utcnow,
)
from postback_worker.domain.masking import mask_url
from postback_worker.errors import InvalidInput, NotFound, UnknownOffer, UnknownPartner


def _partner_row(partner_id: str) -> dict[str, Any]:
    row = open_store(load_settings()).get_partner(partner_id)
    if row is None:
        raise UnknownPartner(partner_id)
    return dict(row)


# -- partners validate / test / signing ------------------------------------------------------

@partners.command("validate")
@click.argument("partner_id", required=False)
@click.option("--url", help="Validate this template instead of a saved partner's.")
@click.option("--no-dns", is_flag=True, help="Do not check that the host resolves.")
@click.option("--body", "body_template", help="Also check this body template (with --url).")
@click.option("--body-format", type=click.Choice(["form", "json"]), default="json",
              show_default=True, help="The format of --body.")
@FORMAT
def partners_validate(partner_id: str | None, url: str | None, no_dns: bool,
                      body_template: str | None, body_format: str, fmt: str) -> None:
    """Check a postback template (and body template); exit code 1 when it has errors
    (warnings do not count)."""
    from postback_worker.ops.config import body_report, template_report

    if bool(partner_id) == bool(url):
        raise InvalidInput("give a partner ID or --url URL (one of them)")
    if url is not None:
        template, fmt_body = url, (body_format if body_template is not None else None)
    else:
        row = _partner_row(str(partner_id))
        template, fmt_body = str(row["postback_url"]), row.get("body_format")
        body_template = row.get("body_template")
    problems = template_report(template, dns=not no_dns)
    body_problems = body_report(fmt_body, body_template)
    errors = sum(p.severity == "error" for p in [*problems, *body_problems])
    if fmt == "json":
        print_json({"partner_id": partner_id, "url": mask_url(template), "valid": errors == 0,
                    "problems": [p.to_dict() for p in problems],
                    "body_problems": [p.to_dict() for p in body_problems]})
    else:
        shown = mask_url(template)
        click.echo(shown)
        for p in problems:
            if shown == template and "\n" not in template[:p.position]:
                click.echo(" " * p.position + "^")
            click.echo(f"{p.severity}: {p.describe()}")
        for p in body_problems:
            click.echo(f"body {p.severity}: {p.describe()}")
        total = len(problems) + len(body_problems)
        click.echo(f"{errors} error(s), {total - errors} warning(s)" if total else "template OK")
    if errors:
        sys.exit(1)


@partners.command("test")
@click.argument("partner_id")
@click.option("--transaction-id", help="Use this transaction id instead of a sample.")
@click.option("--payout", help="Use this payout instead of 1.00.")
@click.option("--fire", is_flag=True,
              help="Send it once (recorded as a test attempt, never counted in reports).")
@FORMAT
def partners_test(partner_id: str, transaction_id: str | None, payout: str | None, fire: bool,
                  fmt: str) -> None:
    """Render a partner's postback with sample values; with --fire, send it and explain."""
    from postback_worker.delivery.sender import Sender
    from postback_worker.ops.security.testfire import run_test_fire

    settings = load_settings()
    store = open_store(settings)
    row = _partner_row(partner_id)
    with Sender.from_settings(settings.delivery, concurrency=1) as sender:
        report = run_test_fire(store, row, utcnow(), sender=sender, fire=fire,
                               transaction_id=transaction_id, payout=payout, clock=utcnow)
    if fmt == "json":
        print_json(report.to_dict())
    else:
        click.echo(f"{report.method} {report.url}")
        for name, value in report.headers.items():
            click.echo(f"{name}: {value}")
        if report.signed:
            click.echo(f"signed: yes ({report.signature_scheme})")
        if report.body is not None:
            click.echo(f"body: {report.body}")
        for problem in report.problems:
            click.echo(f"error: {problem}")
        if report.fired:
            click.echo(f"status:   {cell(report.status_code)}")
            click.echo(f"duration: {report.duration_ms} ms")
            click.echo(f"response: {' '.join((report.response_excerpt or '').split())[:200]}")
            click.echo(f"class:    {report.failure_class} - {report.outcome}")
            if report.cause:
                click.echo(f"cause:    {report.cause}")
            click.echo(f"advice:   {report.advice}")
            click.echo(f"recorded as test attempt of postback {report.postback_id}")
        elif not report.problems:
            click.echo("not sent (add --fire to send it once)")
    if report.problems or (report.fired and report.failure_class != "delivered"):
        sys.exit(1)


@partners.command("signing")
@click.argument("partner_id")
@click.option("--enable", "action", flag_value="enable", help="Start signing (new secret).")
@click.option("--rotate", "action", flag_value="rotate",
              help="New secret; the old one also signs during the grace period.")
@click.option("--disable", "action", flag_value="disable", help="Stop signing.")
@click.option("--header", help="Signature header name (default X-Postback-Signature).")
@click.option("--scheme", type=click.Choice(["hmac", "standard"]),
              help="hmac: X-Postback-Signature (default); standard: Standard Webhooks "
                   "(webhook-id, webhook-timestamp, webhook-signature).")
def partners_signing(partner_id: str, action: str | None, header: str | None,
                     scheme: str | None) -> None:
    """Enable, rotate or disable request signing; a new secret is printed once."""
    from postback_worker.ops.config import change_signing

    if action is None:
        raise InvalidInput("choose --enable, --rotate or --disable")
    settings = load_settings()
    secret, summary = change_signing(open_store(settings), partner_id, str(action), utcnow(),
                                     timedelta(hours=settings.security.signing_grace_hours),
                                     header, scheme)
    click.echo(summary)
    if secret:
        click.echo(f"secret (shown once, give it to the partner): {secret}")


@offers.command("token")
@click.argument("offer_id")
def offers_token(offer_id: str) -> None:
    """Create (or replace) the offer's security token for the advertiser GET /postback."""
    from postback_worker.ops.config import set_offer_token

    token = set_offer_token(open_store(load_settings()), offer_id, utcnow())
    if token is None:
        raise UnknownOffer(offer_id)
    click.echo(f"security token for offer {offer_id} (shown once; the previous one stops "
               f"working): {token}")
    click.echo(f"advertiser URL: /postback?offer_id={offer_id}&transaction_id=TRANSACTION_ID"
               f"&security_token={token}")


# -- audit -----------------------------------------------------------------------------------

@main.command("audit")
@FORMAT
def audit(fmt: str) -> None:
    """Check every offer and partner (quarterly review); exit code 1 when there are errors."""
    from postback_worker.ops.security.audit import run_audit

    settings = load_settings()
    report = run_audit(open_store(settings), settings, utcnow())
    if fmt == "json":
        print_json(report.to_dict())
    else:
        counts = report.counts()
        click.echo(f"audit of {report.offers} offer(s) and {report.partners} partner(s): "
                   f"{counts['error']} error(s), {counts['warning']} warning(s), "
                   f"{counts['info']} note(s)")
        if report.findings:
            print_table([f.to_dict() for f in report.findings],
                        ["severity", "kind", "object_id", "check", "message"])
    if report.errors:
        sys.exit(1)


# -- API keys --------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """API keys (scopes: ingest, admin); only their hashes are stored."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what uses the key.")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["ingest", "admin"]), help="Repeat for several scopes.")
def keys_create(name: str, scopes: tuple[str, ...]) -> None:
    """Create a key and print it once."""
    from postback_worker.ops.security.apikeys import create_key

    key_id, key = create_key(open_store(load_settings()), name, scopes, utcnow())
    click.echo(f"key {key_id} ({', '.join(sorted(set(scopes)))}) created; shown once:")
    click.echo(key)


@keys.command("list")
@FORMAT
def keys_list(fmt: str) -> None:
    """List keys (never the keys themselves)."""
    from postback_worker.ops.security.apikeys import list_keys

    rows = list_keys(open_store(load_settings()))
    if fmt == "json":
        print_json(rows)
    else:
        print_table(rows, ["id", "name", "scopes", "created_at", "last_used_at", "revoked_at"])


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key (API processes stop accepting it within POSTBACK_API_KEY_CACHE_SECONDS)."""
    from postback_worker.ops.security.apikeys import revoke_key

    if not revoke_key(open_store(load_settings()), key_id, utcnow()):
        raise NotFound(f"no active key {key_id!r}")
    click.echo(f"key {key_id} revoked")
