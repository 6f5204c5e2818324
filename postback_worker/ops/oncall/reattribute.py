"""Re-attribution after an offer's click session lifespan was extended.

Conversions recorded as `expired_click` whose click now falls inside the offer's CURRENT
lifespan go back to `received` (one guarded UPDATE: a conversion is taken by one run only) and
are processed again by a worker: attribution, duplicate check, postbacks, firing. Conversions
with an unknown click are not touched: they stay reported as `unknown_click`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from postback_worker.domain.attribution import (
    ClickFacts,
    ConversionFacts,
    ConversionState,
    OfferFacts,
    attribute,
)
from postback_worker.errors import UnknownOffer
from postback_worker.ops.oncall.replay import TASK_REATTRIBUTE_RUN, Enqueue, record_run
from postback_worker.store.repo import Store
from postback_worker.store.runs import marker

CHUNK = 200


@dataclass
class ReattributionPlan:
    offer_id: str
    lifespan_days: int
    eligible: list[dict[str, Any]] = field(default_factory=list)
    still_expired: int = 0
    unknown_click: int = 0


def plan(store: Store, offer_id: str, since: datetime | None,
         until: datetime | None = None) -> ReattributionPlan:
    """Expired conversions of the offer that its current lifespan now covers."""
    offer = store.get_offer(offer_id)
    if offer is None:
        raise UnknownOffer(offer_id)
    out = ReattributionPlan(offer_id, int(offer["lifespan_days"]))
    facts = OfferFacts(offer_id, out.lifespan_days)
    rows, out.unknown_click, clicks = store.expired_conversions(offer_id, since, until)
    for r in rows:
        click = clicks.get(r["transaction_id"])
        decision = attribute(
            ConversionFacts(r["transaction_id"], r["offer_id"], r["occurred_at"]),
            None if click is None else ClickFacts(click["transaction_id"], click["offer_id"],
                                                  click["aff_id"], click["clicked_at"]),
            facts)
        if decision.state == ConversionState.ATTRIBUTED:
            age = (r["occurred_at"] - click["clicked_at"]).total_seconds() / 86400 if click else 0
            out.eligible.append({"conversion_id": r["id"], "transaction_id": r["transaction_id"],
                                 "aff_id": click["aff_id"] if click else None,
                                 "click_age_days": round(age, 1),
                                 "received_at": r["received_at"]})
        else:
            out.still_expired += 1
    return out


def start(store: Store, offer_id: str, *, since: datetime | None, until: datetime | None,
          who: str, now: datetime, enqueue: Enqueue | None,
          dry_run: bool = False) -> tuple[str, ReattributionPlan, int]:
    """Plan, and unless `dry_run`, hand eligible conversions back for processing.

    Returns (run id, plan, conversions handed back).
    """
    p = plan(store, offer_id, since, until)
    filters = {"offer_id": offer_id, "since": since, "until": until,
               "lifespan_days": p.lifespan_days}
    run_id = record_run(store, kind="reattribute", who=who, filters=filters, dry_run=dry_run,
                        selected=len(p.eligible), now=now, prefix="ra")
    if dry_run or not p.eligible:
        return run_id, p, 0
    taken = store.reopen_expired(
        [e["conversion_id"] for e in p.eligible],
        f"re-attribution run {run_id}: lifespan now {p.lifespan_days} days", now)
    tag = (marker("reattribute", run_id) + who)[:200]
    if enqueue is not None:
        for i in range(0, len(taken), CHUNK):
            enqueue(TASK_REATTRIBUTE_RUN, [run_id, taken[i:i + CHUNK], tag])
    return run_id, p, len(taken)
