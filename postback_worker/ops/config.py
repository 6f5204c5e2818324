"""Offer and partner configuration: validation, redaction, security tokens and signing keys,
shared by the CLI and the admin API."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from postback_worker.delivery.proxy import DIRECT, ProxyError, parse_proxy
from postback_worker.delivery.signing import (
    DEFAULT_SIGNATURE_HEADER,
    HMAC,
    SCHEMES,
    new_secret,
    rotation,
)
from postback_worker.domain.campaigns import (
    DEFAULT_LIFESPAN_DAYS,
    CampaignType,
    parse_campaign_type,
)
from postback_worker.domain.events import FieldError, ValidationError
from postback_worker.domain.lifecycle import (
    MAX_HOLD_HOURS,
    DuplicateMode,
    Trigger,
    dump_mapping,
    load_mapping,
    parse_duplicate_mode,
    parse_fire_on,
)
from postback_worker.domain.macros import BODY_FORMATS, validate_body, validate_template
from postback_worker.domain.masking import load_headers, mask_body, mask_headers, mask_url
from postback_worker.domain.payout import ANY_PARTNER, parse_rule
from postback_worker.domain.validator import TemplateProblem, host_of
from postback_worker.errors import UnknownPartner
from postback_worker.store.repo import Store

# resolve(host) returns normally when the host resolves and raises OSError when it does not.
HostResolver = Callable[[str], object]

_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_HEADER = re.compile(r"[A-Za-z0-9-]{1,100}")
_STATUS = re.compile(r"[a-z_]{1,32}")

_ID_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
_LIST = {"anyOf": [{"type": "string", "maxLength": 2000},
                   {"type": "array", "items": {"type": "string"}}],
         "description": "comma-separated, or a list"}
_MAP = {"anyOf": [{"type": "object", "additionalProperties": {"type": "string"}},
                  {"type": "string", "maxLength": 8000}],
        "description": "an object, or 'key=value' pairs separated by commas or spaces"}
_HOLD = {"type": "number", "minimum": 0, "maximum": MAX_HOLD_HOURS, "nullable": True}
_RULE = {"type": "string", "maxLength": 40, "pattern": "^(advertiser|(fixed|percent):[0-9.]+)$",
         "description": "advertiser (default), fixed:AMOUNT or percent:P of the sale amount"}
_TRIGGERS = ", ".join(t.value for t in Trigger)
# JSON Schemas of what parse_offer / parse_partner accept: the field sets below and the
# API's OpenAPI document are both built from them, so neither can drift from the other.
OFFER_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["id"], "additionalProperties": False,
    "properties": {
        "id": _ID_SCHEMA, "name": {"type": "string", "maxLength": 200},
        "campaign_type": {"type": "string", "enum": [c.value for c in CampaignType]},
        "lifespan_days": {"type": "integer", "minimum": 1, "maximum": 3650,
                          "description": "default: the campaign type's"},
        "landing_url": {"type": "string", "maxLength": 2000},
        "allow_multiple": {"type": "boolean"},
        "allowed_ips": {**_LIST, "description": "advertiser networks for GET /postback"},
        "min_click_seconds": {"type": "integer", "minimum": 0, "maximum": 366 * 86400},
        "max_click_seconds": {"type": "integer", "minimum": 0, "maximum": 366 * 86400},
        "daily_cap": {"type": "integer", "minimum": 1, "maximum": 10**9},
        "daily_payout_cap": {"type": "number", "minimum": 0.01, "maximum": 10**12},
        "affiliate_daily_cap": {"type": "integer", "minimum": 1, "maximum": 10**9},
        "affiliate_daily_payout_cap": {"type": "number", "minimum": 0.01, "maximum": 10**12},
        "duplicate_mode": {"type": "string", "enum": [m.value for m in DuplicateMode],
                           "description": "a new event for a known conversion: update it "
                                          "(default), ignore it, or count it separately"},
        "hold_hours": {**_HOLD, "description": "approved postbacks wait this long; a reversal "
                                               "meanwhile fires nothing"},
        "payout_rules": {**_MAP, "description": "payout rule per partner id ('*': any "
                                                "partner), overriding the partners' own"},
    },
}
PARTNER_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["id", "postback_url"], "additionalProperties": False,
    "properties": {
        "id": _ID_SCHEMA, "name": {"type": "string", "maxLength": 200},
        "postback_url": {"type": "string", "minLength": 1, "maxLength": 4000},
        "method": {"type": "string", "enum": ["GET", "POST", "get", "post"]},
        "timeout": {"type": "number", "minimum": 0.1, "maximum": 120},
        "success_check": {"type": "string", "maxLength": 200},
        "fire_statuses": _LIST,
        "enabled": {"type": "boolean"},
        "scope": {"type": "string", "enum": ["own", "global"]},
        "offer_ids": _LIST,
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
        "base_delay": {"type": "number", "minimum": 0, "maximum": 86400},
        "max_delay": {"type": "number", "minimum": 0, "maximum": 7 * 86400},
        "horizon": {"type": "number", "minimum": 0, "maximum": 30 * 86400},
        "body_format": {"type": "string", "enum": ["form", "json"]},
        "body_template": {"type": "string", "minLength": 1, "maxLength": 20000},
        "headers": {"anyOf": [
            {"type": "object", "maxProperties": 20,
             "additionalProperties": {"type": "string", "maxLength": 4000}},
            {"type": "array", "items": {"type": "string"}}],
            "description": "custom headers (secrets): {name: value} or 'Name: value' items"},
        "egress_proxy": {"type": "string", "maxLength": 500},
        "fire_events": {**_LIST, "description": f"events that fire: {_TRIGGERS} "
                                                "(default: approved)"},
        "templates": {**_MAP, "description": "a URL template per event (reversal, adjustment, "
                                             "status, approved); default: postback_url"},
        "status_map": {**_MAP, "description": "{status} as the partner names it, e.g. "
                                              "approved=sale,pending=lead"},
        "payout_rule": _RULE,
        "hold_hours": {**_HOLD, "description": "overrides the offer's hold period"},
    },
}
OFFER_FIELDS = set(OFFER_SCHEMA["properties"])
PARTNER_FIELDS = set(PARTNER_SCHEMA["properties"])
# Custom headers may not replace what the sender or signing sets.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "x-postback-id",
    "x-postback-timestamp", "x-postback-signature", "webhook-id", "webhook-timestamp",
    "webhook-signature", "proxy-authorization",
})
MAX_HEADERS = 20


class _Errors:
    def __init__(self, data: Mapping[str, Any], known: set[str]) -> None:
        self.data = data
        self.errors: list[FieldError] = [
            FieldError(k, "unknown field") for k in data if k not in known
        ]

    def add(self, name: str, message: str) -> None:
        self.errors.append(FieldError(name, message))

    def ident(self, name: str) -> str:
        value = self.data.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _ID.fullmatch(value):
            self.add(name, "required: 1 to 64 characters of A-Z a-z 0-9 _ . : -")
            return ""
        return value

    def text(self, name: str, default: str | None = None, limit: int = 200) -> str | None:
        value = self.data.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str):
            self.add(name, "must be a string")
            return None
        if len(value) > limit:
            self.add(name, f"must be at most {limit} characters")
        return value

    def number(self, name: str, *, integer: bool = False, low: float = 0,
               high: float = 10**9) -> Any:
        value = self.data.get(name)
        if value is None or value == "":
            return None
        try:
            num = int(value) if integer else float(value)
        except (TypeError, ValueError):
            self.add(name, "must be a whole number" if integer else "must be a number")
            return None
        if isinstance(value, bool) or not low <= num <= high:
            self.add(name, f"must be between {low:g} and {high:g}")
            return None
        return num

    def flag(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        self.add(name, "must be true or false")
        return default

    def mapping(self, name: str, *, separators: str = ", ") -> dict[str, str]:
        """An object of strings, or 'key=value' pairs (split on `separators`)."""
        value = self.data.get(name)
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            pairs = [p for p in re.split(f"[{re.escape(separators)}]+", value) if p] \
                if separators else [value]
            value = {}
            for pair in pairs:
                key, eq, item = pair.partition("=")
                if not eq or not key.strip():
                    self.add(name, f"{pair!r} is not key=value")
                    return {}
                value[key.strip()] = item.strip()
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            self.add(name, "must be an object of strings or key=value pairs")
            return {}
        return {k.strip(): v.strip() for k, v in value.items()}

    def check(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)


def _csv(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return ",".join(str(v).strip() for v in value)
    return str(value)


def parse_offer(data: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """Validate an offer; the lifespan defaults to the campaign type's (DESIGN.md table)."""
    e = _Errors(data, OFFER_FIELDS)
    offer_id = e.ident("id")
    name = e.text("name") or offer_id
    ct_raw = data.get("campaign_type", "ecommerce")
    try:
        ct = parse_campaign_type(str(ct_raw))
    except ValueError as exc:
        e.add("campaign_type", str(exc))
        ct = None
    lifespan = e.number("lifespan_days", integer=True, low=1, high=3650)
    landing = e.text("landing_url", limit=2000)
    if landing:
        problems = [p for p in validate_template(landing) if p.severity == "error"]
        for p in problems:
            e.add("landing_url", f"position {p.position}: {p.message}")
    allow_multiple = e.flag("allow_multiple", False)
    rules = _inbound_rules(e)
    mode = _duplicate_mode(e, allow_multiple)
    hold = e.number("hold_hours", low=0, high=MAX_HOLD_HOURS)
    payout = e.mapping("payout_rules")
    for key, rule in payout.items():
        if key != ANY_PARTNER and not _ID.fullmatch(key):
            e.add("payout_rules", f"{key!r} is not a partner id (or '*')")
        try:
            payout[key] = str(parse_rule(rule))
        except ValueError as exc:
            e.add("payout_rules", f"{key}: {exc}")
    e.check()
    assert ct is not None
    return {
        **rules,
        "id": offer_id, "name": name, "campaign_type": ct.value,
        "lifespan_days": lifespan if lifespan is not None else DEFAULT_LIFESPAN_DAYS[ct],
        "landing_url": landing, "allow_multiple": mode == DuplicateMode.SEPARATE,
        "duplicate_mode": mode.value, "hold_hours": hold, "payout_rules": dump_mapping(payout),
        "created_at": now, "updated_at": now,
    }


