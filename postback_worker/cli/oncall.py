"""Commands for dead letters, replay, re-attribution, partner health, support bundles."""

from __future__ import annotations

import csv
import getpass
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from postback_worker.cli.core import partners
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
from postback_worker.errors import InvalidInput, NotFound, UnknownPartner
from postback_worker.ops.oncall import deadletters as dlq_ops
from postback_worker.ops.oncall.deadletters import Filter


def _who(by: str | None) -> str:
    return by or f"{getpass.getuser()} (cli)"


def _redis(settings: Any) -> Any | None:
    client = settings.redis.client()
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any connection problem: say so, go on
        click.echo(f"warning: Redis at {settings.redis.url} does not answer ({exc}); circuit "
                   "states are unknown", err=True)
        return None
    return client


def filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The dead-letter filter options, shared by list, stats, replay and purge."""
    for option in reversed([
        click.option("--partner", "partner_id", help="Partner id."),
        click.option("--offer", "offer_id", help="Offer id."),
        click.option("--class", "failure_class", type=click.Choice(dlq_ops.FAILURE_CLASSES),
                     help="Failure class."),
        click.option("--since", help="ISO time or age (30m, 6h, 7d): dead-lettered since."),
        click.option("--until", help="ISO time or age: dead-lettered until."),
        click.option("--status", "last_status", help="Last HTTP status code, e.g. 503."),
    ]):
        fn = option(fn)
    return fn


def _filter(kw: dict[str, Any]) -> Filter:
    data = {k: kw.pop(k) for k in ("partner_id", "offer_id", "failure_class", "since", "until",
                                   "last_status")}
    return Filter.parse(data, utcnow())


FORMAT3 = click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]),
                       default="table", show_default=True, help="Output format.")


@main.group()
def dlq() -> None:
    """Dead letters: list, count, inspect, replay, purge."""


@dlq.command("list")
@filters
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000),
              help="Rows per page.")
@click.option("--page", default=1, show_default=True, type=click.IntRange(1), help="Page number.")
@click.option("--after", default=None, metavar="CURSOR",
              help="Start after this row (the cursor the previous page printed); faster than "
                   "--page deep into a long list.")
@FORMAT3
def dlq_list(limit: int, page: int, after: str | None, fmt: str, **kw: Any) -> None:
    """List dead letters, newest first."""
    filt = _filter(kw)
    cursor = None if after is None else dlq_ops.Cursor.parse(after)
    rows, total = dlq_ops.list_dead_letters(open_store(load_settings()), filt, limit=limit,
                                            offset=(page - 1) * limit, after=cursor)
    nxt = dlq_ops.next_after(rows, limit)
    if fmt == "json":
        print_json({"dead_letters": rows, "total": total, "page": page, "limit": limit,
                    "next_after": nxt})
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(dlq_ops.COLUMNS)
        for r in rows:
            w.writerow([cell(r[c]) if r[c] is not None else "" for c in dlq_ops.COLUMNS])
    else:
        print_table(rows, ["postback_id", "partner_id", "offer_id", "failure_class",
                           "last_status", "attempts", "created_at", "replay_count", "url"])
        if cursor is None:
            pages = max(1, -(-total // limit))
            click.echo(f"{total} dead letter(s) ({filt.describe()}); page {page} of {pages}")
        else:
            click.echo(f"{total} dead letter(s) ({filt.describe()})")
        if nxt:
            click.echo(f"next page: --after {nxt}")


@dlq.command("stats")
@filters
@FORMAT
def dlq_stats(fmt: str, **kw: Any) -> None:
    """Count dead letters by failure class, partner and last status."""
    filt = _filter(kw)
    data = dlq_ops.stats(open_store(load_settings()), filt)
    if fmt == "json":
        print_json(data)
        return
    click.echo(f"{data['total']} dead letter(s) ({filt.describe()})")
    for title, key in (("by failure class", "by_class"), ("by partner", "by_partner"),
                       ("by last status", "by_status")):
        click.echo(f"{title}:")
        for name, n in data[key].items():
            click.echo(f"  {name:<24} {n}")
    if data["by_partner_and_class"]:
        click.echo("by partner and class:")
        print_table(data["by_partner_and_class"], ["partner_id", "failure_class", "count"])


@dlq.command("show")
@click.argument("postback_id")
@FORMAT
def dlq_show(postback_id: str, fmt: str) -> None:
    """A postback's URL (secrets masked) and every attempt."""
    detail = dlq_ops.show(open_store(load_settings()), postback_id)
    if detail is None:
        raise NotFound(f"no postback {postback_id!r}")
    if fmt == "json":
        print_json(detail)
        return
    p, dead = detail["postback"], detail["dead_letter"]
    click.echo(f"postback {p['id']} -> partner {p['partner_id']}: {p['state']} after "
               f"{p['attempts']} attempt(s)")
    click.echo(f"  conversion {p['conversion_id']}")
    click.echo(f"  {p['method']} {p['url']}")
    for name, value in p["headers"].items():
        click.echo(f"  {name}: {value}")
    if p["signature_scheme"]:
        click.echo(f"  signed ({p['signature_scheme']})")
    if p["body"]:
        click.echo(f"  body ({p['body_format']}): {p['body']}")
    if p["reason"]:
        click.echo(f"  reason: {p['reason']}")
    if p["triggered_by"]:
        click.echo(f"  triggered by: {p['triggered_by']}")
    if dead:
        click.echo(f"  dead letter since {cell(dead['created_at'])}: class "
                   f"{dead['failure_class']}, last status {cell(dead['last_status'])}, "
                   f"replayed {dead['replay_count']} time(s)")
    for a in detail["attempts"]:
        click.echo(f"  #{a['attempt_no']} {cell(a['started_at'])} {a['duration_ms']:.1f} ms "
                   f"status {cell(a['status_code'])} {a['failure_class']}"
                   + (f" - {a['error']}" if a["error"] else ""))
        if a["response_excerpt"]:
            click.echo(f"      response: {' '.join(a['response_excerpt'].split())[:200]}")


