"""`postback-worker` command line: one group, commands in the modules imported below."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deliver affiliate postbacks reliably (Celery + Redis + PostgreSQL).

    Settings come from the environment: DATABASE_URL, REDIS_URL and POSTBACK_* variables.
    """



# Command modules register themselves on `main` when imported.
from postback_worker.cli import core, oncall, security, visibility  # noqa: E402,F401

if __name__ == "__main__":
    main()
