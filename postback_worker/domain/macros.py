"""Postback templates (URL, form body, JSON body): validate, list macros, render.

Values are escaped for where they land: percent-encoded in URLs and form bodies, JSON-escaped
inside JSON strings, so a value can never add a parameter or a field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import quote

from postback_worker.domain.validator import (
    BODY_FORMATS,
    KNOWN_MACROS,
    MACRO_NAME,
    TemplateProblem,
    blocks_rendering,
    macro_names,
    validate,
    validate_body,
)
from postback_worker.errors import InvalidInput

__all__ = ["BODY_FORMATS", "KNOWN_MACROS", "TemplateError", "TemplateProblem", "macro_names",
           "macro_values", "render", "render_body", "validate_body", "validate_template"]

_MACRO = re.compile(r"\{([^{}]*)\}")

class TemplateError(InvalidInput):
    """A template that cannot be rendered."""

    def __init__(self, problems: list[TemplateProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"position {p.position}: {p.message}" for p in problems))


def validate_template(template: str) -> list[TemplateProblem]:
    """Return every problem in ``template`` (errors first, then warnings); see validator."""
    return list(validate(template))


@lru_cache(maxsize=4096)
def _compile(template: str) -> tuple[str, ...]:
    """Split into parts: even indexes are literals, odd indexes macro names."""
    errors = [p for p in validate(template) if blocks_rendering(p)]
    if errors:
        raise TemplateError(errors)
    return tuple(_MACRO.split(template))


# What percent-encoding leaves as it is (RFC 3986 unreserved): most values (ids, amounts).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


def _url_escape(value: str) -> str:
    if _UNRESERVED(value):
        return value
    return quote(value, safe="", errors="replace")


def _json_escape(value: str) -> str:
    # Lone surrogates (not encodable as UTF-8) become U+FFFD first.
    clean = value.encode("utf-8", errors="replace").decode("utf-8")
    return json.dumps(clean, ensure_ascii=False)[1:-1]


def _fill(parts: tuple[str, ...], values: Mapping[str, str | None],
          escape: Callable[[str], str]) -> str:
    out = list(parts)
    get = values.get
    for i in range(1, len(parts), 2):
        value = get(parts[i])
        out[i] = escape(value) if value else ""
    return "".join(out)


def render(template: str, values: Mapping[str, str | None]) -> str:
    """Render ``template``; every value is percent-encoded so it cannot alter the URL.

    Characters that cannot be encoded as UTF-8 (lone surrogates) become '?'.
    """
    return _fill(_compile(template), values, _url_escape)


@lru_cache(maxsize=1024)
def _compile_body(template: str, fmt: str) -> tuple[str, ...]:
    errors = [p for p in validate_body(template, fmt) if blocks_rendering(p)]
    if errors:
        raise TemplateError(errors)
    return tuple((_MACRO if fmt == "form" else MACRO_NAME).split(template))


def render_body(template: str, fmt: str, values: Mapping[str, str | None]) -> str:
    """Render a body template: "form" values percent-encoded, "json" values JSON-escaped
    inside their strings (raises TemplateError)."""
    escape = _url_escape if fmt == "form" else _json_escape
    return _fill(_compile_body(template, fmt), values, escape)


def _s(value: object) -> str:
    return "" if value is None else str(value)


_CONVERSION_MACROS = ("transaction_id", "offer_id", "goal_id", "payout", "sale_amount",
                      "currency", "status", "adv_sub")
# Lifecycle: the advertiser's amount, the event that fired, the status before it.
_LIFECYCLE_MACROS = ("revenue", "event", "previous_status")
_CLICK_MACROS = ("aff_sub", "aff_sub2", "aff_sub3", "aff_sub4", "aff_sub5", "source")


@lru_cache(maxsize=16)
def _clock_values(now: datetime) -> dict[str, str]:
    """The time macros of `now` (a batch's postbacks share one `now`; callers copy)."""
    utc = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    return {
        "datetime": utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "date": utc.strftime("%Y-%m-%d"),
        "time": utc.strftime("%H:%M:%S"),
        "timestamp": str(int(utc.timestamp())),
    }


def macro_values(
    *,
    conversion: Mapping[str, object],
    click: Mapping[str, object],
    postback_id: str,
    now: datetime,
    random_value: str,
) -> dict[str, str]:
    """Build the macro values for one postback from a conversion and its click."""
    cv, ck = conversion.get, click.get
    values = {name: "" if (v := cv(name)) is None else str(v) for name in _CONVERSION_MACROS}
    values["conversion_id"] = _s(cv("id"))
    for name in _LIFECYCLE_MACROS:
        values[name] = _s(cv(name))
    values["ip"] = _s(cv("ip")) or _s(ck("ip"))
    values["device_id"] = _s(cv("device_id")) or _s(ck("device_id"))
    values["affiliate_id"] = _s(ck("aff_id"))
    for name in _CLICK_MACROS:
        values[name] = _s(ck(name))
    values["postback_id"] = postback_id
    values.update(_clock_values(now))
    values["random"] = random_value
    return values
