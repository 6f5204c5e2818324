"""Attribute a conversion to its click, honouring the offer's click lifespan."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum


class ConversionState(StrEnum):
    """Where a conversion ended up; everything but RECEIVED is final."""

    RECEIVED = "received"
    ATTRIBUTED = "attributed"
    EXPIRED_CLICK = "expired_click"
    UNKNOWN_CLICK = "unknown_click"
    UNKNOWN_OFFER = "unknown_offer"
    DUPLICATE = "duplicate"
    REJECTED_STATUS = "rejected_status"
    # The offer's inbound rules (each with its reason).
    TOO_SOON = "too_soon"
    TOO_LATE = "too_late"
    CAPPED = "capped"
    IP_NOT_ALLOWED = "ip_not_allowed"
    UPDATED = "updated"  # an event folded into an earlier conversion (its history)


FINAL_STATES: frozenset[ConversionState] = frozenset(ConversionState) - {ConversionState.RECEIVED}
# Refused by an offer's inbound rules (click-to-conversion time, caps, advertiser IP).
INBOUND_REFUSED: tuple[ConversionState, ...] = (
    ConversionState.TOO_SOON, ConversionState.TOO_LATE, ConversionState.CAPPED,
    ConversionState.IP_NOT_ALLOWED)


@dataclass(frozen=True)
class ClickFacts:
    """What attribution needs to know about a click."""

    transaction_id: str
    offer_id: str
    aff_id: str
    clicked_at: datetime


@dataclass(frozen=True)
class OfferFacts:
    """What attribution needs to know about an offer."""

    id: str
    lifespan_days: int
    # Click-to-conversion time bounds in seconds (None: no bound).
    min_seconds: int | None = None
    max_seconds: int | None = None
    # Advertiser networks allowed to report conversions by GET /postback (empty: any).
    allowed_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConversionFacts:
    """What attribution needs to know about a conversion."""

    transaction_id: str
    offer_id: str | None
    occurred_at: datetime
    # The address that reported it by GET /postback (None: a backend with an API key).
    source_ip: str | None = None


@dataclass(frozen=True)
class Decision:
    """Attribution result with a human-readable reason."""

    state: ConversionState
    reason: str


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def attribute(
    conversion: ConversionFacts, click: ClickFacts | None, offer: OfferFacts | None
) -> Decision:
    """Decide whether ``conversion`` is attributed to ``click`` under ``offer``'s lifespan."""
    tid = conversion.transaction_id
    if click is None:
        return Decision(ConversionState.UNKNOWN_CLICK, f"no click with transaction_id {tid!r}")
    if conversion.offer_id is not None and conversion.offer_id != click.offer_id:
        return Decision(
            ConversionState.UNKNOWN_CLICK,
            f"conversion is for offer {conversion.offer_id!r} but click {tid!r} "
            f"is for offer {click.offer_id!r}",
        )
    if offer is None:
        return Decision(ConversionState.UNKNOWN_OFFER, f"offer {click.offer_id!r} not found")
    if conversion.source_ip and offer.allowed_networks and not ip_in(
            conversion.source_ip, offer.allowed_networks):
        return Decision(
            ConversionState.IP_NOT_ALLOWED,
            f"reported from {conversion.source_ip}, outside the offer's advertiser networks "
            f"({', '.join(offer.allowed_networks)})",
        )
    age = _utc(conversion.occurred_at) - _utc(click.clicked_at)
    days = offer.lifespan_days
    if age > timedelta(days=days):
        return Decision(
            ConversionState.EXPIRED_CLICK,
            f"click at {_iso(click.clicked_at)} is {age / timedelta(days=1):.1f} days before "
            f"the conversion; offer lifespan is {days} days",
        )
    seconds = age.total_seconds()
    if offer.min_seconds is not None and seconds < offer.min_seconds:
        return Decision(
            ConversionState.TOO_SOON,
            f"conversion {seconds:.0f}s after its click; the offer requires at least "
            f"{offer.min_seconds}s",
        )
    if offer.max_seconds is not None and seconds > offer.max_seconds:
        return Decision(
            ConversionState.TOO_LATE,
            f"conversion {seconds:.0f}s after its click; the offer allows at most "
            f"{offer.max_seconds}s",
        )
    reason = f"click within {days}-day lifespan"
    if age < timedelta(0):
        reason += f" (conversion {-age.total_seconds():.0f}s before the click: clock skew)"
    return Decision(ConversionState.ATTRIBUTED, reason)


def ip_in(ip: str, networks: Iterable[str]) -> bool:
    """True when `ip` is inside one of `networks` (CIDR strings; bad entries never match)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    for raw in networks:
        try:
            net = ipaddress.ip_network(raw.strip(), strict=False)
        except ValueError:
            continue
        if addr.version == net.version and addr in net:
            return True
    return False


@dataclass(frozen=True)
class Caps:
    """An offer's daily caps (None: no cap): per offer and per affiliate, count and payout."""

    count: int | None = None
    payout: float | None = None
    affiliate_count: int | None = None
    affiliate_payout: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.count, self.payout, self.affiliate_count,
                                           self.affiliate_payout))


@dataclass
class Usage:
    """What one day has used so far: conversions and payout."""

    count: int = 0
    payout: float = 0.0


def over_cap(caps: Caps, offer_used: Usage, affiliate_used: Usage, payout: float,
             aff_id: str) -> str | None:
    """Why one more conversion (of `payout`) goes over a daily cap, or None when it fits."""
    checks = (
        (caps.count, offer_used.count + 1, "the offer's daily cap of {cap} conversions"),
        (caps.payout, offer_used.payout + payout, "the offer's daily payout cap of {cap:g}"),
        (caps.affiliate_count, affiliate_used.count + 1,
         "affiliate {aff}'s daily cap of {cap} conversions"),
        (caps.affiliate_payout, affiliate_used.payout + payout,
         "affiliate {aff}'s daily payout cap of {cap:g}"),
    )
    for cap, would_be, text in checks:
        if cap is not None and would_be > cap + 1e-9:
            return "over " + text.format(cap=cap, aff=aff_id)
    return None


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def dedupe_key(offer_id: str, transaction_id: str, goal_id: str) -> str:
    """Key identifying one conversion: ``offer:transaction:goal`` (parts escaped, injective)."""
    return f"{_esc(offer_id)}:{_esc(transaction_id)}:{_esc(goal_id)}"


def fires_on(status: str, fire_statuses: Iterable[str]) -> bool:
    """True when ``status`` is one of ``fire_statuses`` (case-insensitive)."""
    wanted = status.strip().lower()
    return any(wanted == s.strip().lower() for s in fire_statuses)