def _inbound_rules(e: _Errors) -> dict[str, Any]:
    """An offer's inbound rules: advertiser networks, click-to-conversion time, daily caps."""
    nets = [n.strip() for n in (_csv(e.data.get("allowed_ips")) or "").split(",") if n.strip()]
    for net in nets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            e.add("allowed_ips", f"{net!r} is not an IP address or network (CIDR)")
    rules: dict[str, Any] = {"allowed_ips": ",".join(nets) or None}
    year = 366 * 86400
    for name in ("min_click_seconds", "max_click_seconds"):
        rules[name] = e.number(name, integer=True, low=0, high=year)
    low, high = rules["min_click_seconds"], rules["max_click_seconds"]
    if low is not None and high is not None and low >= high:
        e.add("max_click_seconds", "must be more than min_click_seconds")
    for name in ("daily_cap", "affiliate_daily_cap"):
        rules[name] = e.number(name, integer=True, low=1, high=10**9)
    for name in ("daily_payout_cap", "affiliate_daily_payout_cap"):
        rules[name] = e.number(name, low=0.01, high=10**12)
    return rules


def parse_partner(data: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """Validate a partner; an invalid template is refused with every problem listed."""
    e = _Errors(data, PARTNER_FIELDS)
    partner_id = e.ident("id")
    name = e.text("name") or partner_id
    url = e.text("postback_url", limit=4000)
    if not url:
        e.add("postback_url", "required")
    else:
        for p in validate_template(url):
            if p.severity == "error":
                e.add("postback_url", p.describe())
    method = (e.text("method", "GET") or "GET").upper()
    if method not in {"GET", "POST"}:
        e.add("method", "must be GET or POST")
    timeout = e.number("timeout", low=0.1, high=120)
    success_check = e.text("success_check")
    statuses = [s.strip().lower() for s in (_csv(data.get("fire_statuses")) or "approved")
                .split(",") if s.strip()]
    if not statuses or any(not _STATUS.fullmatch(s) for s in statuses):
        e.add("fire_statuses", "must be a list of statuses such as approved, pending")
    scope = e.text("scope", "own") or "own"
    if scope not in {"own", "global"}:
        e.add("scope", "must be 'own' (clicks of this affiliate) or 'global' (every conversion)")
    overrides = {
        "max_attempts": e.number("max_attempts", integer=True, low=1, high=100),
        "base_delay": e.number("base_delay", low=0, high=86400),
        "max_delay": e.number("max_delay", low=0, high=7 * 86400),
        "horizon": e.number("horizon", low=0, high=30 * 86400),
    }
    enabled = e.flag("enabled", True)
    body_format, body_template = _body(e, method)
    headers = _headers(e, data.get("headers"))
    proxy = _proxy(e, data.get("egress_proxy"))
    lifecycle = _partner_lifecycle(e)
    e.check()
    # Custom headers are secrets given once: saving a partner without "headers" keeps them.
    kept = {"custom_headers": json.dumps(headers, sort_keys=True) if headers else None
            } if "headers" in data else {}
    return {
        "id": partner_id, "name": name, "postback_url": url, "method": method,
        "body_format": body_format, "body_template": body_template, **kept,
        "egress_proxy": proxy,
        "timeout": timeout if timeout is not None else 10.0,
        "success_check": success_check or None, "fire_statuses": ",".join(statuses),
        "enabled": enabled, "scope": scope, "offer_ids": _csv(data.get("offer_ids")) or None,
        **overrides, **lifecycle, "created_at": now, "updated_at": now,
    }


def _duplicate_mode(e: _Errors, allow_multiple: bool) -> DuplicateMode:
    raw = e.data.get("duplicate_mode")
    try:
        return parse_duplicate_mode(raw if isinstance(raw, str) else None, allow_multiple)
    except ValueError as exc:
        e.add("duplicate_mode", str(exc))
        return DuplicateMode.UPDATE


def _partner_lifecycle(e: _Errors) -> dict[str, Any]:
    """The partner's lifecycle options: events that fire, templates, status names, payout
    rule and hold period, in their stored form."""
    names = (_csv(e.data.get("fire_events")) or "").split(",")
    try:
        fire_events = parse_fire_on(names)
    except ValueError as exc:
        e.add("fire_events", str(exc))
        fire_events = frozenset()
    templates = e.mapping("templates", separators="")
    for kind, url in templates.items():
        if kind not in {t.value for t in Trigger}:
            e.add("templates", f"{kind!r} is not an event ({_TRIGGERS})")
        for p in validate_template(url):
            if p.severity == "error":
                e.add(f"templates.{kind}", p.describe())
    status_map = e.mapping("status_map", separators=", \n")
    for status, alias in status_map.items():
        if not _STATUS.fullmatch(status):
            e.add("status_map", f"{status!r} is not a status (letters and underscores)")
        if not alias or len(alias) > 64:
            e.add("status_map", f"{status}: the name must be 1 to 64 characters")
    rule = e.text("payout_rule", limit=40)
    if rule:
        try:
            rule = str(parse_rule(rule))
        except ValueError as exc:
            e.add("payout_rule", str(exc))
    return {
        "fire_events": ",".join(sorted(t.value for t in fire_events)) or None,
        "templates": dump_mapping(templates), "status_map": dump_mapping(status_map),
        "payout_rule": rule or None,
        "hold_hours": e.number("hold_hours", low=0, high=MAX_HOLD_HOURS),
    }


def _body(e: _Errors, method: str) -> tuple[str | None, str | None]:
    """(body_format, body_template): both or neither, and only for POST."""
    fmt = e.text("body_format")
    template = e.text("body_template", limit=20000)
    if fmt is None and template is None:
        return None, None
    if fmt not in BODY_FORMATS:
        e.add("body_format", "must be form or json (with body_template)")
        return None, None
    if method != "POST":
        e.add("body_format", "a request body needs method POST")
    if not template:
        e.add("body_template", f"required with body_format {fmt}")
        return fmt, None
    for p in validate_body(template, fmt):
        if p.severity == "error":
            e.add("body_template", p.describe())
    return fmt, template


def _headers(e: _Errors, raw: Any) -> dict[str, str]:
    """Custom headers from {name: value} or ["Name: value", ...]."""
    if raw in (None, "", {}, []):
        return {}
    items: list[tuple[Any, Any]] = []
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, list | tuple) and all(isinstance(x, str) for x in raw):
        items = [tuple(x.split(":", 1)) if ":" in x else (x, None) for x in raw]
    else:
        e.add("headers", 'must be an object {"Name": "value"} or a list of "Name: value"')
        return {}
    out: dict[str, str] = {}
    for name, value in items:
        name = str(name).strip()
        if not _HEADER.fullmatch(name) or name.lower() in RESERVED_HEADERS:
            e.add("headers", f"{name!r} is not a header name we may set (letters, digits "
                             "and '-', not one the request already uses)")
        elif not isinstance(value, str) or not value.strip() or len(value) > 4000 or any(
                ch in value for ch in "\r\n\0"):
            e.add("headers", f"{name}: the value must be 1 to 4000 characters on one line")
        else:
            out[name] = value.strip()
    if len(out) > MAX_HEADERS:
        e.add("headers", f"at most {MAX_HEADERS} headers")
    return out


