"""Pure helpers shared by metrics, reports, alerts and the dashboard (the SQL is in
store/figures.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from postback_worker.domain.attribution import ConversionState
from postback_worker.store.figures import FAILED_POSTBACK, RawFigures, utc

__all__ = ["FAILED_POSTBACK", "LOST_STATES", "bucket_quantile", "lost_window", "nearest_rank",
           "rate", "utc"]

LOST_STATES = (ConversionState.EXPIRED_CLICK, ConversionState.UNKNOWN_CLICK)
# Refused by an offer's inbound rules.
INBOUND_STATES = (ConversionState.TOO_SOON, ConversionState.TOO_LATE, ConversionState.CAPPED,
                  ConversionState.IP_NOT_ALLOWED)


def rate(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def nearest_rank(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-quantile by the nearest-rank method (the same as PostgreSQL percentile_disc)."""
    if not sorted_values:
        return None
    index = max(1, math.ceil(q * len(sorted_values))) - 1
    return sorted_values[index]


def bucket_quantile(counts: Iterable[tuple[float, int]], q: float) -> float | None:
    """The q-quantile by nearest rank over a histogram of (bucket upper bound, count): the
    bucket holding the value nearest_rank would pick."""
    ordered = sorted((b, n) for b, n in counts if n > 0)
    total = sum(n for _, n in ordered)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bound, n in ordered:
        seen += n
        if seen >= rank:
            return bound
    return ordered[-1][0]


def lost_window(figures: RawFigures, since: datetime, until: datetime,
                offer_id: str | None = None) -> list[dict[str, Any]]:
    """Per offer: conversions received in [since, until), those lost (expired/unknown), and
    those refused by the offer's inbound rules (too soon, too late, capped, advertiser IP)."""
    per: dict[str | None, dict[str, int]] = {}
    for (offer, state), n in figures.lost_counts(since, until, offer_id).items():
        row = per.setdefault(offer, {"conversions": 0, "expired_click": 0, "unknown_click": 0,
                                     **{s: 0 for s in INBOUND_STATES}})
        row["conversions"] += n
        if state in LOST_STATES or state in INBOUND_STATES:
            row[state] += n
    out: list[dict[str, Any]] = []
    for offer, row in per.items():
        lost = row["expired_click"] + row["unknown_click"]
        out.append({"offer_id": offer, **row, "lost": lost,
                    "lost_rate": rate(lost, row["conversions"]),
                    "refused": sum(row[s] for s in INBOUND_STATES)})
    out.sort(key=lambda r: (-r["lost"], r["offer_id"] or ""))
    return out
