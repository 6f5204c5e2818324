"""Validate ingestion input (conversions and clicks) into typed events."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar

from postback_worker.domain.ids import new_id
from postback_worker.errors import InvalidInput

T = TypeVar("T")

_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ID_MESSAGE = "must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"
_STATUS = re.compile(r"[a-z_]{1,32}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_AMOUNT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_MAX_AMOUNT = Decimal(2**40)
_MAX_FUTURE = timedelta(minutes=5)
USER_AGENT_MAX = 1024


@dataclass(frozen=True)
class FieldError:
    """One invalid input field."""

    field: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """JSON-safe form."""
        return {"field": self.field, "message": self.message}


class ValidationError(InvalidInput):
    """Input rejected; ``errors`` lists every bad field."""

    errors: list[FieldError]

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors), errors=errors)


class _Bad(Exception):
    """Internal: one field's error message."""


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return _utc(value).isoformat().replace("+00:00", "Z")


def _text(value: object, limit: int) -> str | None:
    """A string (ints accepted), stripped; None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Bad("must be a string")
    value = value.strip()
    if len(value) > limit:
        raise _Bad(f"must be at most {limit} characters")
    return value or None


def _required(value: object, limit: int) -> str:
    text = _text(value, limit)
    if text is None:
        raise _Bad("is required")
    return text


def _ident(value: object) -> str | None:
    text = _text(value, 64)
    if text is not None and not _ID.fullmatch(text):
        raise _Bad(_ID_MESSAGE)
    return text


def _amount(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Bad("must be a number")
    text = str(value).strip()
    if not text:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad("must be a finite number")
    if len(text) > 64 or not _AMOUNT.fullmatch(text):
        raise _Bad("must be a number")
    number = Decimal(text)
    if number < 0:
        raise _Bad("must not be negative")
    if number > _MAX_AMOUNT:
        raise _Bad(f"must be at most {_MAX_AMOUNT}")
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -20:
        raise _Bad("must have at most 20 decimal places")
    return format(abs(number), "f")


def _currency(value: object) -> str | None:
    text = _text(value, 3)
    if text is not None and not _CURRENCY.fullmatch(text):
        raise _Bad("must be a 3-letter currency code")
    return None if text is None else text.upper()


def _status(value: object) -> str:
    text = _text(value, 32)
    if text is None:
        return "approved"
    text = text.lower()
    if not _STATUS.fullmatch(text):
        raise _Bad("must be 1 to 32 letters or underscores")
    return text


def _ip(value: object) -> str | None:
    text = _text(value, 64)
    if text is None:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _Bad("must be an IPv4 or IPv6 address") from None


def _time(value: object, now: datetime) -> datetime:
    """ISO 8601 (with or without offset; naive is UTC) or unix seconds; default ``now``."""
    if value is None or value == "":
        return _utc(now)
    message = "must be an ISO 8601 time or unix seconds"
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Bad(message)
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            return _utc(datetime.fromisoformat(value.strip()))
    except (ValueError, OverflowError, OSError):
        pass
    raise _Bad(message)


@dataclass(frozen=True)
class FieldSpec:
    """One input field: its parser (raises _Bad) and its JSON Schema, from one place.

    The API's OpenAPI document is generated from these (api/openapi.py), so the document and
    the validation cannot drift apart.
    """

    parse: Callable[[object, datetime], Any]
    schema: Mapping[str, Any]
    required: bool = False


def object_schema(spec: Mapping[str, FieldSpec]) -> dict[str, Any]:
    """The JSON Schema of an object made of `spec`'s fields (no other fields allowed)."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": {name: dict(f.schema) for name, f in spec.items()}}
    required = [name for name, f in spec.items() if f.required]
    if required:
        out["required"] = required
    return out


def _text_schema(limit: int, min_length: int = 0) -> dict[str, Any]:
    text: dict[str, Any] = {"type": "string", "maxLength": limit}
    if min_length:
        text["minLength"] = min_length
    return {"anyOf": [text, {"type": "integer"}]}


_ID_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
_AMOUNT_SCHEMA = {"anyOf": [{"type": "number", "minimum": 0},
                            {"type": "string", "pattern": "^[+]?([0-9]+([.][0-9]*)?|[.][0-9]+)$"}],
                  "description": "non-negative amount, at most 20 decimal places"}
