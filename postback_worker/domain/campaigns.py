"""Campaign types and their click session lifespans."""

from __future__ import annotations

from enum import StrEnum


class CampaignType(StrEnum):
    """Kind of campaign; drives the default click lifespan."""

    LEAD_GEN = "lead_gen"
    ECOMMERCE = "ecommerce"
    B2B_SAAS = "b2b_saas"
    FINANCIAL = "financial"


DEFAULT_LIFESPAN_DAYS: dict[CampaignType, int] = {
    CampaignType.LEAD_GEN: 14,
    CampaignType.ECOMMERCE: 30,
    CampaignType.B2B_SAAS: 90,
    CampaignType.FINANCIAL: 120,
}

RECOMMENDED_LIFESPAN_DAYS: dict[CampaignType, tuple[int, int]] = {
    CampaignType.LEAD_GEN: (7, 14),
    CampaignType.ECOMMERCE: (30, 30),
    CampaignType.B2B_SAAS: (60, 90),
    CampaignType.FINANCIAL: (90, 120),
}

_CHOICES = ", ".join(ct.value for ct in CampaignType)


def parse_campaign_type(value: str) -> CampaignType:
    """Parse a campaign type name (case and surrounding space ignored)."""
    try:
        return CampaignType(str(value).strip().lower())
    except ValueError:
        raise ValueError(f"campaign_type must be one of: {_CHOICES}") from None


def lifespan_in_range(ct: CampaignType, days: int) -> bool:
    """True when ``days`` is within the recommended range for ``ct`` (inclusive)."""
    low, high = RECOMMENDED_LIFESPAN_DAYS[ct]
    return low <= days <= high
