"""One conversion with its attribution, its event timeline (each partner's postback per event),
its postbacks and every attempt (API and CLI `show`)."""

from __future__ import annotations

from typing import Any

from postback_worker.domain.masking import mask_url
from postback_worker.store.repo import Store

_TIMELINE_POSTBACK = ("id", "partner_id", "event", "state", "attempts", "reason")


def conversion_detail(store: Store, conversion_id: str) -> dict[str, Any] | None:
    """The conversion; for an event that updated an earlier conversion, that conversion, with
    the event asked for (id, state, reason) in `requested_event`."""
    conv = store.get_conversion(conversion_id)
    if conv is None:
        return None
    requested = None
    if conv.get("update_of"):
        root = store.get_conversion(conv["update_of"])
        if root is not None:
            requested = {k: conv[k] for k in ("id", "state", "reason")}
            conv = root
            conversion_id = root["id"]
    postbacks = sorted(store.postbacks_for(conversion_id),
                       key=lambda p: (p["partner_id"], p["event_seq"]))
    attempts = store.attempts_for([p["id"] for p in postbacks])
    by_postback: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        by_postback.setdefault(a["postback_id"], []).append(a)
    out_postbacks = []
    for p in postbacks:
        item = {k: v for k, v in p.items() if k not in {"lease_token"}}
        item["url"] = mask_url(p["url"])
        item["attempts_log"] = [
            {k: v for k, v in a.items() if k != "postback_id"}
            for a in by_postback.get(p["id"], [])
        ]
        out_postbacks.append(item)
    events = store.conversion_timeline(conversion_id)
    if not events:  # stored before conversions had a history
        events = [{"seq": 1, "kind": "created", "summary": f"created {conv['status']}",
                   "event_id": conv["id"], "status": conv["status"], "previous_status": None,
                   "payout": conv["payout"], "sale_amount": conv["sale_amount"],
                   "currency": conv["currency"], "occurred_at": conv["occurred_at"],
                   "received_at": conv["received_at"]}]
    for e in events:
        e.pop("id", None)
        e["postbacks"] = [{k: p[k] for k in _TIMELINE_POSTBACK} for p in out_postbacks
                          if p["event_seq"] == e["seq"]]
    return {"conversion": conv, "requested_event": requested, "events": events,
            "postbacks": out_postbacks}
