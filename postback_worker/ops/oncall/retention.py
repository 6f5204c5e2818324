"""Data retention: purge old clicks, attempts, delivered postbacks and superseded conversion
events in small batches.

Each batch is one short transaction that deletes at most `retention_batch` rows picked with
`FOR UPDATE SKIP LOCKED` (PostgreSQL), so a purge never waits on, nor blocks for long, the
workers writing the same tables. A run stops after `retention_max_batches` batches per table;
the next run (beat) goes on where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from postback_worker.domain.campaigns import DEFAULT_LIFESPAN_DAYS
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

log = logging.getLogger(__name__)


def click_retention_days(setting: int, longest_lifespan: int) -> tuple[int, str | None]:
    """Days clicks are kept: the setting, clipped up to the longest offer lifespan (a click
    purged inside its lifespan would turn a valid conversion into `unknown_click`).
    Returns (days, warning or None)."""
    if setting >= longest_lifespan:
        return setting, None
    return longest_lifespan, (
        f"click_retention_days={setting} is shorter than the longest offer lifespan "
        f"({longest_lifespan} days); keeping clicks {longest_lifespan} days"
    )


@dataclass
class PurgeResult:
    """Rows deleted per table in one run, and whether anything old is left for the next run."""

    now: datetime
    click_days: int
    deleted: dict[str, int] = field(default_factory=dict)
    more: bool = False
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"now": self.now.isoformat(), "click_days": self.click_days,
                "deleted": self.deleted, "more": self.more, "warning": self.warning}


class Purger:
    """Deletes what the retention settings no longer keep; time comes from `clock`."""

    def __init__(self, settings: Settings, store: Store,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock

    def longest_lifespan(self) -> int:
        longest = self.store.longest_lifespan()
        return longest if longest is not None else max(DEFAULT_LIFESPAN_DAYS.values())

    def run(self) -> PurgeResult:
        now = self.clock()
        s = self.settings
        days, warning = click_retention_days(s.retention.click_days, self.longest_lifespan())
        if warning:
            log.warning("retention: %s", warning)
        result = PurgeResult(now=now, click_days=days, warning=warning)
        jobs: list[tuple[str, Callable[[datetime, int], int], datetime]] = [
            ("clicks", self.store.purge_clicks, now - timedelta(days=days)),
            ("delivered_postbacks", self.store.purge_delivered,
             now - timedelta(days=s.retention.delivered_days)),
            ("attempts", self.store.purge_attempts,
             now - timedelta(days=s.retention.attempt_days)),
            ("conversion_events", self._purge_events,
             now - timedelta(days=s.retention.event_days)),
        ]
        for name, job, cutoff in jobs:
            total, more = self._batches(job, cutoff)
            result.deleted[name] = total
            result.more = result.more or more
        if any(result.deleted.values()):
            log.info("retention: deleted %s%s", result.deleted,
                     " (more left for the next run)" if result.more else "")
        return result

    def _purge_events(self, cutoff: datetime, size: int) -> int:
        since = cutoff - timedelta(days=self.settings.retention.event_lookback_days)
        return self.store.purge_events(cutoff, since, size)

    def _batches(self, job: Callable[[datetime, int], int],
                 cutoff: datetime) -> tuple[int, bool]:
        """Run one job in short batches; (rows deleted, whether some are left)."""
        size = max(1, self.settings.retention.batch)
        total = 0
        for _ in range(max(1, self.settings.retention.max_batches)):
            n = job(cutoff, size)
            total += n
            if n < size:
                return total, False
        return total, True
