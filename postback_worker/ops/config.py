"""Offer and partner configuration: validation shared by the CLI and the admin API."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from postback_worker.domain.campaigns import DEFAULT_LIFESPAN_DAYS, parse_campaign_type
from postback_worker.domain.events import FieldError, ValidationError
from postback_worker.domain.macros import validate_template

_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_STATUS = re.compile(r"[a-z_]{1,32}")

OFFER_FIELDS = {"id", "name", "campaign_type", "lifespan_days", "landing_url", "allow_multiple"}
PARTNER_FIELDS = {
    "id", "name", "postback_url", "method", "timeout", "success_check", "fire_statuses",
    "enabled", "scope", "offer_ids", "max_attempts", "base_delay", "max_delay", "horizon",
}


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
    e.check()
    assert ct is not None
    return {
        "id": offer_id, "name": name, "campaign_type": ct.value,
        "lifespan_days": lifespan if lifespan is not None else DEFAULT_LIFESPAN_DAYS[ct],
        "landing_url": landing, "allow_multiple": allow_multiple,
        "created_at": now, "updated_at": now,
    }


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
                fix = f" ({p.fix})" if p.fix else ""
                e.add("postback_url", f"position {p.position}: {p.message}{fix}")
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
    e.check()
    return {
        "id": partner_id, "name": name, "postback_url": url, "method": method,
        "timeout": timeout if timeout is not None else 10.0,
        "success_check": success_check or None, "fire_statuses": ",".join(statuses),
        "enabled": enabled, "scope": scope, "offer_ids": _csv(data.get("offer_ids")) or None,
        **overrides, "created_at": now, "updated_at": now,
    }
