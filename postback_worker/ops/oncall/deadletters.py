"""Dead letters: filter, list, count, show and purge (shared by the CLI and the API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from postback_worker.domain.deadletters import FAILURE_CLASSES, Cursor, Filter, parse_time
from postback_worker.domain.masking import load_headers, mask_body, mask_headers, mask_url
from postback_worker.store.figures import figures_for
from postback_worker.store.repo import Store

__all__ = ["COLUMNS", "FAILURE_CLASSES", "Cursor", "Filter", "list_dead_letters", "next_after",
           "parse_time", "purge", "show", "stats"]

COLUMNS = ["postback_id", "partner_id", "offer_id", "failure_class", "last_status", "attempts",
           "created_at", "replay_count", "conversion_id", "url", "reason"]


def list_dead_letters(store: Store, filt: Filter, *, limit: int = 50, offset: int = 0,
                      after: Cursor | None = None) -> tuple[list[dict[str, Any]], int]:
    """A page of dead letters (newest first) and the total matching (from rollups where the
    database keeps them)."""
    rows = store.dead_letter_page(filt, limit=limit, offset=offset, after=after)
    for r in rows:
        r["url"] = mask_url(r["url"])
    return rows, figures_for(store).dead_letter_total(filt)


def next_after(rows: list[dict[str, Any]], limit: int) -> str | None:
    """The cursor of the page after `rows` (None when this page is the last)."""
    if len(rows) < limit or not rows:
        return None
    last = rows[-1]
    return Cursor(last["created_at"], last["postback_id"]).encode()


def _ranked(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def stats(store: Store, filt: Filter) -> dict[str, Any]:
    """Counts by failure class, by partner, by (partner, class) and by last status."""
    by_class: dict[str, int] = {}
    by_partner: dict[str, int] = {}
    by_status: dict[str, int] = {}
    pairs: dict[tuple[str, str], int] = {}
    for partner_id, failure_class, status, n in store.dead_letter_counts(filt):
        by_class[failure_class] = by_class.get(failure_class, 0) + n
        by_partner[partner_id] = by_partner.get(partner_id, 0) + n
        key = "none" if status is None else str(status)
        by_status[key] = by_status.get(key, 0) + n
        pairs[(partner_id, failure_class)] = pairs.get((partner_id, failure_class), 0) + n
    return {
        "total": sum(by_class.values()),
        "by_class": _ranked(by_class),
        "by_partner": _ranked(by_partner),
        "by_status": _ranked(by_status),
        "by_partner_and_class": [
            {"partner_id": p, "failure_class": c, "count": n}
            for (p, c), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    }


def show(store: Store, postback_id: str) -> dict[str, Any] | None:
    """One postback with its dead letter (if any) and every attempt; URLs and bodies masked,
    the partner's custom headers by name only."""
    pb, dead = store.postback_with_dead_letter(postback_id)
    if pb is None:
        return None
    postback = {k: v for k, v in pb.items() if k not in {"lease_token"}}
    postback["url"] = mask_url(pb["url"])
    partner = store.get_partner(pb["partner_id"]) or {}
    body_format = partner.get("body_format") or ("form" if pb["method"] == "POST" else None)
    postback["body"] = mask_body(pb.get("body"), body_format)
    postback["body_format"] = body_format if pb.get("body") else None
    postback["headers"] = mask_headers(load_headers(partner.get("custom_headers")))
    postback["signature_scheme"] = (partner.get("signature_scheme") or "hmac"
                                    if partner.get("hmac_secret") else None)
    attempts = [{k: v for k, v in a.items() if k != "postback_id"}
                for a in store.attempts_for([postback_id])]
    return {"postback": postback, "dead_letter": dead, "attempts": attempts}


def purge(store: Store, filt: Filter, who: str, now: datetime) -> int:
    """Delete matching dead letters (their postbacks stay dead_lettered, marked purged)."""
    return store.purge_dead_letters(filt, who, now)
