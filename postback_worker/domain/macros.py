"""Postback URL templates: validate, list macros, render with URL-encoded values."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import quote

KNOWN_MACROS: frozenset[str] = frozenset(
    {
        "transaction_id", "offer_id", "affiliate_id",
        "aff_sub", "aff_sub2", "aff_sub3", "aff_sub4", "aff_sub5",
        "source", "adv_sub", "goal_id", "payout", "sale_amount", "currency", "status",
        "conversion_id", "postback_id", "datetime", "date", "time", "timestamp",
        "ip", "device_id", "random",
    }
)  # fmt: skip

# Names other trackers use for our macros (only used to suggest a fix).
_ALIASES: dict[str, str] = {
    "tid": "transaction_id", "clickid": "transaction_id", "click_id": "transaction_id",
    "txid": "transaction_id", "s1": "aff_sub", "s2": "aff_sub2", "s3": "aff_sub3",
    "s4": "aff_sub4", "s5": "aff_sub5", "sub1": "aff_sub", "sub2": "aff_sub2",
    "sub3": "aff_sub3", "sub4": "aff_sub4", "sub5": "aff_sub5", "aff_id": "affiliate_id",
    "amount": "sale_amount", "revenue": "payout", "sum": "payout",
}  # fmt: skip

_MACRO = re.compile(r"\{([^{}]*)\}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_WS = re.compile(r"\s")
_DOUBLE = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_DOLLAR = re.compile(r"\$\{(\w+)\}")
_BRACKET = re.compile(r"\[(\w+)\]")
_HASH = re.compile(r"#(\w+)#")
_PERCENT = re.compile(r"(?=%([A-Za-z_]\w*)%)")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")


@dataclass(frozen=True)
class TemplateProblem:
    """One problem found in a template; ``position`` is a 0-based index."""

    position: int
    message: str
    severity: str = "error"  # "error" | "warning"
    fix: str = ""


class TemplateError(ValueError):
    """A template that cannot be rendered."""

    def __init__(self, problems: list[TemplateProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"position {p.position}: {p.message}" for p in problems))


def _suggest(name: str) -> str | None:
    low = name.lower()
    if low in KNOWN_MACROS:
        return low
    if low in _ALIASES:
        return _ALIASES[low]
    close = difflib.get_close_matches(low, sorted(KNOWN_MACROS), n=1, cutoff=0.6)
    return close[0] if close else None


def _lookalikes(template: str) -> tuple[list[TemplateProblem], list[tuple[int, int]]]:
    """Flag other trackers' macro syntaxes; return problems and brace spans to skip."""
    problems: list[TemplateProblem] = []
    masked: list[tuple[int, int]] = []

    def flag(pos: int, raw: str, name: str) -> None:
        target = _suggest(name)
        fix = f"{{{target}}}" if target else ""
        hint = f"use {fix}" if target else "use the {macro} syntax"
        problems.append(
            TemplateProblem(pos, f"{raw} is another tracker's macro syntax; {hint}", fix=fix)
        )

    for rx in (_DOUBLE, _DOLLAR):
        for m in rx.finditer(template):
            flag(m.start(), m.group(0), m.group(1))
            masked.append(m.span())
    for rx in (_BRACKET, _HASH):
        for m in rx.finditer(template):
            if rx is _HASH or _suggest(m.group(1)):
                flag(m.start(), m.group(0), m.group(1))
    for m in _PERCENT.finditer(template):
        name = m.group(1)
        if _HEX2.match(name) and name.lower() not in KNOWN_MACROS | _ALIASES.keys():
            continue  # looks like ordinary percent-encoding, e.g. %C3%A9
        flag(m.start(), f"%{name}%", name)
    return problems, masked


def _check_url(template: str) -> list[TemplateProblem]:
    m = _SCHEME.match(template)
    if not m:
        return [
            TemplateProblem(0, "missing scheme; the URL must start with https://", fix="https://")
        ]
    scheme = m.group(1).lower()
    if scheme not in ("http", "https"):
        return [TemplateProblem(0, f"unsupported scheme {scheme!r}; use https or http")]
    problems = []
    if scheme == "http":
        problems.append(
            TemplateProblem(
                0, "plain http sends the postback unencrypted", "warning", fix="https://"
            )
        )
    start = m.end()
    authority = re.split(r"[/?#]", template[start:], maxsplit=1)[0]
    host = authority.rsplit("@", 1)[-1]
    host = host if host.startswith("[") else host.split(":", 1)[0]
    if not host:
        problems.append(TemplateProblem(start, "missing host"))
    return problems


