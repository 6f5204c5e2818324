"""Group commit for single-event requests, in the event loop: many requests, one commit.

A request whose event finds no commit running starts one at once (no timer); requests that
arrive while a commit runs share the next one. Each request is answered only after its own
event is committed. The commit is a coroutine (store/journal.py: LoopJournal commits on the
event loop itself on PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Commit = Callable[[Sequence[Any]], Awaitable[None]]


class Batcher:
    """Collects the events of concurrent requests and commits them together."""

    def __init__(self, commit: Commit, *, max_events: int = 1000) -> None:
        self.commit = commit
        self.max_events = max_events
        self._events: list[Any] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._running = False

    async def submit(self, events: Sequence[Any]) -> None:
        """Return once `events` are committed; raise what the commit raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._events.extend(events)
        self._waiters.append((len(events), done))
        if not self._running:
            self._running = True
            asyncio.ensure_future(self._run())
        await done

    async def _run(self) -> None:
        try:
            while self._waiters:
                n, group = 0, 0
                while group < len(self._waiters) and (
                        group == 0 or n + self._waiters[group][0] <= self.max_events):
                    n += self._waiters[group][0]
                    group += 1
                events, self._events = self._events[:n], self._events[n:]
                waiters, self._waiters = self._waiters[:group], self._waiters[group:]
                try:
                    await self.commit(events)
                except BaseException as exc:  # every request of the group must hear about it
                    for _, w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for _, w in waiters:
                    if not w.done():
                        w.set_result(None)
        finally:
            self._running = False