_TIME_SCHEMA = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
                "description": "ISO 8601 (no offset: UTC) or unix seconds; default: now"}


def _const(parse: Callable[[object], Any]) -> Callable[[object, datetime], Any]:
    return lambda value, now: parse(value)


@lru_cache(maxsize=8)
def conversion_spec(max_field_length: int = 255) -> dict[str, FieldSpec]:
    """The fields of a conversion event, in validation order."""
    n = max_field_length
    text = FieldSpec(lambda v, now: _text(v, n), _text_schema(n))
    return {
        "id": FieldSpec(_const(_ident), {**_ID_SCHEMA, "description":
                                         "your idempotency key; default: a new id"}),
        "transaction_id": FieldSpec(lambda v, now: _required(v, n), _text_schema(n, 1),
                                    required=True),
        "offer_id": text,
        "goal_id": text,
        "payout": FieldSpec(_const(_amount), _AMOUNT_SCHEMA),
        "sale_amount": FieldSpec(_const(_amount), _AMOUNT_SCHEMA),
        "currency": FieldSpec(_const(_currency), {"type": "string", "pattern": "^[A-Za-z]{3}$"}),
        "status": FieldSpec(_const(_status), {"type": "string", "pattern": "^[A-Za-z_]{1,32}$",
                                              "description": "default: approved"}),
        "adv_sub": text,
        "ip": FieldSpec(_const(_ip), {"type": "string", "description": "IPv4 or IPv6 address"}),
        "device_id": text,
        "occurred_at": FieldSpec(_time, _TIME_SCHEMA),
    }


@lru_cache(maxsize=8)
def click_spec(max_field_length: int = 255) -> dict[str, FieldSpec]:
    """The fields of a click, in validation order."""
    n = max_field_length
    text = FieldSpec(lambda v, now: _text(v, n), _text_schema(n))
    required = FieldSpec(lambda v, now: _required(v, n), _text_schema(n, 1), required=True)
    return {
        "transaction_id": FieldSpec(_const(_ident), {**_ID_SCHEMA, "description":
                                                     "default: a new id"}),
        "offer_id": required,
        "aff_id": required,
        **{name: text for name in _CLICK_TEXT},
        "ip": FieldSpec(_const(_ip), {"type": "string", "description": "IPv4 or IPv6 address"}),
        "user_agent": FieldSpec(lambda v, now: _text(v, USER_AGENT_MAX),
                                _text_schema(USER_AGENT_MAX)),
        "clicked_at": FieldSpec(_click_time, {**_TIME_SCHEMA, "description":
                                              "at most 5 minutes in the future; default: now"}),
    }


class _Collector:
    """Runs field parsers, collecting errors under a prefix."""

    def __init__(self, data: object, prefix: str, known: Mapping[str, object] | frozenset[str],
                 allow_unknown: bool):
        self.prefix = prefix
        self.errors: list[FieldError] = []
        if not isinstance(data, Mapping):
            raise ValidationError([FieldError(prefix.rstrip(".") or "event", "must be an object")])
        self.data: Mapping[str, object] = data
        if not allow_unknown:
            for key in data:
                if key not in known:
                    self.errors.append(FieldError(f"{prefix}{key}", "unknown field"))

    def get(self, name: str, parse: Callable[[object], Any]) -> Any:
        try:
            return parse(self.data.get(name))
        except _Bad as bad:
            self.errors.append(FieldError(f"{self.prefix}{name}", str(bad)))
            return None

    def fields(self, spec: Mapping[str, FieldSpec], now: datetime) -> dict[str, Any]:
        """Every field of `spec`, parsed (None where it had an error)."""
        out: dict[str, Any] = {}
        data, errors = self.data, self.errors
        for name, f in spec.items():
            try:
                out[name] = f.parse(data.get(name), now)
            except _Bad as bad:
                errors.append(FieldError(f"{self.prefix}{name}", str(bad)))
                out[name] = None
        return out

    def check(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)


def _now_ms(now: datetime) -> int:
    return int(_utc(now).timestamp() * 1000)


