import pytest

from postback_worker.domain.campaigns import (
    DEFAULT_LIFESPAN_DAYS,
    RECOMMENDED_LIFESPAN_DAYS,
    CampaignType,
    lifespan_in_range,
    parse_campaign_type,
)


@pytest.mark.parametrize(
    ("ct", "default", "recommended"),
    [
        (CampaignType.LEAD_GEN, 14, (7, 14)),
        (CampaignType.ECOMMERCE, 30, (30, 30)),
        (CampaignType.B2B_SAAS, 90, (60, 90)),
        (CampaignType.FINANCIAL, 120, (90, 120)),
    ],
)
def test_lifespan_tables(ct: CampaignType, default: int, recommended: tuple[int, int]) -> None:
    assert DEFAULT_LIFESPAN_DAYS[ct] == default
    assert RECOMMENDED_LIFESPAN_DAYS[ct] == recommended
    assert lifespan_in_range(ct, default)


@pytest.mark.parametrize(
    ("ct", "days", "expected"),
    [
        (CampaignType.LEAD_GEN, 6, False),
        (CampaignType.LEAD_GEN, 7, True),
        (CampaignType.LEAD_GEN, 14, True),
        (CampaignType.LEAD_GEN, 15, False),
        (CampaignType.ECOMMERCE, 29, False),
        (CampaignType.ECOMMERCE, 30, True),
        (CampaignType.ECOMMERCE, 31, False),
        (CampaignType.B2B_SAAS, 59, False),
        (CampaignType.B2B_SAAS, 60, True),
        (CampaignType.B2B_SAAS, 90, True),
        (CampaignType.B2B_SAAS, 91, False),
        (CampaignType.FINANCIAL, 89, False),
        (CampaignType.FINANCIAL, 90, True),
        (CampaignType.FINANCIAL, 120, True),
        (CampaignType.FINANCIAL, 121, False),
    ],
)
def test_lifespan_in_range(ct: CampaignType, days: int, expected: bool) -> None:
    assert lifespan_in_range(ct, days) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("lead_gen", CampaignType.LEAD_GEN),
        ("ecommerce", CampaignType.ECOMMERCE),
        (" B2B_SAAS ", CampaignType.B2B_SAAS),
        ("Financial", CampaignType.FINANCIAL),
    ],
)
def test_parse_campaign_type(raw: str, expected: CampaignType) -> None:
    assert parse_campaign_type(raw) is expected


@pytest.mark.parametrize("raw", ["", "leadgen", "saas", "lead-gen", "insurance"])
def test_parse_campaign_type_rejects(raw: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_campaign_type(raw)
    expected = "campaign_type must be one of: lead_gen, ecommerce, b2b_saas, financial"
    assert str(exc.value) == expected
