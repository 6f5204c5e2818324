"""Payout rules (pure): what the affiliate's `{payout}` is, and `{revenue}`.

A rule is written as text:

- ``advertiser``   the advertiser's payout, as received (the default)
- ``fixed:2.50``   a fixed amount, in the conversion's currency
- ``percent:40``   40 % of the sale amount (of the advertiser's payout when no sale amount)

Per partner, with an offer-level override (`resolve`). Computed amounts are rounded half up to
the currency's minor unit (2 decimals; 0 for JPY, KRW, ...; 3 for KWD, BHD, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from enum import StrEnum

# ISO 4217 currencies whose minor unit is not 2 decimals.
_MINOR_UNITS: dict[str, int] = {
    **dict.fromkeys(("JPY", "KRW", "VND", "CLP", "ISK", "PYG", "UGX", "XAF", "XOF", "HUF",
                     "IDR"), 0),
    **dict.fromkeys(("KWD", "BHD", "OMR", "JOD", "TND", "LYD", "IQD"), 3),
}
_MAX_PERCENT = Decimal(1000)
_MAX_FIXED = Decimal(2**40)
# Offer-level rules: this key applies to every partner without a rule of its own.
ANY_PARTNER = "*"


class RuleKind(StrEnum):
    ADVERTISER = "advertiser"
    FIXED = "fixed"
    PERCENT = "percent"


@dataclass(frozen=True)
class PayoutRule:
    kind: RuleKind
    value: Decimal | None = None

    def __str__(self) -> str:
        if self.value is None:
            return self.kind.value
        return f"{self.kind.value}:{format(self.value.normalize(), 'f')}"


ADVERTISER = PayoutRule(RuleKind.ADVERTISER)


def parse_rule(text: str | None) -> PayoutRule:
    """Parse ``advertiser``, ``fixed:AMOUNT`` or ``percent:P``; raises ValueError."""
    if text is None or not text.strip():
        return ADVERTISER
    kind, _, raw = text.strip().lower().partition(":")
    if kind == RuleKind.ADVERTISER and not raw:
        return ADVERTISER
    if kind not in (RuleKind.FIXED, RuleKind.PERCENT) or not raw:
        raise ValueError("must be advertiser, fixed:AMOUNT or percent:P (e.g. percent:40)")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"{raw!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise ValueError("must be a non-negative number")
    if kind == RuleKind.PERCENT and value > _MAX_PERCENT:
        raise ValueError(f"a percentage must be at most {_MAX_PERCENT}")
    if kind == RuleKind.FIXED and value > _MAX_FIXED:
        raise ValueError(f"a fixed amount must be at most {_MAX_FIXED}")
    return PayoutRule(RuleKind(kind), value)


def resolve(partner_id: str, partner_rule: PayoutRule | None,
            offer_rules: Mapping[str, PayoutRule]) -> PayoutRule:
    """The rule for a partner on an offer: the offer's rule for that partner, the offer's rule
    for any partner, the partner's own rule, else the advertiser's payout."""
    return (offer_rules.get(partner_id) or offer_rules.get(ANY_PARTNER) or partner_rule
            or ADVERTISER)


def minor_units(currency: str | None) -> int:
    return _MINOR_UNITS.get((currency or "").upper(), 2)


def format_amount(amount: Decimal, currency: str | None) -> str:
    """`amount` rounded half up to the currency's minor unit, as plain digits ("12.50")."""
    quantum = Decimal(1).scaleb(-minor_units(currency))
    return format(amount.quantize(quantum, rounding=ROUND_HALF_UP), "f")


def _number(value: str | None) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def affiliate_payout(rule: PayoutRule, *, payout: str | None, sale_amount: str | None,
                     currency: str | None) -> str | None:
    """The `{payout}` the partner receives; None when the rule has nothing to work from."""
    if rule.kind == RuleKind.ADVERTISER:
        return payout
    assert rule.value is not None
    if rule.kind == RuleKind.FIXED:
        return format_amount(rule.value, currency)
    base = _number(sale_amount)
    if base is None:
        base = _number(payout)
    if base is None:
        return None
    return format_amount(base * rule.value / 100, currency)


def payout_macros(rule: PayoutRule, *, payout: str | None, sale_amount: str | None,
                  currency: str | None) -> dict[str, str]:
    """`{payout}` (by the rule) and `{revenue}` (the advertiser's payout)."""
    return {
        "payout": affiliate_payout(rule, payout=payout, sale_amount=sale_amount,
                                   currency=currency) or "",
        "revenue": payout or "",
    }