def _proxy(e: _Errors, raw: Any) -> str | None:
    """A partner's egress proxy: http://[user:password@]host:port, or "direct"."""
    if raw in (None, ""):
        return None
    text = str(raw).strip()
    if text == DIRECT:
        return DIRECT
    try:
        parse_proxy(text)
    except ProxyError as exc:
        e.add("egress_proxy", str(exc))
        return None
    return text


# -- template reports (the validator plus a DNS check) ----------------------------------------

def event_template(partner: Mapping[str, Any], event: str) -> str:
    """The partner's template for a conversion event (its postback_url unless it has one)."""
    return load_mapping(partner.get("templates")).get(event) or str(partner["postback_url"])


def _resolve(host: str) -> object:
    return socket.getaddrinfo(host, None)


def template_report(url: str, *, dns: bool = False,
                    resolver: HostResolver | None = None) -> list[TemplateProblem]:
    """Every validator problem; with `dns`, a warning when the host does not resolve."""
    problems = validate_template(url)
    found = host_of(url)
    if dns and found is not None:
        host, position = found
        try:
            (resolver or _resolve)(host)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(TemplateProblem(
                position, f"host {host!r} does not resolve ({reason}); check the spelling",
                "warning", "", "dns"))
    return problems


def body_report(body_format: str | None, body_template: str | None) -> list[TemplateProblem]:
    """Every problem of a body template ([] without one)."""
    if not body_format and not body_template:
        return []
    return list(validate_body(body_template or "", body_format or ""))