@dlq.command("replay")
@filters
@click.option("--dry-run", is_flag=True, help="Print what would be replayed; change nothing.")
@click.option("--rate", "rate_text", default=None,
              help="Postbacks per second, e.g. 10/s (default POSTBACK_REPLAY_RATE).")
@click.option("--limit", type=click.IntRange(1), help="At most this many (oldest first).")
@click.option("--wait", default=120.0, show_default=True, type=float,
              help="Seconds to follow progress (0: do not wait).")
@click.option("--by", help="Who triggers it (recorded on each postback; default: your user).")
def dlq_replay(dry_run: bool, rate_text: str | None, limit: int | None, wait: float,
               by: str | None, **kw: Any) -> None:
    """Replay dead letters on the `replay` queue at a bounded rate (safe to run twice)."""
    from postback_worker.ops.oncall import replay

    filt = _filter(kw)
    settings = load_settings()
    try:
        rate = replay.parse_rate(rate_text) if rate_text else settings.oncall.replay_rate
    except ValueError as exc:
        raise InvalidInput(f"--rate: {exc}") from exc
    store = open_store(settings)
    enqueue = None if dry_run else replay.celery_enqueue(settings)
    run, plan = replay.start(store, settings, filt, who=_who(by), rate=rate, now=utcnow(),
                             enqueue=enqueue, dry_run=dry_run, limit=limit)
    for c in run.skipped:
        click.echo(f"skipped {c.postback_id} (partner {c.partner_id}): {c.problem}")
    if run.selected == 0:
        click.echo(f"nothing to replay ({filt.describe()})")
        return
    note = (f"; {run.rerendered} URL(s) rendered again with the partner's current template"
            if run.rerendered else "")
    if dry_run:
        print_table([c.as_dict() for c in plan.ready],
                    ["postback_id", "partner_id", "failure_class", "rerendered", "url"])
        click.echo(f"dry run {run.id}: would replay {run.selected} dead letter(s) at "
                   f"{rate:g}/s{note}")
        return
    click.echo(f"replay run {run.id}: {run.queued} dead letter(s) queued on the 'replay' queue "
               f"at {rate:g}/s{note}")
    if run.queued < run.selected:
        click.echo(f"{run.selected - run.queued} were no longer dead letters (another run took "
                   "them) and were left alone")
    counts = _follow(store, "replay", run.id, run.queued, wait)
    click.echo(f"delivered {counts['delivered']}, failed again {counts['failed']}, "
               f"still pending {counts['pending']}")
    if counts["pending"]:
        click.echo(f"pending postbacks keep going; check with: postback-worker dlq run {run.id}")


def _follow(store: Any, kind: str, run_id: str, total: int, wait: float) -> dict[str, int]:
    from postback_worker.ops.oncall import replay

    counts = replay.tally(store, kind, run_id)
    deadline = time.monotonic() + wait
    if wait > 0 and total:
        with click.progressbar(length=total, label="replaying", file=sys.stderr) as bar:
            done = 0
            while True:
                counts = replay.tally(store, kind, run_id)
                now_done = counts["delivered"] + counts["failed"]
                bar.update(now_done - done)
                done = now_done
                if counts["pending"] == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    return replay.save_tally(store, kind, run_id, utcnow())


