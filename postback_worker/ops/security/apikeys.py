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

from postback_worker.errors import InvalidInput
from postback_worker.store import credentials
from postback_worker.store.repo import Store

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


def create_key(store: Store, name: str, scopes: Iterable[str], now: datetime) -> tuple[str, str]:
    """Store a new key; returns (key id, the key itself, shown only now)."""
    name = name.strip()
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise ApiKeyError("name must be 1 to 200 printable characters")
    chosen = parse_scopes(scopes)
    key_id = "key_" + secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    credentials.insert_api_key(store, key_id=key_id, name=name, key_hash=hash_key(key),
                               scopes=",".join(chosen), now=now)
    return key_id, key


def list_keys(store: Store) -> list[dict[str, Any]]:
    """Every key without its hash."""
    return credentials.list_api_keys(store)


def revoke_key(store: Store, key_id: str, now: datetime) -> bool:
    """Revoke a key; False when there is no such active key."""
    return credentials.revoke_api_key(store, key_id, now)


@dataclass(frozen=True)
class Principal:
    """Who made a request: a key id (or "bootstrap-admin") and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class KeyChecker:
    """Look keys up by hash, caching answers (positive and negative) for `ttl` seconds."""

    def __init__(self, store: Store, ttl: float,
                 clock: Callable[[], datetime] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
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
        found = credentials.active_api_key(self.store, digest,
                                           self.clock() if self.clock is not None else None)
        if found is None:
            return None
        key_id, scopes = found
        return Principal(key_id, frozenset(scopes.split(",")))