# -- secrets are never shown -----------------------------------------------------------------

SECRET_PARTNER_FIELDS = ("hmac_secret", "hmac_secret_previous", "custom_headers")


def redact_partner(row: Mapping[str, Any]) -> dict[str, Any]:
    """A partner row safe to show or export: secrets replaced by what they imply (signing on,
    header names with masked values, proxy credentials masked)."""
    out = {k: v for k, v in row.items() if k not in SECRET_PARTNER_FIELDS}
    out["signing"] = bool(row.get("hmac_secret"))
    out["signing_rotation_until"] = (row.get("hmac_previous_until")
                                     if row.get("hmac_secret_previous") else None)
    out["headers"] = mask_headers(load_headers(row.get("custom_headers")))
    for key in ("postback_url", "egress_proxy"):
        if isinstance(out.get(key), str):
            out[key] = mask_url(out[key])
    if isinstance(out.get("body_template"), str):
        out["body_template"] = mask_body(out["body_template"], out.get("body_format"))
    if isinstance(out.get("templates"), str):
        out["templates"] = dump_mapping({k: mask_url(v) for k, v in
                                         load_mapping(out["templates"]).items()})
    return out


def redact_offer(row: Mapping[str, Any]) -> dict[str, Any]:
    """An offer row safe to show: whether it has a security token, not the token's hash."""
    out = {k: v for k, v in row.items() if k != "security_token_hash"}
    out["security_token"] = bool(row.get("security_token_hash"))
    return out


