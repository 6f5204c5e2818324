"""Time-ordered, URL-safe identifiers (ULID-like, Crockford base32)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_BITS = 48
_RAND_BYTES = 10  # 80 bits
# Two digits (10 bits) at a time: 13 lookups for the 26 digits of time (50) + randomness (80).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_SHIFTS = tuple(range(120, -1, -10))


def new_id(prefix: str, *, now_ms: int | None = None, rand: bytes | None = None) -> str:
    """Return ``prefix_`` + 10 chars of ms timestamp + 16 chars of randomness (sortable by time)."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if not 0 <= ms < 1 << _TIME_BITS:
        raise ValueError("now_ms must fit in 48 bits")
    if rand is None:
        rand = os.urandom(_RAND_BYTES)
    if len(rand) != _RAND_BYTES:
        raise ValueError(f"rand must be {_RAND_BYTES} bytes")
    value = ms << 80 | int.from_bytes(rand, "big")
    pairs = _PAIRS
    return prefix + "_" + "".join([pairs[value >> s & 1023] for s in _SHIFTS])
