"""The `postback-worker` command group; command modules register on it."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deliver affiliate postbacks reliably (Celery + Redis + PostgreSQL).

    Settings come from the environment: DATABASE_URL, REDIS_URL and POSTBACK_* variables.
    Without DATABASE_URL, a command run in a directory where `postback-worker up` runs (or
    ran) uses that stack: its database, Redis and admin token, from .postback-worker/stack.json.
    """
