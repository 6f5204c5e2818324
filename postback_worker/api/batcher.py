"""Group commit for single-event requests: many requests, one journal commit.

Each request still gets its answer only after its own event is committed in the database;
requests that arrive within `max_wait` seconds of each other (or until `max_events`) share one
commit and one Redis wake-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool

Publish = Callable[[Sequence[Any]], list[str]]


class Batcher:
    """Collects events from concurrent requests and publishes them together."""

    def __init__(self, publish: Publish, *, max_events: int = 500, max_wait: float = 0.002):
        self.publish = publish
        self.max_events = max_events
        self.max_wait = max_wait
        self._events: list[Any] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, events: Sequence[Any]) -> None:
        """Return once `events` are published; raise what the publish raised."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._events.extend(events)
        self._waiters.append(done)
        if len(self._events) >= self.max_events:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait, self._flush)
        await done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events, waiters = self._events, self._waiters
        self._events, self._waiters = [], []
        if events:
            asyncio.ensure_future(self._publish(events, waiters))

    async def _publish(self, events: list[Any], waiters: list[asyncio.Future[None]]) -> None:
        try:
            await run_in_threadpool(self.publish, events)
        except BaseException as exc:  # every waiting request must hear about it
            for w in waiters:
                if not w.done():
                    w.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for w in waiters:
            if not w.done():
                w.set_result(None)
