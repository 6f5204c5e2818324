"""The `postback-worker` command group; command modules register on it.

Errors are mapped to messages and exit codes here, in one place (the table is in
postback_worker/errors.py and the README).
"""

from __future__ import annotations

from typing import Any, NoReturn

import click

from postback_worker.errors import PostbackWorkerError, Unavailable


def _unavailable(exc: Exception) -> Unavailable | None:
    """PostgreSQL or Redis that cannot be reached, as an Unavailable error; None otherwise."""
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return Unavailable(f"the database is unavailable: {str(exc.orig).strip().splitlines()[0]}")
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Unavailable(f"Redis is unavailable: {exc}")
    return None


def fail(exc: PostbackWorkerError) -> NoReturn:
    """Print an error (and each bad field) to stderr and exit with its code."""
    if exc.errors:
        for e in exc.errors:
            click.echo(f"error: {e.field}: {e.message}", err=True)
    else:
        click.echo(f"error: {exc.message}", err=True)
    raise SystemExit(exc.exit_code)


class Group(click.Group):
    """A click group that maps the project's errors to messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PostbackWorkerError as exc:
            fail(exc)
        except Exception as exc:
            mapped = _unavailable(exc)
            if mapped is None:
                raise
            fail(mapped)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deliver affiliate postbacks reliably (Celery + Redis + PostgreSQL).

    Settings come from the environment: DATABASE_URL, REDIS_URL and POSTBACK_* variables.
    Without DATABASE_URL, a command run in a directory where `postback-worker up` runs (or
    ran) uses that stack: its database, Redis and admin token, from .postback-worker/stack.json.
    Exit codes: 0 done, 1 a check found problems, 2 invalid input, 3 not found, 4 conflict,
    5 database or Redis unavailable (or not migrated).
    """
