"""API keys at rest: only their SHA-256 hashes are stored."""

from __future__ import annotations

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
