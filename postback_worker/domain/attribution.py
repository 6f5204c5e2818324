"""Attribute a conversion to its click, honouring the offer's click lifespan."""

from __future__ import annotations

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
    UPDATED = "updated"  # an event folded into an earlier conversion (its history)


FINAL_STATES: frozenset[ConversionState] = frozenset(ConversionState) - {ConversionState.RECEIVED}


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


@dataclass(frozen=True)
class ConversionFacts:
    """What attribution needs to know about a conversion."""

    transaction_id: str
    offer_id: str | None
    occurred_at: datetime


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
    age = _utc(conversion.occurred_at) - _utc(click.clicked_at)
    days = offer.lifespan_days
    if age > timedelta(days=days):
        return Decision(
            ConversionState.EXPIRED_CLICK,
            f"click at {_iso(click.clicked_at)} is {age / timedelta(days=1):.1f} days before "
            f"the conversion; offer lifespan is {days} days",
        )
    reason = f"click within {days}-day lifespan"
    if age < timedelta(0):
        reason += f" (conversion {-age.total_seconds():.0f}s before the click: clock skew)"
    return Decision(ConversionState.ATTRIBUTED, reason)


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def dedupe_key(offer_id: str, transaction_id: str, goal_id: str) -> str:
    """Key identifying one conversion: ``offer:transaction:goal`` (parts escaped, injective)."""
    return ":".join(_esc(p) for p in (offer_id, transaction_id, goal_id))


def fires_on(status: str, fire_statuses: Iterable[str]) -> bool:
    """True when ``status`` is one of ``fire_statuses`` (case-insensitive)."""
    wanted = status.strip().lower()
    return any(wanted == s.strip().lower() for s in fire_statuses)
