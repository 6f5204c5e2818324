"""Credentials at rest: API key hashes, offers' advertiser token hashes, partners' signing
secrets. Only hashes of keys and tokens are stored."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update

from postback_worker.store import schema as t
from postback_worker.store.repo import Store


def insert_api_key(store: Store, *, key_id: str, name: str, key_hash: str, scopes: str,
                   now: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(insert(t.api_keys).values(
            id=key_id, name=name, key_hash=key_hash, scopes=scopes, created_at=now,
            last_used_at=None, revoked_at=None))


def list_api_keys(store: Store) -> list[dict[str, Any]]:
    """Every key without its hash, oldest first."""
    cols = [c for c in t.api_keys.c if c.name != "key_hash"]
    with store.engine.connect() as conn:
        rows = conn.execute(select(*cols).order_by(t.api_keys.c.created_at)).mappings().all()
    return [dict(r) for r in rows]


def revoke_api_key(store: Store, key_id: str, now: datetime) -> bool:
    """False when there is no such active key."""
    with store.engine.begin() as conn:
        result = conn.execute(update(t.api_keys).where(
            t.api_keys.c.id == key_id, t.api_keys.c.revoked_at.is_(None)).values(revoked_at=now))
    return bool(result.rowcount)


def active_api_key(store: Store, key_hash: str, used_at: datetime | None) -> tuple[str, str] | None:
    """(key id, scopes) of the active key with this hash, marking it used; None if none."""
    k = t.api_keys.c
    with store.engine.begin() as conn:
        row = conn.execute(select(k.id, k.scopes).where(
            k.key_hash == key_hash, k.revoked_at.is_(None))).first()
        if row is None:
            return None
        if used_at is not None:
            conn.execute(update(t.api_keys).where(k.id == row.id).values(last_used_at=used_at))
    return str(row.id), str(row.scopes)


def set_offer_token_hash(store: Store, offer_id: str, token_hash: str, now: datetime) -> bool:
    """False when there is no such offer."""
    with store.engine.begin() as conn:
        result = conn.execute(update(t.offers).where(t.offers.c.id == offer_id)
                              .values(security_token_hash=token_hash, updated_at=now))
    return bool(result.rowcount)


def offer_token_hash(store: Store, params: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(offer id, its token hash) for `offer_id`, or the offer of the click named by
    `transaction_id`; (None, None) when neither names one."""
    offer_id = params.get("offer_id")
    with store.engine.connect() as conn:
        if not offer_id and params.get("transaction_id"):
            offer_id = conn.execute(select(t.clicks.c.offer_id).where(
                t.clicks.c.transaction_id == params["transaction_id"][:64])).scalar()
        if not offer_id:
            return None, None
        stored = conn.execute(select(t.offers.c.security_token_hash).where(
            t.offers.c.id == offer_id[:64])).scalar()
    return offer_id, stored


def update_partner_signing(store: Store, partner_id: str, changes: Mapping[str, Any]) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(t.partners).where(t.partners.c.id == partner_id).values(**changes))
