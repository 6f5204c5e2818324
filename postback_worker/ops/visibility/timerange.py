"""Parse report time ranges: ISO dates/times or "24h"-style durations back from now."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from postback_worker.domain.events import FieldError
from postback_worker.errors import InvalidInput

DEFAULT_SPAN = timedelta(hours=24)
_DURATION = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class RangeError(InvalidInput):
    """A --since/--until value we cannot read; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", errors=[FieldError(field, message)])
        self.field = field


@dataclass(frozen=True)
class TimeRange:
    """[since, until) in UTC."""

    since: datetime
    until: datetime

    @property
    def seconds(self) -> float:
        return (self.until - self.since).total_seconds()


def parse_instant(field: str, text: str, now: datetime) -> datetime:
    """`2026-11-25`, `2026-11-25T10:00`, `2026-11-25 10:00:00+01:00`, or `24h`/`7d` ago."""
    value = text.strip()
    m = _DURATION.match(value)
    try:
        if m:
            return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        if value.lower() == "now":
            return now
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except OverflowError:  # a duration of a million years, or year 1 at +14:00
        raise RangeError(field, f"{text!r} is out of range (years 1 to 9999)") from None
    except ValueError:
        raise RangeError(field, f"{text!r} is not a date (2026-11-25), a time "
                                "(2026-11-25T10:00) or a duration ago (30m, 24h, 7d)") from None


def parse_range(since: str | None, until: str | None, now: datetime) -> TimeRange:
    """Defaults: until now, since 24 hours before `until`."""
    end = parse_instant("until", until, now) if until else now
    start = parse_instant("since", since, now) if since else end - DEFAULT_SPAN
    if start >= end:
        raise RangeError("since", "must be earlier than until")
    return TimeRange(start, end)
