"""One conversion with its attribution, postbacks and every attempt (API and CLI `show`)."""

from __future__ import annotations

from typing import Any

from postback_worker.domain.masking import mask_url
from postback_worker.store.repo import Store


def conversion_detail(store: Store, conversion_id: str) -> dict[str, Any] | None:
    conv = store.get_conversion(conversion_id)
    if conv is None:
        return None
    postbacks = store.postbacks_for(conversion_id)
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
    return {"conversion": conv, "postbacks": out_postbacks}
