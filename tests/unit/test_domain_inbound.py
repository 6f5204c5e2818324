"""An offer's inbound rules as pure code: click-to-conversion time, advertiser IP, daily caps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postback_worker.domain.attribution import (
    INBOUND_REFUSED,
    Caps,
    ClickFacts,
    ConversionFacts,
    ConversionState,
    OfferFacts,
    Usage,
    attribute,
    ip_in,
    over_cap,
)

CLICKED = datetime(2026, 1, 1, tzinfo=UTC)
CLICK = ClickFacts("tx1", "o1", "a1", CLICKED)
S = ConversionState


@pytest.mark.parametrize(
    ("seconds", "min_s", "max_s", "ip", "nets", "state", "reason"),
    [
        (2, 60, None, None, (), S.TOO_SOON,
         "conversion 2s after its click; the offer requires at least 60s"),
        (60, 60, None, None, (), S.ATTRIBUTED, "click within 30-day lifespan"),
        (3601, None, 3600, None, (), S.TOO_LATE,
         "conversion 3601s after its click; the offer allows at most 3600s"),
        (3600, None, 3600, None, (), S.ATTRIBUTED, "click within 30-day lifespan"),
        (31 * 86400, None, 40 * 86400, None, (), S.EXPIRED_CLICK, None),  # lifespan first
        (100, None, None, "198.51.100.7", ("203.0.113.0/24",), S.IP_NOT_ALLOWED,
         "reported from 198.51.100.7, outside the offer's advertiser networks "
         "(203.0.113.0/24)"),
        (2, 60, None, "198.51.100.7", ("203.0.113.0/24",), S.IP_NOT_ALLOWED, None),  # IP first
        (100, None, None, "203.0.113.9", ("203.0.113.0/24",), S.ATTRIBUTED, None),
        (100, None, None, None, ("203.0.113.0/24",), S.ATTRIBUTED, None),  # backend, API key
        (100, None, None, "2001:db8::5", ("2001:db8::/32",), S.ATTRIBUTED, None),
    ],
)
def test_inbound_rules(seconds: int, min_s: int | None, max_s: int | None, ip: str | None,
                       nets: tuple[str, ...], state: ConversionState,
                       reason: str | None) -> None:
    d = attribute(ConversionFacts("tx1", "o1", CLICKED + timedelta(seconds=seconds), ip),
                  CLICK, OfferFacts("o1", 30, min_s, max_s, nets))
    assert d.state is state
    if reason is not None:
        assert d.reason == reason


@pytest.mark.parametrize(
    ("ip", "nets", "inside"),
    [("10.1.2.3", ("10.0.0.0/8",), True), ("10.1.2.3", ("11.0.0.0/8", "10.1.2.3"), True),
     ("10.1.2.3", ("192.168.0.0/16",), False), ("::1", ("127.0.0.0/8",), False),
     ("not-an-ip", ("0.0.0.0/0",), False), ("10.1.2.3", ("bad", "10.0.0.0/8"), True)],
)
def test_ip_in(ip: str, nets: tuple[str, ...], inside: bool) -> None:
    assert ip_in(ip, nets) is inside


@pytest.mark.parametrize(
    ("caps", "offer_used", "aff_used", "payout", "why"),
    [
        (Caps(count=2), Usage(1, 0), Usage(0, 0), 1.0, None),
        (Caps(count=2), Usage(2, 0), Usage(0, 0), 1.0,
         "over the offer's daily cap of 2 conversions"),
        (Caps(payout=10.0), Usage(1, 9.0), Usage(), 1.0, None),
        (Caps(payout=10.0), Usage(1, 9.5), Usage(), 1.0, "over the offer's daily payout cap of 10"),
        (Caps(affiliate_count=1), Usage(5, 0), Usage(1, 0), 0.0,
         "over affiliate a1's daily cap of 1 conversions"),
        (Caps(affiliate_payout=2.5), Usage(), Usage(1, 2.0), 0.5, None),
        (Caps(affiliate_payout=2.5), Usage(), Usage(1, 2.0), 0.51,
         "over affiliate a1's daily payout cap of 2.5"),
        (Caps(), Usage(10**6, 10**9), Usage(10**6, 10**9), 5.0, None),
    ],
)
def test_over_cap(caps: Caps, offer_used: Usage, aff_used: Usage, payout: float,
                  why: str | None) -> None:
    assert over_cap(caps, offer_used, aff_used, payout, "a1") == why


def test_refused_states_are_final() -> None:
    assert set(INBOUND_REFUSED) == {S.TOO_SOON, S.TOO_LATE, S.CAPPED, S.IP_NOT_ALLOWED}
    assert not Caps().any and Caps(affiliate_payout=1.0).any
