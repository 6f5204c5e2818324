"""Offers and partners as the pipeline sees them, cached briefly per process."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from postback_worker.delivery.signing import SigningKeys
from postback_worker.domain.attribution import Caps
from postback_worker.domain.masking import load_headers
from postback_worker.domain.retry import RetryPolicy
from postback_worker.store.repo import Store

CONTENT_TYPES = {"json": "application/json", "form": "application/x-www-form-urlencoded"}


@dataclass(frozen=True)
class Partner:
    id: str
    name: str
    postback_url: str
    method: str
    timeout: float
    success_check: str | None
    fire_statuses: tuple[str, ...]
    enabled: bool
    scope: str
    offer_ids: tuple[str, ...]
    policy_overrides: Mapping[str, float | int | None]
    # Signing keys and scheme (delivery/signing.py), None when the partner does not sign.
    signing: SigningKeys | None = None
    # POST body: "form" or "json" rendered from body_template (None: the query string).
    body_format: str | None = None
    body_template: str | None = None
    # Custom request headers (secrets; repr never shows them).
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Own egress proxy ("direct": none); None: the deployment's.
    egress_proxy: str | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Partner:
        return cls(
            id=row["id"],
            name=row["name"],
            postback_url=row["postback_url"],
            method=row["method"],
            timeout=float(row["timeout"]),
            success_check=row["success_check"] or None,
            fire_statuses=_split(row["fire_statuses"]),
            enabled=bool(row["enabled"]),
            scope=row["scope"],
            offer_ids=_split(row["offer_ids"]),
            policy_overrides={
                k: row[k] for k in ("max_attempts", "base_delay", "max_delay", "horizon")
            },
            signing=SigningKeys.from_row(row),
            body_format=row.get("body_format") or None,
            body_template=row.get("body_template") or None,
            headers=load_headers(row.get("custom_headers")),
            egress_proxy=row.get("egress_proxy") or None,
        )

    @property
    def content_type(self) -> str | None:
        return CONTENT_TYPES.get(self.body_format or "")

    def policy(self, default: RetryPolicy) -> RetryPolicy:
        return default.with_overrides(**self.policy_overrides)

    def serves(self, offer_id: str, aff_id: str) -> bool:
        if self.scope == "global":
            return not self.offer_ids or offer_id in self.offer_ids
        return self.id == aff_id


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


@dataclass(frozen=True)
class Offer:
    id: str
    lifespan_days: int
    allow_multiple: bool
    # Inbound rules (ops/config.py parse_offer): None / empty when not set.
    min_seconds: int | None = None
    max_seconds: int | None = None
    allowed_networks: tuple[str, ...] = ()
    caps: Caps = field(default_factory=Caps)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Offer:
        return cls(row["id"], int(row["lifespan_days"]), bool(row["allow_multiple"]),
                   min_seconds=row.get("min_click_seconds"),
                   max_seconds=row.get("max_click_seconds"),
                   allowed_networks=_split(row.get("allowed_ips")),
                   caps=Caps(row.get("daily_cap"), row.get("daily_payout_cap"),
                             row.get("affiliate_daily_cap"),
                             row.get("affiliate_daily_payout_cap")))


class Catalog:
    """Offers and partners, reloaded from the store at most every `ttl` seconds."""

    def __init__(self, store: Store, ttl: float, monotonic: Callable[[], float] = time.monotonic):
        self.store = store
        self.ttl = ttl
        self._monotonic = monotonic
        self._loaded_at = float("-inf")
        self.offers: dict[str, Offer] = {}
        self.partners: dict[str, Partner] = {}

    def refresh(self, force: bool = False) -> None:
        now = self._monotonic()
        if not force and now - self._loaded_at < self.ttl:
            return
        self.offers = {r["id"]: Offer.from_row(r) for r in self.store.list_offers()}
        self.partners = {r["id"]: Partner.from_row(r) for r in self.store.list_partners()}
        self._loaded_at = now

    def offer(self, offer_id: str | None) -> Offer | None:
        if offer_id is None:
            return None
        self.refresh()
        if offer_id not in self.offers:
            self.refresh(force=True)
        return self.offers.get(offer_id)

    def destinations(self, offer_id: str, aff_id: str) -> list[Partner]:
        self.refresh()
        found = [p for p in self.partners.values() if p.serves(offer_id, aff_id)]
        if not found:
            self.refresh(force=True)
            found = [p for p in self.partners.values() if p.serves(offer_id, aff_id)]
        return found

    def partner(self, partner_id: str) -> Partner | None:
        self.refresh()
        return self.partners.get(partner_id)
