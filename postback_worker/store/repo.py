"""The store: one object over one engine, its methods grouped in one module per aggregate.

- store/conversions.py  clicks, conversions, dedupe keys (intake), re-attribution
- store/postbacks.py    every write to postbacks, attempts and dead letters
- store/deadletters.py  dead-letter reads for on-call
- store/partners.py     partner health counts, pause and limits, support-bundle evidence
- store/runs.py         replay and re-attribution runs
- store/lifecycle.py    conversion event history, holds and ordering of postbacks
- store/events.py       operator events: the outbox and its webhook deliveries
- here                  offers and partners (configuration, with its history), click retention
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Table, delete, func, insert, select

from postback_worker.domain.masking import load_headers, mask_body, mask_headers, mask_url
from postback_worker.store import schema as t
from postback_worker.store.conversions import ConversionRecords
from postback_worker.store.db import current_revision
from postback_worker.store.deadletters import DeadLetterReads
from postback_worker.store.events import EventRecords
from postback_worker.store.lifecycle import LifecycleReads
from postback_worker.store.partners import PartnerRecords
from postback_worker.store.postbacks import PostbackRecords
from postback_worker.store.runs import RunRecords


class Store(ConversionRecords, PostbackRecords, DeadLetterReads, PartnerRecords, RunRecords,
            EventRecords, LifecycleReads):
    """Data access over one engine; methods that take `conn` batch in the caller's
    transaction."""

    # -- offers and partners --------------------------------------------------------------

    def upsert_row(self, table: Table, row: Mapping[str, Any],
                   changed_by: str | None = None) -> None:
        """Insert or update an offer or partner by id (created_at kept); keep a redacted
        snapshot of the saved version in config_history."""
        with self.engine.begin() as conn:
            stmt = self._insert(table).values(**row)
            changes = {k: stmt.excluded[k] for k in row if k not in {"id", "created_at"}}
            conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=changes))
            saved = conn.execute(select(table).where(table.c.id == row["id"])).mappings().one()
            conn.execute(insert(t.config_history).values(
                kind=table.name.rstrip("s"), object_id=row["id"],
                changed_at=saved["updated_at"], changed_by=changed_by,
                snapshot=json.dumps(redacted_config(dict(saved)), default=str, sort_keys=True),
            ))

    def config_history(self, kind: str, object_id: str) -> list[dict[str, Any]]:
        h = t.config_history.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.config_history).where(h.kind == kind, h.object_id == object_id)
                .order_by(h.changed_at, h.id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def get_row(self, table: Table, row_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == row_id)).mappings().first()
        return None if row is None else dict(row)

    def list_rows(self, table: Table) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(table).order_by(table.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def upsert_offer(self, row: Mapping[str, Any]) -> None:
        self.upsert_row(t.offers, row)

    def upsert_partner(self, row: Mapping[str, Any]) -> None:
        self.upsert_row(t.partners, row)

    def get_offer(self, offer_id: str) -> dict[str, Any] | None:
        return self.get_row(t.offers, offer_id)

    def get_partner(self, partner_id: str) -> dict[str, Any] | None:
        return self.get_row(t.partners, partner_id)

    def list_offers(self) -> list[dict[str, Any]]:
        return self.list_rows(t.offers)

    def list_partners(self) -> list[dict[str, Any]]:
        return self.list_rows(t.partners)

    def set_offer_fields(self, offer_id: str, **values: Any) -> bool:
        """Update some columns of one offer; False when there is no such offer."""
        return self.update_by_id(t.offers, offer_id, values)

    def offer_token_hash(self, offer_id: str | None,
                         transaction_id: str | None) -> tuple[str | None, str | None]:
        """(offer id, its security token hash): the offer named, or the offer of the click
        named by `transaction_id`; (None, None) when neither is known."""
        with self.engine.connect() as conn:
            if not offer_id and transaction_id:
                offer_id = conn.execute(select(t.clicks.c.offer_id).where(
                    t.clicks.c.transaction_id == transaction_id[:64])).scalar()
            if not offer_id:
                return None, None
            stored = conn.execute(select(t.offers.c.security_token_hash).where(
                t.offers.c.id == offer_id[:64])).scalar()
        return offer_id, stored

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None: not migrated)."""
        return current_revision(self.engine)

    # -- retention ------------------------------------------------------------------------

    def longest_lifespan(self) -> int | None:
        """The longest click session lifespan of any offer, in days (None: no offers)."""
        with self.engine.connect() as conn:
            longest = conn.execute(select(func.max(t.offers.c.lifespan_days))).scalar()
        return None if longest is None else int(longest)

    def purge_clicks(self, cutoff: datetime, size: int) -> int:
        """Retention: delete up to `size` clicks made before `cutoff` (one short batch)."""
        c = t.clicks.c
        with self.short_transaction() as conn:
            ids = [r[0] for r in conn.execute(self.pick(c.transaction_id, c.clicked_at < cutoff,
                                                        size))]
            if ids:
                conn.execute(delete(t.clicks).where(c.transaction_id.in_(ids)))
        return len(ids)


# Never stored in history snapshots, exports or bundles.
SECRET_COLUMNS = frozenset({"hmac_secret", "hmac_secret_previous", "security_token_hash"})
# Shown as names with masked values.
HEADER_COLUMNS = frozenset({"custom_headers"})


def redacted_config(row: Mapping[str, Any]) -> dict[str, Any]:
    """An offer or partner row with secrets replaced and URL tokens masked."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in SECRET_COLUMNS:
            out[key] = "(set, not shown)" if value else None
        elif key in HEADER_COLUMNS:
            out[key] = mask_headers(load_headers(value)) if value else None
        elif key == "body_template" and value:
            out[key] = mask_body(value, row.get("body_format"))
        elif isinstance(value, str) and key.endswith("url"):
            out[key] = mask_url(value)
        elif isinstance(value, str) and key == "templates":  # per-event URL templates
            out[key] = json.dumps({k: mask_url(str(v)) for k, v in json.loads(value).items()},
                                  sort_keys=True)
        else:
            out[key] = value
    return out
