"""An explicit update of a known conversion by its id (API and CLI): a new advertiser event for
the same offer, transaction and goal, accepted through the same path as any conversion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from postback_worker.domain.events import FieldError, ValidationError
from postback_worker.errors import NotFound
from postback_worker.store.repo import Store

UPDATE_FIELDS = ("status", "payout", "sale_amount", "currency", "occurred_at", "id")
UPDATE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "status": {"type": "string", "pattern": "^[A-Za-z_]{1,32}$"},
        "payout": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string"}]},
        "sale_amount": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string"}]},
        "currency": {"type": "string", "pattern": "^[A-Za-z]{3}$"},
        "occurred_at": {"anyOf": [{"type": "string", "format": "date-time"},
                                  {"type": "number"}]},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$",
               "description": "your idempotency key for this update; default: a new id"},
    },
    "description": "the new status and/or amounts; amounts not sent keep their values",
}


def update_event(store: Store, conversion_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """The conversion event that updates `conversion_id` with `changes` (to be validated and
    accepted like any event). Raises NotFound, or ValidationError naming the bad field."""
    errors = [FieldError(k, "unknown field") for k in changes if k not in UPDATE_FIELDS]
    if not any(changes.get(k) not in (None, "") for k in ("status", "payout", "sale_amount",
                                                           "currency")):
        errors.append(FieldError("status", "give a new status or amounts (payout, "
                                           "sale_amount, currency)"))
    if errors:
        raise ValidationError(errors)
    conv = store.get_conversion(conversion_id)
    if conv is not None and conv.get("update_of"):
        conv = store.get_conversion(conv["update_of"])
    if conv is None or conv["state"] == "test":
        raise NotFound(f"no conversion {conversion_id!r}")
    event = {"transaction_id": conv["transaction_id"], "offer_id": conv["offer_id"],
             "goal_id": conv["goal_id"] or None, "status": conv["status"]}
    event.update({k: v for k, v in changes.items() if v is not None})
    return event
