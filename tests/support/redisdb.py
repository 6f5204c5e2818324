"""The test suite's claim on its Redis database: it flushes that database, so it must hold
nothing the suite did not write, and no other live test run may be using it."""

from __future__ import annotations

import os
import socket
from typing import Any

from postback_worker.dev.services import process_alive
from postback_worker.worker.queues import QUEUES

OWNER_KEY = "postback-worker:test-suite:owner"
# Keys postback-worker and Celery write: an earlier run of the suite may have left these.
_OURS = ("pbw:", "postback-worker:", "_kombu.", "unacked", "celery", "_celery")


def ours(key: bytes) -> bool:
    name = key.decode(errors="replace")
    return name.startswith(_OURS) or name.split("\x06\x16")[0] in QUEUES


def _foreign(client: Any) -> bool:
    """True when the database holds a key that is not of postback-worker's or Celery's."""
    return any(not ours(k) for k in client.scan_iter(count=500))


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(client: Any) -> str | None:
    """Mark the database as this run's. None when it is ours to flush (empty, already ours,
    or left by a run that has ended); otherwise why not."""
    raw = client.get(OWNER_KEY)
    owner = raw.decode() if raw else None
    if owner is None and _foreign(client):
        return "holds keys the test suite did not create"
    if owner is not None and owner != _me() and process_alive(*owner.rsplit(":", 1)):
        return f"is in use by another test run ({owner})"
    mark(client)
    return None


def mark(client: Any) -> None:
    """Mark the (just flushed) database as this run's again."""
    client.set(OWNER_KEY, _me())
