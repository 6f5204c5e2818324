"""`postback-worker` command line: one group, commands in the modules imported below."""

from __future__ import annotations

# Command modules register themselves on `main` when imported.
from postback_worker.cli import core, events, oncall, security, visibility  # noqa: F401
from postback_worker.cli.group import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
