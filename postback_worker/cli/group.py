"""The `postback-worker` command group; command modules register on it."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deliver affiliate postbacks reliably (Celery + Redis + PostgreSQL).

    Settings come from the environment: DATABASE_URL, REDIS_URL and POSTBACK_* variables.
    """