@dlq.command("run")
@click.argument("run_id")
@FORMAT
def dlq_run(run_id: str, fmt: str) -> None:
    """A replay or re-attribution run: who, filters and its tally."""
    from postback_worker.ops.oncall import replay

    row = replay.get_run(open_store(load_settings()), run_id)
    if row is None:
        raise NotFound(f"no run {run_id!r}")
    if fmt == "json":
        print_json(row)
        return
    click.echo(f"{row['kind']} run {row['id']} by {row['triggered_by']} at "
               f"{cell(row['created_at'])}{' (dry run)' if row['dry_run'] else ''}")
    click.echo(f"  filters: {row['filters']}")
    click.echo(f"  selected {row['selected']}")
    if "tally" in row:
        t = row["tally"]
        click.echo(f"  delivered {t['delivered']}, failed again {t['failed']}, "
                   f"still pending {t['pending']}")


@dlq.command("purge")
@filters
@click.option("--yes", is_flag=True, help="Really delete the matching dead letters.")
@click.option("--by", help="Who purges (recorded on each postback; default: your user).")
def dlq_purge(yes: bool, by: str | None, **kw: Any) -> None:
    """Delete matching dead letters for good (needs --yes)."""
    filt = _filter(kw)
    store = open_store(load_settings())
    if not yes:
        _, total = dlq_ops.list_dead_letters(store, filt, limit=1)
        raise InvalidInput(f"purge deletes {total} dead letter(s) ({filt.describe()}); add --yes "
                           "to do it")
    n = dlq_ops.purge(store, filt, _who(by), utcnow())
    click.echo(f"purged {n} dead letter(s) ({filt.describe()})")


# -- re-attribution --------------------------------------------------------------------------

@main.command("reattribute")
@click.option("--offer", "offer_id", required=True, help="Offer whose lifespan was extended.")
@click.option("--since", help="Conversions received since (ISO time or age such as 30d).")
@click.option("--until", help="Conversions received until.")
@click.option("--dry-run", is_flag=True, help="List what would be re-attributed; change nothing.")
@click.option("--wait", default=60.0, show_default=True, type=float,
              help="Seconds to follow progress (0: do not wait).")
@click.option("--by", help="Who triggers it (recorded on the postbacks; default: your user).")
def reattribute_cmd(offer_id: str, since: str | None, until: str | None, dry_run: bool,
                    wait: float, by: str | None) -> None:
    """Attribute expired_click conversions that the offer's current lifespan now covers."""
    from postback_worker.ops.oncall import reattribute, replay

    now = utcnow()
    times: dict[str, datetime | None] = {}
    for name, value in (("since", since), ("until", until)):
        try:
            times[name] = dlq_ops.parse_time(value, now) if value else None
        except ValueError as exc:
            raise InvalidInput(f"--{name}: {exc}") from exc
    settings = load_settings()
    store = open_store(settings)
    run_id, plan, taken = reattribute.start(
        store, offer_id, since=times["since"], until=times["until"], who=_who(by), now=now,
        enqueue=None if dry_run else replay.celery_enqueue(settings), dry_run=dry_run)
    if dry_run and plan.eligible:
        print_table(plan.eligible, ["conversion_id", "transaction_id", "aff_id", "click_age_days",
                                    "received_at"])
    verb = "would re-attribute" if dry_run else "re-attributing"
    click.echo(f"{'dry run' if dry_run else 'run'} {run_id}: offer {offer_id} lifespan now "
               f"{plan.lifespan_days} days; {verb} {len(plan.eligible)} expired_click "
               f"conversion(s); {plan.still_expired} stay expired (click still too old)")
    if plan.unknown_click:
        click.echo(f"{plan.unknown_click} conversion(s) with an unknown click cannot be "
                   "attributed; they stay reported as unknown_click")
    if dry_run or not taken:
        return
    deadline = time.monotonic() + wait
    while wait > 0 and time.monotonic() < deadline:
        if all(c is not None and c["state"] != "received"
               for c in (store.get_conversion(e["conversion_id"]) for e in plan.eligible)):
            break
        time.sleep(0.5)
    counts = replay.save_tally(store, "reattribute", run_id, utcnow())
    click.echo(f"postbacks: delivered {counts['delivered']}, failed {counts['failed']}, "
               f"still pending {counts['pending']}")


# -- partners: health, pause, resume, limits -------------------------------------------------

