"""Postback template validator: every problem with its position (0-based) and a suggested fix.

Pure code. Checks: scheme and host, whitespace and control characters, braces and unknown
macros ("did you mean"), other trackers' macro syntaxes and placeholders, characters that must
be percent-encoded, HTML entities left by copy-paste from web pages, fragments, duplicate query
parameters, a missing {transaction_id} and plain http. DNS is checked outside the domain.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from dataclasses import dataclass
from functools import lru_cache

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
ALIASES: dict[str, str] = {
    "tid": "transaction_id", "clickid": "transaction_id", "click_id": "transaction_id",
    "txid": "transaction_id", "trans_id": "transaction_id", "transid": "transaction_id",
    "externalid": "transaction_id", "cid": "transaction_id", "reqid": "transaction_id",
    "s1": "aff_sub", "s2": "aff_sub2", "s3": "aff_sub3", "s4": "aff_sub4", "s5": "aff_sub5",
    "sub1": "aff_sub", "sub2": "aff_sub2", "sub3": "aff_sub3", "sub4": "aff_sub4",
    "sub5": "aff_sub5", "subid": "aff_sub", "sub_id": "aff_sub", "subid1": "aff_sub",
    "aff_id": "affiliate_id", "affid": "affiliate_id", "oid": "offer_id",
    "amount": "sale_amount", "revenue": "payout", "sum": "payout", "price": "payout",
    "payout_amount": "payout", "ip_address": "ip", "leadid": "conversion_id",
    "order_id": "adv_sub", "orderid": "adv_sub", "utcunixtime": "timestamp",
}  # fmt: skip

# Placeholder words that trackers' example URLs ask you to replace.
PLACEHOLDERS = frozenset({"REPLACE", "OPTIONAL", "REPLACE_ME", "YOUR_CLICK_ID", "CLICK_ID",
                          "TRANSACTION_ID", "SALE_AMOUNT", "PAYOUT", "SUBID", "XXX"})

# Glyphs a browser shows for "&name" when a URL is pasted into a page as text.
HTML_GLYPHS: dict[str, str] = {
    "¤": "&curren", "¶": "&para", "×": "&times", "®": "&reg", "©": "&copy", "¬": "&not",
    "§": "&sect", "¢": "&cent", "£": "&pound", "¥": "&yen", "°": "&deg", "µ": "&micro",
    "·": "&middot", "÷": "&divide", "¦": "&brvbar", "¯": "&macr", "〈": "&lang",
    "⟨": "&lang",
}  # fmt: skip

# Problems that make a template impossible to render (the rest only block saving).
RENDER_BLOCKING = frozenset({"empty", "scheme", "host", "whitespace", "lookalike",
                             "braces", "unknown_macro", "json", "json_macro", "format"})
# Characters that must be percent-encoded outside macros.
_UNSAFE = {'"': "%22", "<": "%3C", ">": "%3E", "\\": "%5C", "^": "%5E", "`": "%60",
           "|": "%7C", "[": "%5B", "]": "%5D"}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MACRO = re.compile(r"\{([^{}]*)\}")
_DOUBLE = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_DOLLAR = re.compile(r"\$\{(\w+)\}")
_DBRACKET = re.compile(r"\[\[\s*(\w+)\s*\]\]")
_BRACKET = re.compile(r"\[(\w+)\]")
_HASH = re.compile(r"#(\w+)#")
_ANGLE = re.compile(r"<(\w+)>")
_PERCENT = re.compile(r"(?=%([A-Za-z_]\w*)%)")
_PHPVAR = re.compile(r"(?<==)\$([A-Za-z_]\w*)")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_ENTITY = re.compile(r"&(amp|lt|gt|quot|apos|nbsp|#\d{1,5}|#[xX][0-9A-Fa-f]{1,4});")
_WS_NAMES = {"\n": "line break (LF)", "\r": "line break (CR)", "\t": "tab", " ": "space"}
_ENTITY_TEXT = {"amp": "&", "lt": "%3C", "gt": "%3E", "quot": "%22", "apos": "%27",
                "nbsp": "%20"}


@dataclass(frozen=True)
class TemplateProblem:
    """One problem found in a template; ``position`` is a 0-based index into it."""

    position: int
    message: str
    severity: str = "error"  # "error" | "warning"
    fix: str = ""
    code: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"position": self.position, "severity": self.severity, "message": self.message,
                "fix": self.fix, "code": self.code}

    def describe(self) -> str:
        """One line: "position 12: message (fix: ...)"."""
        fix = f" (fix: {self.fix})" if self.fix else ""
        return f"position {self.position}: {self.message}{fix}"


def suggest(name: str) -> str | None:
    """Our macro closest to ``name`` (another tracker's name, a typo, other case), if any."""
    low = name.lower()
    if low in KNOWN_MACROS:
        return low
    if low in ALIASES:
        return ALIASES[low]
    close = difflib.get_close_matches(low, sorted(KNOWN_MACROS), n=1, cutoff=0.6)
    return close[0] if close else None


def macro_names(template: str) -> list[str]:
    """Names of the ``{macro}`` placeholders, in order, duplicates kept."""
    return _MACRO.findall(template)


class _Report:
    def __init__(self, template: str, where: str = "the URL", query_start: int | None = None,
                 ) -> None:
        self.template = template
        self.where = where
        # Where the query string (name=value&...) starts: after '?' in a URL, 0 in a form.
        q = template.find("?")
        self.query_start = query_start if query_start is not None else (q + 1 if q >= 0 else -1)
        self.problems: list[TemplateProblem] = []
        self.masked = [False] * len(template)

    def add(self, pos: int, message: str, code: str, fix: str = "",
            severity: str = "error") -> None:
        self.problems.append(TemplateProblem(pos, message, severity, fix, code))

    def mask(self, start: int, end: int) -> None:
        for i in range(start, end):
            self.masked[i] = True

    def free(self, start: int, end: int) -> bool:
        return not any(self.masked[start:end])


def _authority(template: str, start: int) -> tuple[str, int]:
    """(host, position of host) of the authority that starts at ``start``."""
    authority = re.split(r"[/?#]", template[start:], maxsplit=1)[0]
    at = authority.rfind("@")
    host_start = start + at + 1
    host = authority[at + 1:]
    if host.startswith("["):
        host = host[:host.find("]") + 1] if "]" in host else host
    else:
        host = host.split(":", 1)[0]
    return host, host_start


def host_of(template: str) -> tuple[str, int] | None:
    """The host name (without brackets) and its position, or None without a scheme/host."""
    m = _SCHEME.match(template)
    if not m:
        return None
    host, pos = _authority(template, m.end())
    host = host.strip("[]")
    return (host, pos) if host and "{" not in host else None


def _check_url(r: _Report) -> None:
    t = r.template
    m = _SCHEME.match(t)
    if not m:
        r.add(0, "missing scheme; the URL must start with https://", "scheme", "https://")
        return
    scheme = m.group(1).lower()
    if scheme not in ("http", "https"):
        r.add(0, f"unsupported scheme {scheme!r}; use https or http", "scheme", "https://")
        return
    if scheme == "http":
        r.add(0, "plain http sends the postback unencrypted", "http", "https://", "warning")
    host, pos = _authority(t, m.end())
    if host.startswith("["):
        r.mask(pos, pos + len(host))  # brackets around a host are URL syntax, not to encode
    if host.startswith("[") and host != "[]":
        _ipv6_literal(r, host, pos)
    elif not host or host == "[]":
        r.add(pos, "missing host", "host", "https://partner.example/...")
    elif "_" in host and "{" not in host:
        r.add(pos, f"host {host!r} contains '_', which host names cannot; use the real "
                   "tracking domain", "host_name", host.replace("_", "-"))


def _ipv6_literal(r: _Report, host: str, pos: int) -> None:
    """A bracketed host is an IPv6 address (RFC 3986: https://[2001:db8::1]:8443/pb)."""
    inner = host[1:-1] if host.endswith("]") else host[1:]
    if not host.endswith("]"):
        r.add(pos, f"unclosed '[' in the host {host!r}; an IPv6 address is written in "
                   "brackets, e.g. https://[2001:db8::1]/pb", "host", f"{host}]")
        return
    try:
        ipaddress.IPv6Address(inner)
    except ValueError:
        if "." in inner and ":" not in inner:
            r.add(pos, f"{host} is not an IPv6 address; write an IPv4 address without "
                       f"brackets: {inner}", "host", inner)
        else:
            r.add(pos, f"{host} is not an IPv6 address; a host in brackets must be one, "
                       "e.g. [2001:db8::1]", "host")


def _lookalikes(r: _Report) -> None:
    t = r.template

    def flag(pos: int, raw: str, name: str, what: str = "another tracker's macro syntax") -> None:
        target = suggest(name)
        fix = f"{{{target}}}" if target else ""
        hint = f"use {fix}" if target else "use the {macro} syntax"
        r.add(pos, f"{raw} is {what}; {hint}", "lookalike", fix)
        r.mask(pos, pos + len(raw))

    for rx in (_DOUBLE, _DOLLAR, _DBRACKET):
        for m in rx.finditer(t):
            if r.free(*m.span()):
                flag(m.start(), m.group(0), m.group(1))
    for m in _BRACKET.finditer(t):
        if r.free(*m.span()) and suggest(m.group(1)):
            flag(m.start(), m.group(0), m.group(1))
    for rx in (_HASH, _ANGLE):
        for m in rx.finditer(t):
            if r.free(*m.span()):
                flag(m.start(), m.group(0), m.group(1))
    for m in _PERCENT.finditer(t):
        name = m.group(1)
        raw = f"%{name}%"
        if _HEX2.match(name) and name.lower() not in KNOWN_MACROS | ALIASES.keys():
            continue  # looks like ordinary percent-encoding, e.g. %C3%A9
        if r.free(m.start(), m.start() + len(raw)):
            flag(m.start(), raw, name)
    for m in _PHPVAR.finditer(t):
        if r.free(*m.span()):
            flag(m.start(), m.group(0), m.group(1), "a program variable that was never filled in")


def _placeholders(r: _Report) -> None:
    """Query values such as REPLACE or OPTIONAL that a tracker's example asks you to replace."""
    for name, value, pos in _query_pairs(r):
        if not value or "{" in value or not r.free(pos, pos + len(value)):
            continue
        word = value
        if word != word.upper() or not re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", word):
            continue
        if word not in PLACEHOLDERS and word.lower() not in KNOWN_MACROS | ALIASES.keys():
            continue
        target = suggest(word) if word not in PLACEHOLDERS else None
        target = target or suggest(name) or "transaction_id"
        r.add(pos, f"{value} is a placeholder to replace with a macro; use {{{target}}}",
              "placeholder", f"{{{target}}}")
        r.mask(pos, pos + len(value))


def _braces(r: _Report) -> None:
    t = r.template
    opened: int | None = None
    for i, c in enumerate(t):
        if r.masked[i]:
            continue
        if c == "{":
            if opened is not None:
                r.add(opened, "unclosed '{'", "braces", "}")
            opened = i
        elif c == "}":
            if opened is None:
                r.add(i, "unmatched '}'", "braces", "{")
                continue
            name = t[opened + 1:i]
            if not name:
                r.add(opened, "empty macro {}", "braces", "{transaction_id}")
            elif name not in KNOWN_MACROS:
                target = suggest(name)
                if name in PLACEHOLDERS:
                    target = target or "transaction_id"
                    r.add(opened, f"{{{name}}} is a placeholder to replace with a macro; use "
                                  f"{{{target}}}", "unknown_macro", f"{{{target}}}")
                else:
                    hint = f"; did you mean {{{target}}}?" if target else ""
                    r.add(opened, f"unknown macro {{{name}}}{hint}", "unknown_macro",
                          f"{{{target}}}" if target else "")
            r.mask(opened, i + 1)
            opened = None
    if opened is not None:
        r.add(opened, "unclosed '{'", "braces", "}")


def _characters(r: _Report) -> None:
    """Whitespace, control characters, HTML glyphs, unsafe and non-ASCII characters, '%'."""
    t = r.template
    start = m.end() if (m := _SCHEME.match(t)) else 0
    in_ws = False
    for i in range(start, len(t)):
        c = t[i]
        if r.masked[i] or c in "{}":
            in_ws = False
            continue
        if c.isspace():
            if not in_ws:
                what = _WS_NAMES.get(c, f"U+{ord(c):04X}")
                r.add(i, f"whitespace ({what}) inside {r.where}; remove it or encode it as %20",
                      "whitespace", "%20")
            in_ws = True
            continue
        in_ws = False
        if ord(c) < 32 or ord(c) == 127:
            r.add(i, f"control character U+{ord(c):04X} inside {r.where}; remove it",
                  "encoding")
        elif c in HTML_GLYPHS:
            entity = HTML_GLYPHS[c]
            r.add(i, f"'{c}' is what a web page shows for {entity}: the URL was copied from a "
                     f"page that decoded it as an HTML entity; type {entity} again",
                  "html_entity", entity)
        elif c in _UNSAFE:
            r.add(i, f"'{c}' must be percent-encoded as {_UNSAFE[c]}", "encoding", _UNSAFE[c])
        elif ord(c) > 127:
            enc = "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
            r.add(i, f"non-ASCII character '{c}' must be percent-encoded as {enc}", "encoding",
                  enc)
        elif c == "%" and not _HEX2.match(t, i + 1):
            r.add(i, "'%' does not start a percent-escape; write %25 for a literal percent sign",
                  "encoding", "%25")


def _entities(r: _Report) -> None:
    for m in _ENTITY.finditer(r.template):
        if not r.free(*m.span()):
            continue
        name = m.group(1)
        fix = _ENTITY_TEXT.get(name.lower(), "the character itself, percent-encoded")
        r.add(m.start(), f"{m.group(0)} is an HTML entity copied from a web page; a URL needs "
                         f"{fix} instead", "html_entity", fix)
        r.mask(*m.span())


def _fragment(r: _Report) -> None:
    t = r.template
    for i, c in enumerate(t):
        if c == "#" and not r.masked[i]:
            rest = t[i + 1:]
            sent_nowhere = "{" in rest or "=" in rest
            r.add(i, "'#' starts a fragment: everything after it is never sent to the partner; "
                     "encode it as %23 or remove it", "fragment", "%23",
                  "error" if sent_nowhere else "warning")
            r.mask(i, i + 1)
            return


def _query_pairs(r: _Report) -> list[tuple[str, str, int]]:
    """(name, raw value, position of value) for each query parameter, in order."""
    template, masked, start = r.template, r.masked, r.query_start
    if start < 0:
        return []
    end = next((i for i in range(start, len(template))
                if template[i] == "#" and not masked[i]), -1) if r.where == "the URL" else -1
    query = template[start:end if end >= 0 else len(template)]
    pairs: list[tuple[str, str, int]] = []
    pos = start
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        pairs.append((name, value, pos + len(name) + len(sep)))
        pos += len(part) + 1
    return pairs


def _duplicates(r: _Report) -> None:
    seen: dict[str, int] = {}
    for name, _value, pos in _query_pairs(r):
        if not name:
            continue
        start = pos - len(name) - (1 if "=" in r.template[pos - 1:pos] else 0)
        if name in seen:
            r.add(start, f"duplicate query parameter {name!r} (first at position {seen[name]}); "
                         "partners read only one of them", "duplicate", "remove one of them")
        else:
            seen[name] = start


@lru_cache(maxsize=4096)
def validate(template: str) -> tuple[TemplateProblem, ...]:
    """Every problem in ``template``: errors first, then warnings, each by position."""
    if not template.strip():
        return (TemplateProblem(0, "template is empty", code="empty",
                                fix="https://partner.example/pb?tid={transaction_id}"),)
    r = _Report(template)
    _check_url(r)
    _lookalikes(r)
    _entities(r)
    _placeholders(r)
    _braces(r)
    _fragment(r)
    _characters(r)
    _duplicates(r)
    if "transaction_id" not in macro_names(template):
        r.add(0, "no {transaction_id} macro; the partner cannot match the postback to its click",
              "no_transaction_id", "add a parameter such as &tid={transaction_id}", "warning")
    r.problems.sort(key=lambda p: (p.severity != "error", p.position))
    return tuple(r.problems)


def blocks_rendering(problem: TemplateProblem) -> bool:
    """True for an error that makes the template impossible to render."""
    return problem.severity == "error" and problem.code in RENDER_BLOCKING


# -- request bodies ---------------------------------------------------------------------------

BODY_FORMATS = ("form", "json")
# A macro as the renderer finds it; JSON's own braces are never followed by a letter.
MACRO_NAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _empty_body(fmt: str) -> TemplateProblem:
    example = ("tid={transaction_id}&payout={payout}" if fmt == "form"
               else '{"tid": "{transaction_id}", "payout": "{payout}"}')
    return TemplateProblem(0, "body template is empty", code="empty", fix=example)


def _check_form(template: str) -> list[TemplateProblem]:
    r = _Report(template, "the form body", query_start=0)
    _lookalikes(r)
    _entities(r)
    _placeholders(r)
    _braces(r)
    _characters(r)
    _duplicates(r)
    return r.problems


def _check_json(template: str) -> list[TemplateProblem]:
    r = _Report(template, "the JSON body")
    strings = [(m.start(), m.end()) for m in _JSON_STRING.finditer(template)]

    def is_key(end: int) -> bool:
        return template[end:].lstrip().startswith(":")

    inside = [True] * len(template)
    for start, end in strings:
        if not is_key(end):
            for i in range(start + 1, end - 1):
                inside[i] = False
    for m in MACRO_NAME.finditer(template):
        if not inside[m.start()]:
            continue
        key = any(s < m.start() < e and is_key(e) for s, e in strings)
        where = "a JSON key" if key else "outside a JSON string"
        fix = "" if key else f'"{m.group(0)}"'
        r.add(m.start(), f"{m.group(0)} is {where}; macros may only appear inside string "
                         "values (values are always sent as JSON strings)", "json_macro", fix)
        r.mask(*m.span())
    # Same length, so positions hold: "x..." inside strings, a number (1 and spaces) outside.
    filled = MACRO_NAME.sub(lambda m: ("x" if not inside[m.start()] else "1").ljust(
        len(m.group(0)), "x" if not inside[m.start()] else " "), template)
    try:
        json.loads(filled)
    except json.JSONDecodeError as exc:
        r.add(exc.pos, f"not valid JSON: {exc.msg}", "json")
    # Macro checks run on string values only.
    r.masked = [flag or m for flag, m in zip(inside, r.masked, strict=True)]
    _lookalikes(r)
    _braces(r)
    return r.problems


@lru_cache(maxsize=1024)
def validate_body(template: str, fmt: str) -> tuple[TemplateProblem, ...]:
    """Every problem in a request body template of format `fmt` ("form" or "json")."""
    if fmt not in BODY_FORMATS:
        return (TemplateProblem(0, f"unknown body format {fmt!r}; use form or json",
                                code="format", fix="json"),)
    if not template.strip():
        return (_empty_body(fmt),)
    problems = _check_form(template) if fmt == "form" else _check_json(template)
    problems.sort(key=lambda p: (p.severity != "error", p.position))
    return tuple(problems)
