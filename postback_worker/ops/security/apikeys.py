"""API keys: created and revoked by operators, stored as SHA-256 hashes, checked per request.

A key looks like `pbw_<id>_<secret>`; only its hash is stored, the key is shown once. Scopes:
`ingest` (POST /v1/clicks, POST /v1/conversions, GET /postback) and `admin` (everything,
ingest included).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from postback_worker.errors import InvalidInput
from postback_worker.store import schema as t

SCOPES = ("ingest", "admin")
PREFIX = "pbw_"


class ApiKeyError(InvalidInput):
    """Bad input for key management (unknown scope, bad name)."""


def hash_key(key: str) -> str:
    """SHA-256 hex of a key (keys are 256-bit random, so a plain hash is enough)."""
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def parse_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted({s.strip() for s in scopes if s.strip()})
    bad = [s for s in chosen if s not in SCOPES]
    if bad or not chosen:
        got = ", ".join(bad) or "none"
        raise ApiKeyError(f"scopes must be among {', '.join(SCOPES)}; got {got}")
    return chosen


def create_key(engine: Engine, name: str, scopes: Iterable[str], now: datetime) -> tuple[str, str]:
    """Store a new key; returns (key id, the key itself, shown only now)."""
    name = name.strip()
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise ApiKeyError("name must be 1 to 200 printable characters")
    chosen = parse_scopes(scopes)
    key_id = "key_" + secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    with engine.begin() as conn:
        conn.execute(insert(t.api_keys).values(
            id=key_id, name=name, key_hash=hash_key(key), scopes=",".join(chosen),
            created_at=now, last_used_at=None, revoked_at=None))
    return key_id, key


def list_keys(engine: Engine) -> list[dict[str, Any]]:
    """Every key without its hash."""
    cols = [c for c in t.api_keys.c if c.name != "key_hash"]
    with engine.connect() as conn:
        rows = conn.execute(select(*cols).order_by(t.api_keys.c.created_at)).mappings().all()
    return [dict(r) for r in rows]


def revoke_key(engine: Engine, key_id: str, now: datetime) -> bool:
    """Revoke a key; False when there is no such active key."""
    with engine.begin() as conn:
        result = conn.execute(update(t.api_keys).where(
            t.api_keys.c.id == key_id, t.api_keys.c.revoked_at.is_(None)).values(revoked_at=now))
    return bool(result.rowcount)


@dataclass(frozen=True)
class Principal:
    """Who made a request: a key id (or "bootstrap-admin") and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class KeyChecker:
    """Look keys up by hash, caching answers (positive and negative) for `ttl` seconds."""

    def __init__(self, engine: Engine, ttl: float,
                 clock: Callable[[], datetime] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.ttl = ttl
        self.clock = clock
        self.monotonic = monotonic
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> Principal | None:
        if not key.startswith(PREFIX) or len(key) > 200:
            return None
        digest = hash_key(key)
        now = self.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        principal = self._load(digest)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal

    def _load(self, digest: str) -> Principal | None:
        k = t.api_keys.c
        with self.engine.begin() as conn:
            row = conn.execute(select(k.id, k.scopes).where(
                k.key_hash == digest, k.revoked_at.is_(None))).first()
            if row is None:
                return None
            if self.clock is not None:
                conn.execute(update(t.api_keys).where(k.id == row.id)
                             .values(last_used_at=self.clock()))
        return Principal(row.id, frozenset(row.scopes.split(",")))