@partners.command("health")
@FORMAT
def partners_health(fmt: str) -> None:
    """Circuit state, pause, limits, waiting postbacks and last hour's success per partner."""
    from postback_worker.ops.oncall.partner_health import health
    from postback_worker.ops.visibility.dashboard import duration

    settings = load_settings()
    rows = health(open_store(settings), settings, _redis(settings), utcnow())
    if fmt == "json":
        print_json(rows)
        return
    for r in rows:
        r["paused"] = "paused" if r["paused"] else "-"
        rate = r["success_rate_last_hour"]
        r["success_1h"] = "-" if rate is None else f"{rate * 100:.0f}%"
        age = r["backlog_age_seconds"]
        r["backlog_age"] = "-" if age is None else duration(age)
    print_table(rows, ["partner_id", "circuit", "paused", "rate_limit", "max_concurrency",
                       "in_flight", "waiting", "held", "behind_dead_letter", "backlog_age",
                       "dead_letters",
                       "attempts_last_hour", "success_1h"])
    for r in rows:
        if r["circuit"] not in ("closed", "unknown") and r["circuit_reason"]:
            click.echo(f"{r['partner_id']}: circuit {r['circuit']}: {r['circuit_reason']}")


@partners.command("pause")
@click.argument("partner_id")
@click.option("--reason", help="Why (shown with its waiting postbacks).")
def partners_pause(partner_id: str, reason: str | None) -> None:
    """Stop firing to a partner; its postbacks wait without spending attempts."""
    from postback_worker.ops.oncall.partner_health import pause

    pause(open_store(load_settings()), partner_id, reason, utcnow())
    click.echo(f"partner {partner_id} paused; its postbacks wait until "
               f"'postback-worker partners resume {partner_id}'")


@partners.command("resume")
@click.argument("partner_id")
def partners_resume(partner_id: str) -> None:
    """Fire to a partner again (also closes its circuit); waiting postbacks go now."""
    from postback_worker.ops.oncall.partner_health import resume

    settings = load_settings()
    woke = resume(open_store(settings), settings, _redis(settings), partner_id, utcnow())
    click.echo(f"partner {partner_id} resumed; {woke} waiting postback(s) released")


@partners.command("limits")
@click.argument("partner_id")
@click.option("--rate", "rate_text", help="Requests per second across all workers (0: none).")
@click.option("--concurrency", type=click.IntRange(0, 10000),
              help="Requests at once across all workers (0: none).")
def partners_limits(partner_id: str, rate_text: str | None, concurrency: int | None) -> None:
    """Set a partner's rate limit and concurrency cap (shared by all workers)."""
    from postback_worker.ops.oncall.partner_health import set_limits
    from postback_worker.ops.oncall.replay import parse_rate

    store = open_store(load_settings())
    current = store.get_partner(partner_id)
    if current is None:
        raise UnknownPartner(partner_id)
    rate = current["rate_limit"]
    if rate_text is not None:
        try:
            rate = None if rate_text.strip() in {"0", "0/s"} else parse_rate(rate_text)
        except ValueError as exc:
            raise InvalidInput(f"--rate: {exc}") from exc
    cap = current["max_concurrency"] if concurrency is None else concurrency
    set_limits(store, partner_id, rate_limit=rate, max_concurrency=cap, now=utcnow())
    click.echo(f"partner {partner_id}: rate limit "
               f"{f'{rate:g}/s' if rate else 'none'}, concurrency cap {cap or 'none'}")


# -- support bundle --------------------------------------------------------------------------

@main.command("support-bundle")
@click.option("--partner", "partner_id", required=True, help="Partner id.")
@click.option("--since", default="24h", show_default=True, help="ISO time or age (6h, 7d).")
@click.option("--until", help="ISO time or age (default: now).")
@click.option("--out", "out_path", type=click.Path(path_type=Path),
              help="Directory, or a file ending in .tar.gz (default: "
                   "support-bundle-PARTNER-TIME.tar.gz in the current directory, a name "
                   "this repository's .gitignore lists).")
def support_bundle(partner_id: str, since: str, until: str | None,
                   out_path: Path | None) -> None:
    """Write a redacted archive to attach to a ticket with a partner or provider."""
    from postback_worker.ops.oncall import bundle

    now = utcnow()
    try:
        start = dlq_ops.parse_time(since, now)
    except ValueError as exc:
        raise InvalidInput(f"--since: {exc}") from exc
    try:
        end = dlq_ops.parse_time(until, now) if until else now
    except ValueError as exc:
        raise InvalidInput(f"--until: {exc}") from exc
    if start > end:
        raise InvalidInput("--until: must be after --since")
    settings = load_settings()
    files = bundle.collect(open_store(settings), settings, partner_id, start, end, now)
    out = out_path or Path(f"support-bundle-{partner_id}-{now:%Y%m%dT%H%M%SZ}.tar.gz")
    written = bundle.write(files, out)
    click.echo(files["SUMMARY.txt"].split("\n\n")[1].splitlines()[0])
    click.echo(f"support bundle written to {written}")