def _check_braces(template: str, masked: list[tuple[int, int]]) -> list[TemplateProblem]:
    problems: list[TemplateProblem] = []
    chars = list(template)
    for a, b in masked:
        chars[a:b] = " " * (b - a)
    opened: int | None = None
    for i, c in enumerate(chars):
        if c == "{":
            if opened is not None:
                problems.append(TemplateProblem(opened, "unclosed '{'"))
            opened = i
        elif c == "}":
            if opened is None:
                problems.append(TemplateProblem(i, "unmatched '}'"))
                continue
            name = template[opened + 1 : i]
            if not name:
                problems.append(TemplateProblem(opened, "empty macro {}"))
            elif name not in KNOWN_MACROS:
                target = _suggest(name)
                hint = f"; did you mean {{{target}}}?" if target else ""
                fix = f"{{{target}}}" if target else ""
                problems.append(TemplateProblem(opened, f"unknown macro {{{name}}}{hint}", fix=fix))
            opened = None
    if opened is not None:
        problems.append(TemplateProblem(opened, "unclosed '{'"))
    return problems


@lru_cache(maxsize=4096)
def _validate(template: str) -> tuple[TemplateProblem, ...]:
    if not template.strip():
        return (TemplateProblem(0, "template is empty"),)
    problems = _check_url(template)
    ws = _WS.search(template)
    if ws:
        problems.append(
            TemplateProblem(ws.start(), "whitespace inside the URL; encode it as %20", fix="%20")
        )
    lookalikes, masked = _lookalikes(template)
    problems += lookalikes
    problems += _check_braces(template, masked)
    if "transaction_id" not in macro_names(template):
        problems.append(
            TemplateProblem(
                0,
                "no {transaction_id} macro; the partner cannot match the postback to its click",
                "warning",
                fix="add a parameter such as &tid={transaction_id}",
            )
        )
    problems.sort(key=lambda p: (p.severity != "error", p.position))
    return tuple(problems)


def validate_template(template: str) -> list[TemplateProblem]:
    """Return every problem in ``template`` (errors first, then warnings)."""
    return list(_validate(template))


def macro_names(template: str) -> list[str]:
    """Names of the ``{macro}`` placeholders, in order, duplicates kept."""
    return _MACRO.findall(template)


@lru_cache(maxsize=4096)
def _compile(template: str) -> tuple[str, ...]:
    """Split into parts: even indexes are literals, odd indexes macro names."""
    errors = [p for p in _validate(template) if p.severity == "error"]
    if errors:
        raise TemplateError(errors)
    return tuple(_MACRO.split(template))


def render(template: str, values: Mapping[str, str | None]) -> str:
    """Render ``template``; every value is percent-encoded so it cannot alter the URL."""
    parts = _compile(template)
    out = list(parts)
    get = values.get
    for i in range(1, len(parts), 2):
        value = get(parts[i])
        out[i] = quote(value, safe="") if value else ""
    return "".join(out)


def _s(value: object) -> str:
    return "" if value is None else str(value)


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
    values = {
        name: _s(cv(name))
        for name in (
            "transaction_id", "offer_id", "goal_id", "payout", "sale_amount",
            "currency", "status", "adv_sub",
        )
    }  # fmt: skip
    values["conversion_id"] = _s(cv("id"))
    values["ip"] = _s(cv("ip")) or _s(ck("ip"))
    values["device_id"] = _s(cv("device_id")) or _s(ck("device_id"))
    values["affiliate_id"] = _s(ck("aff_id"))
    for name in ("aff_sub", "aff_sub2", "aff_sub3", "aff_sub4", "aff_sub5", "source"):
        values[name] = _s(ck(name))
    utc = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    values["postback_id"] = postback_id
    values["datetime"] = utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    values["date"] = utc.strftime("%Y-%m-%d")
    values["time"] = utc.strftime("%H:%M:%S")
    values["timestamp"] = str(int(utc.timestamp()))
    values["random"] = random_value
    return values
