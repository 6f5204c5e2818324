"""Time-ordered, URL-safe identifiers (ULID-like, Crockford base32)."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_BITS = 48
_RAND_BYTES = 10  # 80 bits


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str, *, now_ms: int | None = None, rand: bytes | None = None) -> str:
    """Return ``prefix_`` + 10 chars of ms timestamp + 16 chars of randomness (sortable by time)."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if not 0 <= ms < 1 << _TIME_BITS:
        raise ValueError("now_ms must fit in 48 bits")
    if rand is None:
        rand = secrets.token_bytes(_RAND_BYTES)
    if len(rand) != _RAND_BYTES:
        raise ValueError(f"rand must be {_RAND_BYTES} bytes")
    return f"{prefix}_{_b32(ms, 10)}{_b32(int.from_bytes(rand, 'big'), 16)}"
