"""Which dead letters an operator means: a filter parsed from CLI options or API fields."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from postback_worker.domain.events import FieldError, ValidationError
from postback_worker.domain.failures import FAILED_CLASSES

FAILURE_CLASSES: tuple[str, ...] = tuple(str(c) for c in FAILED_CLASSES)
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TIME_HELP = "ISO 8601 time (UTC unless it says otherwise) or an age such as 30m, 6h, 7d"
# The filter's fields as JSON Schema: `Filter.parse` knows exactly these, and the API documents
# them from here (api/openapi.py), as query parameters or request body fields.
FILTER_SCHEMA: dict[str, dict[str, Any]] = {
    "partner_id": {"type": "string", "description": "partner id"},
    "offer_id": {"type": "string", "description": "offer id"},
    "failure_class": {"type": "string", "enum": list(FAILURE_CLASSES)},
    "since": {"type": "string", "description": f"dead-lettered since: {TIME_HELP}"},
    "until": {"type": "string", "description": f"dead-lettered until: {TIME_HELP}"},
    "last_status": {"type": "integer", "minimum": 100, "maximum": 599,
                    "description": "the last attempt's HTTP status code, e.g. 503"},
}


def parse_time(value: str, now: datetime) -> datetime:
    """ISO 8601 date/time (UTC unless it says otherwise) or an age such as 30m, 6h, 7d."""
    text = value.strip()
    rel = _RELATIVE.fullmatch(text)
    try:
        if rel:
            return now - timedelta(seconds=float(rel.group(1)) * _UNITS[rel.group(2)])
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except OverflowError:  # an age of a million years, or year 1 at +14:00
        raise ValueError("is out of range (years 1 to 9999)") from None
    except ValueError:
        raise ValueError("must be an ISO 8601 time (2026-11-26T12:00:00Z) or an age such as "
                         "30m, 6h, 7d") from None


@dataclass(frozen=True)
class Filter:
    """Which dead letters: every field is optional and they combine with AND."""

    partner_id: str | None = None
    offer_id: str | None = None
    failure_class: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    last_status: int | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any], now: datetime) -> Filter:
        """From CLI options or API fields; raises ValidationError naming each bad field."""
        errors: list[FieldError] = []
        known = FILTER_SCHEMA.keys()
        kw: dict[str, Any] = {}
        for name in ("partner_id", "offer_id"):
            value = data.get(name)
            if value not in (None, ""):
                kw[name] = str(value)
        fc = data.get("failure_class")
        if fc not in (None, ""):
            if fc not in FAILURE_CLASSES:
                errors.append(FieldError("failure_class",
                                         "must be one of " + ", ".join(FAILURE_CLASSES)))
            kw["failure_class"] = fc
        for name in ("since", "until"):
            value = data.get(name)
            if value in (None, ""):
                continue
            try:
                kw[name] = value if isinstance(value, datetime) else parse_time(str(value), now)
            except ValueError as exc:
                errors.append(FieldError(name, str(exc)))
        status = data.get("last_status")
        if status not in (None, ""):
            try:
                kw["last_status"] = int(status)
                if not 100 <= kw["last_status"] <= 599:
                    raise ValueError
            except (TypeError, ValueError):
                errors.append(FieldError("last_status", "must be an HTTP status code (100-599)"))
        if kw.get("since") and kw.get("until") and kw["since"] > kw["until"]:
            errors.append(FieldError("until", "must be after since"))
        errors.extend(FieldError(k, "unknown field") for k in data if k not in known)
        if errors:
            raise ValidationError(errors)
        return cls(**kw)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        parts = [f"{k}={v.isoformat() if isinstance(v, datetime) else v}"
                 for k, v in self.as_dict().items()]
        return ", ".join(parts) or "all dead letters"


@dataclass(frozen=True)
class Cursor:
    """Where the next page of a newest-first dead-letter list starts: after this row."""

    created_at: datetime
    postback_id: str

    def encode(self) -> str:
        micros = (self.created_at - EPOCH) // timedelta(microseconds=1)
        return f"{micros}:{self.postback_id}"

    @classmethod
    def parse(cls, value: str, field: str = "after") -> Cursor:
        """From `encode`'s text; raises ValidationError naming `field`."""
        micros, sep, postback_id = value.partition(":")
        try:
            if not sep or not postback_id or not (micros.isascii() and micros.isdigit()):
                raise ValueError
            return cls(EPOCH + timedelta(microseconds=int(micros)), postback_id)
        except (ValueError, OverflowError):
            raise ValidationError([FieldError(
                field, "must be the next_after value of the previous page")]) from None


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