# -- advertiser security tokens (GET /postback) ----------------------------------------------

def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def set_offer_token(store: Store, offer_id: str, now: datetime) -> str | None:
    """Give the offer a new security token (the old one stops working); None: no such offer."""
    token = secrets.token_urlsafe(24)
    found = store.set_offer_fields(offer_id, security_token_hash=_token_hash(token),
                                   updated_at=now)
    return token if found else None


def check_offer_token(store: Store, params: Mapping[str, str], token: str) -> str | None:
    """None when `token` is the security token of the conversion's offer; else why not.

    The offer is `offer_id`, or the offer of the click named by `transaction_id`.
    """
    offer_id, stored = store.offer_token_hash(params.get("offer_id"),
                                              params.get("transaction_id"))
    if not offer_id:
        return "cannot check the security_token: pass offer_id or a known transaction_id"
    return offer_token_problem(stored, token)


def offer_token_problem(stored_hash: str | None, token: str) -> str | None:
    """None when `token` matches the offer's stored token hash; else why not."""
    if not stored_hash:
        return "this offer accepts no advertiser postbacks yet: create its security token"
    if not hmac.compare_digest(stored_hash, _token_hash(token)):
        return "security_token does not match the offer"
    return None


# -- partner signing keys --------------------------------------------------------------------

