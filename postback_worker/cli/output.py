"""Shared pieces of the command line: settings, store, output formats, errors."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from postback_worker.dev import state
from postback_worker.errors import Unavailable
from postback_worker.settings import Settings


def utcnow() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def load_settings() -> Settings:
    """Settings from the environment; without DATABASE_URL, completed from the local stack's
    `.postback-worker/stack.json` (written by `postback-worker up`) when there is one."""
    return Settings.from_env(state.local_env(os.environ))


NOT_MIGRATED = "database not migrated: run postback-worker db upgrade"


def open_store(settings: Settings, *, migrated: bool = True) -> Any:
    """The store of DATABASE_URL. With `migrated`, a database without our schema (or, for
    SQLite, no file at all: none is created) raises Unavailable (one line, exit code 5).
    Without it, nothing is checked (and SQLite creates a missing file when first used)."""
    from postback_worker.store.db import sqlite_path
    from postback_worker.store.repo import Store

    url = settings.database.url
    if migrated:
        path = sqlite_path(url)
        if path is not None and not path.exists():
            raise Unavailable(f"{NOT_MIGRATED} (no database file {path})")
    store = Store.from_url(url)
    if migrated and store.schema_revision() is None:
        raise Unavailable(NOT_MIGRATED)
    return store


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, default=_json_default, indent=2))


FORMAT = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                      show_default=True, help="Output format.")


