from datetime import UTC, datetime, timedelta, timezone

import pytest

from postback_worker.domain.attribution import (
    FINAL_STATES,
    ClickFacts,
    ConversionFacts,
    ConversionState,
    Decision,
    OfferFacts,
    attribute,
    dedupe_key,
    fires_on,
)
from postback_worker.domain.campaigns import DEFAULT_LIFESPAN_DAYS, CampaignType

CLICKED = datetime(2026, 1, 1, tzinfo=UTC)
CLICK = ClickFacts(transaction_id="tx1", offer_id="42", aff_id="7", clicked_at=CLICKED)


def conv(after: timedelta, offer_id: str | None = "42") -> ConversionFacts:
    return ConversionFacts(transaction_id="tx1", offer_id=offer_id, occurred_at=CLICKED + after)


def test_final_states() -> None:
    assert set(ConversionState) - {ConversionState.RECEIVED} == FINAL_STATES


LIFESPAN_ROWS = [
    (ct, after, expected)
    for ct, days in DEFAULT_LIFESPAN_DAYS.items()
    for after, expected in [
        (timedelta(days=days) - timedelta(seconds=1), ConversionState.ATTRIBUTED),
        (timedelta(days=days), ConversionState.ATTRIBUTED),
        (timedelta(days=days) + timedelta(seconds=1), ConversionState.EXPIRED_CLICK),
        (timedelta(days=days + 1), ConversionState.EXPIRED_CLICK),
    ]
]


@pytest.mark.parametrize(("ct", "after", "expected"), LIFESPAN_ROWS)
def test_lifespan_boundaries_per_campaign_type(
    ct: CampaignType, after: timedelta, expected: ConversionState
) -> None:
    offer = OfferFacts(id="42", lifespan_days=DEFAULT_LIFESPAN_DAYS[ct])
    assert attribute(conv(after), CLICK, offer).state is expected


OFFER30 = OfferFacts(id="42", lifespan_days=30)


@pytest.mark.parametrize(
    ("conversion", "click", "offer", "expected"),
    [
        (
            conv(timedelta(days=1)),
            None,
            OFFER30,
            Decision(ConversionState.UNKNOWN_CLICK, "no click with transaction_id 'tx1'"),
        ),
        (
            conv(timedelta(days=1), offer_id="99"),
            CLICK,
            OFFER30,
            Decision(
                ConversionState.UNKNOWN_CLICK,
                "conversion is for offer '99' but click 'tx1' is for offer '42'",
            ),
        ),
        (
            conv(timedelta(days=1)),
            CLICK,
            None,
            Decision(ConversionState.UNKNOWN_OFFER, "offer '42' not found"),
        ),
        (
            conv(timedelta(days=31)),
            CLICK,
            OFFER30,
            Decision(
                ConversionState.EXPIRED_CLICK,
                "click at 2026-01-01T00:00:00Z is 31.0 days before the conversion; "
                "offer lifespan is 30 days",
            ),
        ),
        (
            conv(timedelta(days=2)),
            CLICK,
            OFFER30,
            Decision(ConversionState.ATTRIBUTED, "click within 30-day lifespan"),
        ),
        (
            conv(timedelta(days=2), offer_id=None),
            CLICK,
            OFFER30,
            Decision(ConversionState.ATTRIBUTED, "click within 30-day lifespan"),
        ),
        (
            conv(-timedelta(seconds=90)),
            CLICK,
            OFFER30,
            Decision(
                ConversionState.ATTRIBUTED,
                "click within 30-day lifespan (conversion 90s before the click: clock skew)",
            ),
        ),
    ],
)
def test_attribute(
    conversion: ConversionFacts,
    click: ClickFacts | None,
    offer: OfferFacts | None,
    expected: Decision,
) -> None:
    assert attribute(conversion, click, offer) == expected


@pytest.mark.parametrize(
    ("occurred_at", "expected"),
    [
        (datetime(2026, 1, 31, 1, 59, tzinfo=timezone(timedelta(hours=2))), "attributed"),
        (datetime(2026, 1, 31, 2, 1, tzinfo=timezone(timedelta(hours=2))), "expired_click"),
        (datetime(2026, 1, 31, 0, 0, 1), "expired_click"),
        (datetime(2026, 1, 30, 23, 59, 59), "attributed"),
    ],
)
def test_attribute_mixed_timezones_and_naive_as_utc(occurred_at: datetime, expected: str) -> None:
    conversion = ConversionFacts("tx1", "42", occurred_at)
    naive_click = ClickFacts("tx1", "42", "7", datetime(2026, 1, 1))
    assert attribute(conversion, naive_click, OFFER30).state == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("1", "tx", ""), ("1", "tx", "")),
        (("1", "tx", "g"), ("1", "tx", "g")),
    ],
)
def test_dedupe_key_stable(a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    assert dedupe_key(*a) == dedupe_key(*b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("1", "tx", ""), ("1", "tx", "g")),
        (("1", "tx", ""), ("2", "tx", "")),
        (("1", "a:b", ""), ("1:a", "b", "")),
        (("1", "a", "b:"), ("1", "a:b", "")),
        (("1", "a%3Ab", ""), ("1", "a:b", "")),
    ],
)
def test_dedupe_key_distinct(a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    assert dedupe_key(*a) != dedupe_key(*b)


def test_dedupe_key_readable() -> None:
    assert dedupe_key("42", "tx_1", "") == "42:tx_1:"


@pytest.mark.parametrize(
    ("status", "fire", "expected"),
    [
        ("approved", ["approved"], True),
        ("APPROVED", ["approved"], True),
        ("approved", ("Approved", "pending"), True),
        ("pending", ["approved"], False),
        ("rejected", [], False),
        (" approved ", ["approved"], True),
        ("approve", ["approved"], False),
    ],
)
def test_fires_on(status: str, fire: list[str], expected: bool) -> None:
    assert fires_on(status, fire) is expected