SIGNING_ACTIONS = ("enable", "rotate", "disable")


def change_signing(store: Store, partner_id: str, action: str, now: datetime,
                   grace: timedelta, header: str | None = None,
                   scheme: str | None = None) -> tuple[str | None, str]:
    """Enable, rotate or disable a partner's signing. Returns (new secret or None, summary).

    `scheme`: "hmac" (X-Postback-Signature) or "standard" (Standard Webhooks); None keeps the
    partner's (hmac at first). Changing the scheme starts over with a new secret: a secret of
    one scheme cannot sign for the other, so there is no grace period.

    Raises ValidationError for a bad action or header, UnknownPartner for an unknown partner.
    """
    errors = []
    if action not in SIGNING_ACTIONS:
        errors.append(FieldError("action", f"must be one of {', '.join(SIGNING_ACTIONS)}"))
    if header is not None and (not _HEADER.fullmatch(header) or header.lower() in
                               {"host", "content-length", "x-postback-id",
                                "x-postback-timestamp", "authorization"}):
        errors.append(FieldError("header", "must be a header name of letters, digits and '-' "
                                           "that the request does not already use"))
    if scheme is not None and scheme not in SCHEMES:
        errors.append(FieldError("scheme", f"must be one of {', '.join(SCHEMES)}"))
    if errors:
        raise ValidationError(errors)
    row = store.get_partner(partner_id)
    if row is None:
        raise UnknownPartner(partner_id)
    current = row.get("signature_scheme") or HMAC
    switching = scheme is not None and scheme != current and bool(row.get("hmac_secret"))
    scheme = scheme or current
    if switching and action == "enable":
        action = "rotate"
    secret: str | None = None
    if action == "disable":
        changes: dict[str, Any] = {"hmac_secret": None, "hmac_secret_previous": None,
                                   "hmac_previous_until": None}
        summary = f"partner {partner_id}: signing disabled"
    elif switching:
        secret = new_secret(scheme)
        changes = {"hmac_secret": secret, "hmac_secret_previous": None,
                   "hmac_previous_until": None}
        summary = (f"partner {partner_id}: signing switched from {current} to {scheme} with a "
                   "new secret; the old secret no longer signs")
    elif action == "enable" and row.get("hmac_secret"):
        changes = {}
        summary = (f"partner {partner_id}: signing is already enabled "
                   "(use rotate for a new secret)")
    else:
        changes = rotation(row if action == "rotate" else {}, now, grace, scheme=scheme)
        secret = changes["hmac_secret"]
        summary = (f"partner {partner_id}: signing enabled ({scheme})" if action == "enable" or
                   not row.get("hmac_secret") else
                   f"partner {partner_id}: secret rotated; the old one also signs until "
                   f"{(now + grace).strftime('%Y-%m-%d %H:%M:%S')} UTC")
    if header is not None or (secret and not row.get("signature_header")):
        changes["signature_header"] = header or DEFAULT_SIGNATURE_HEADER
    if changes and secret:
        changes["signature_scheme"] = scheme
    if changes:
        changes["updated_at"] = now
        store.set_partner_fields(partner_id, **changes)
    return secret, summary