@dataclass(frozen=True)
class ConversionEvent:
    """A validated conversion, ready to enqueue."""

    id: str
    transaction_id: str
    offer_id: str | None
    goal_id: str
    payout: str | None
    sale_amount: str | None
    currency: str | None
    status: str
    adv_sub: str | None
    ip: str | None
    device_id: str | None
    occurred_at: datetime
    received_at: datetime
    # The address that reported it by GET /postback with the offer's token (else None).
    source_ip: str | None = None
    # W3C traceparent of the request that accepted it (tracing on), stored with it.
    trace_context: str | None = None

    def to_message(self) -> dict[str, str | None]:
        """JSON-safe dict; datetimes as ISO 8601 with ``Z`` (no trace_context when None)."""
        out: dict[str, str | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _iso(value) if isinstance(value, datetime) else value
        if self.trace_context is None:
            del out["trace_context"]
        return out

    @classmethod
    def from_message(cls, d: Mapping[str, object]) -> ConversionEvent:
        """Inverse of :meth:`to_message`."""

        def opt(name: str) -> str | None:
            value = d.get(name)
            return None if value is None else str(value)

        return cls(
            id=str(d["id"]),
            transaction_id=str(d["transaction_id"]),
            offer_id=opt("offer_id"),
            goal_id=str(d.get("goal_id") or ""),
            payout=opt("payout"),
            sale_amount=opt("sale_amount"),
            currency=opt("currency"),
            status=str(d.get("status") or "approved"),
            adv_sub=opt("adv_sub"),
            ip=opt("ip"),
            device_id=opt("device_id"),
            occurred_at=_utc(datetime.fromisoformat(str(d["occurred_at"]))),
            received_at=_utc(datetime.fromisoformat(str(d["received_at"]))),
            source_ip=opt("source_ip"),
            trace_context=opt("trace_context"),
        )




def parse_conversion(
    data: Mapping[str, object],
    *,
    now: datetime,
    max_field_length: int = 255,
    allow_unknown: bool = False,
    prefix: str = "",
) -> ConversionEvent:
    """Validate one conversion; raise ValidationError naming every bad field."""
    spec = conversion_spec(max_field_length)
    c = _Collector(data, prefix, spec, allow_unknown)
    v = c.fields(spec, now)
    c.check()
    v["id"] = v["id"] or new_id("cv", now_ms=_now_ms(now))
    v["goal_id"] = v["goal_id"] or ""
    return ConversionEvent(**v, received_at=_utc(now))


@dataclass(frozen=True)
class ClickEvent:
    """A validated click."""

    transaction_id: str
    offer_id: str
    aff_id: str
    aff_sub: str | None
    aff_sub2: str | None
    aff_sub3: str | None
    aff_sub4: str | None
    aff_sub5: str | None
    source: str | None
    ip: str | None
    device_id: str | None
    user_agent: str | None
    clicked_at: datetime


_CLICK_TEXT = ("aff_sub", "aff_sub2", "aff_sub3", "aff_sub4", "aff_sub5", "source", "device_id")


def _click_time(value: object, now: datetime) -> datetime:
    when = _time(value, now)
    if when > _utc(now) + _MAX_FUTURE:
        raise _Bad("must not be more than 5 minutes in the future")
    return when


def parse_click(
    data: Mapping[str, object],
    *,
    now: datetime,
    max_field_length: int = 255,
    allow_unknown: bool = False,
    prefix: str = "",
) -> ClickEvent:
    """Validate one click; raise ValidationError naming every bad field."""
    spec = click_spec(max_field_length)
    c = _Collector(data, prefix, spec, allow_unknown)
    v = c.fields(spec, now)
    c.check()
    v["transaction_id"] = v["transaction_id"] or new_id("tx", now_ms=_now_ms(now))
    return ClickEvent(**v)


def parse_batch(
    items: object, parse: Callable[..., T], *, max_items: int, now: datetime, **kw: Any
) -> list[T]:
    """Parse a list of events (or one object); raise one ValidationError with all errors."""
    if isinstance(items, Mapping):
        return [parse(items, now=now, **kw)]
    if not isinstance(items, list):
        raise ValidationError([FieldError("events", "must be a list")])
    if not items:
        raise ValidationError([FieldError("events", "must contain at least one event")])
    if len(items) > max_items:
        raise ValidationError([FieldError("events", f"at most {max_items} events per request")])
    parsed: list[T] = []
    errors: list[FieldError] = []
    for i, item in enumerate(items):
        try:
            parsed.append(parse(item, now=now, prefix=f"events[{i}].", **kw))
        except ValidationError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ValidationError(errors)
    return parsed
