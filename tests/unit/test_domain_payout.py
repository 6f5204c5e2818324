from decimal import Decimal

import pytest

from postback_worker.domain.payout import (
    ADVERTISER,
    ANY_PARTNER,
    PayoutRule,
    RuleKind,
    affiliate_payout,
    format_amount,
    parse_rule,
    payout_macros,
    resolve,
)


@pytest.mark.parametrize("text, rule", [
    (None, ADVERTISER),
    ("", ADVERTISER),
    ("advertiser", ADVERTISER),
    (" Fixed:2.50 ", PayoutRule(RuleKind.FIXED, Decimal("2.50"))),
    ("percent:40", PayoutRule(RuleKind.PERCENT, Decimal("40"))),
    ("percent:12.5", PayoutRule(RuleKind.PERCENT, Decimal("12.5"))),
])
def test_parse_rule(text: str | None, rule: PayoutRule) -> None:
    assert parse_rule(text) == rule


@pytest.mark.parametrize("text, message", [
    ("half", "must be advertiser, fixed:AMOUNT or percent:P"),
    ("fixed", "must be advertiser, fixed:AMOUNT or percent:P"),
    ("fixed:abc", "'abc' is not a number"),
    ("fixed:-1", "non-negative"),
    ("percent:1001", "at most 1000"),
    ("percent:nan", "non-negative"),
    ("advertiser:3", "must be advertiser"),
])
def test_parse_rule_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rule(text)


@pytest.mark.parametrize("rule", ["advertiser", "fixed:2.5", "percent:40"])
def test_rule_text_round_trips(rule: str) -> None:
    assert str(parse_rule(rule)) == rule


@pytest.mark.parametrize("amount, currency, text", [
    ("12.5", "USD", "12.50"),
    ("0.005", "EUR", "0.01"),  # half up
    ("0.004", "EUR", "0.00"),
    ("2.675", None, "2.68"),  # Decimal, not float: 2.675 rounds up
    ("1234.5", "JPY", "1235"),
    ("1.2345", "KWD", "1.235"),
    ("7", "usd", "7.00"),
])
def test_format_amount(amount: str, currency: str | None, text: str) -> None:
    assert format_amount(Decimal(amount), currency) == text


@pytest.mark.parametrize("rule, payout, sale, currency, expected", [
    ("advertiser", "10", "100", "USD", "10"),  # passed through as received
    ("advertiser", None, "100", "USD", None),
    ("fixed:2.5", "10", "100", "USD", "2.50"),
    ("fixed:300", None, None, "JPY", "300"),
    ("percent:40", "10", "99.99", "USD", "40.00"),  # 39.996
    ("percent:12.5", "10", "10.01", "EUR", "1.25"),  # 1.25125
    ("percent:50", "9", None, "USD", "4.50"),  # no sale amount: of the advertiser's payout
    ("percent:50", None, None, "USD", None),
    ("percent:10", "1", "1005", "JPY", "101"),  # 100.5 half up
])
def test_affiliate_payout(rule: str, payout: str | None, sale: str | None,
                          currency: str | None, expected: str | None) -> None:
    assert affiliate_payout(parse_rule(rule), payout=payout, sale_amount=sale,
                            currency=currency) == expected


FIXED = parse_rule("fixed:1")
PCT = parse_rule("percent:30")
OWN = parse_rule("percent:50")


@pytest.mark.parametrize("partner_rule, offer_rules, expected", [
    (None, {}, ADVERTISER),
    (OWN, {}, OWN),
    (OWN, {ANY_PARTNER: FIXED}, FIXED),
    (OWN, {"p1": PCT, ANY_PARTNER: FIXED}, PCT),
    (None, {"p2": PCT}, ADVERTISER),
])
def test_resolve(partner_rule: PayoutRule | None, offer_rules: dict[str, PayoutRule],
                 expected: PayoutRule) -> None:
    assert resolve("p1", partner_rule, offer_rules) == expected


def test_payout_macros_carry_revenue() -> None:
    assert payout_macros(parse_rule("percent:40"), payout="12.5", sale_amount="100",
                         currency="USD") == {"payout": "40.00", "revenue": "12.5"}
    assert payout_macros(ADVERTISER, payout=None, sale_amount=None, currency=None) == {
        "payout": "", "revenue": ""}
