"""Request signing per partner: our HMAC scheme (v1) or Standard Webhooks.

The sender signs each request itself, from what it sends (see `Sender`); this module only
knows keys and how a payload becomes signature headers. Both schemes sign
"{postback_id}.{timestamp}.{payload}", where `payload` is the request body, or for a request
without a body the request target as sent (path and query string).

HMAC (scheme "hmac", the default):

    X-Postback-Timestamp: 1795725000
    X-Postback-Signature: v1=<hex>[,v1=<hex>]

hex HMAC-SHA256 keyed with the secret's text. Standard Webhooks (scheme "standard",
https://www.standardwebhooks.com):

    webhook-id: <postback id>
    webhook-timestamp: 1795725000
    webhook-signature: v1,<base64>[ v1,<base64>]

base64 HMAC-SHA256 keyed with the base64-decoded part of a `whsec_...` secret. While a
rotated-out secret is in its grace period, a second signature made with it is sent too, so
the partner can switch secrets at any moment of that period. See docs/signing.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

TIMESTAMP_HEADER = "X-Postback-Timestamp"
DEFAULT_SIGNATURE_HEADER = "X-Postback-Signature"
SCHEME = "v1"
HMAC = "hmac"
STANDARD = "standard"
SCHEMES = (HMAC, STANDARD)
STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
STANDARD_PREFIX = "whsec_"


@dataclass(frozen=True, repr=False)
class SigningKeys:
    """A partner's signing secrets and scheme; repr never shows the secrets."""

    secret: str
    header: str = DEFAULT_SIGNATURE_HEADER
    previous: str | None = None
    previous_until: datetime | None = None
    scheme: str = HMAC

    def __repr__(self) -> str:
        return (f"SigningKeys(scheme={self.scheme!r}, header={self.header!r}, "
                f"rotating={self.previous is not None})")

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SigningKeys | None:
        """Keys from a partners row, or None when the partner does not sign."""
        secret = row.get("hmac_secret")
        if not secret:
            return None
        return cls(secret=secret, header=row.get("signature_header") or DEFAULT_SIGNATURE_HEADER,
                   previous=row.get("hmac_secret_previous") or None,
                   previous_until=row.get("hmac_previous_until"),
                   scheme=row.get("signature_scheme") or HMAC)

    def active(self, now: datetime) -> list[str]:
        """Secrets that sign at `now`: the current one, then the previous during its grace."""
        keys = [self.secret]
        if self.previous and self.previous_until is not None and now < self.previous_until:
            keys.append(self.previous)
        return keys


def new_secret(scheme: str = HMAC) -> str:
    """A fresh random secret (256 bits): URL-safe text, or `whsec_<base64>` for Standard
    Webhooks."""
    if scheme == STANDARD:
        return STANDARD_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
    return secrets.token_urlsafe(32)


def signature(secret: str, postback_id: str, timestamp: int, payload: str) -> str:
    """Hex HMAC-SHA256 of "{postback_id}.{timestamp}.{payload}" (the v1 HMAC scheme)."""
    message = f"{postback_id}.{timestamp}.{payload}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def standard_key(secret: str) -> bytes:
    """The key bytes of a Standard Webhooks secret (`whsec_` + base64)."""
    raw = secret.removeprefix(STANDARD_PREFIX)
    try:
        return base64.b64decode(raw + "==")
    except (binascii.Error, ValueError):
        return secret.encode()


def standard_signature(secret: str, msg_id: str, timestamp: int, payload: str) -> str:
    """One Standard Webhooks signature: "v1," + base64 HMAC-SHA256."""
    message = f"{msg_id}.{timestamp}.{payload}".encode()
    digest = hmac.new(standard_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def request_headers(keys: SigningKeys, postback_id: str, payload: str,
                    now: datetime) -> dict[str, str]:
    """The signing headers of one request whose signed payload is `payload`."""
    timestamp = int(now.timestamp())
    active = keys.active(now)
    if keys.scheme == STANDARD:
        return {
            "webhook-id": postback_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(
                standard_signature(k, postback_id, timestamp, payload) for k in active),
        }
    sigs = ",".join(f"{SCHEME}={signature(k, postback_id, timestamp, payload)}" for k in active)
    return {TIMESTAMP_HEADER: str(timestamp), keys.header: sigs}


def rotation(row: Mapping[str, Any], now: datetime, grace: timedelta,
             secret: str | None = None, scheme: str = HMAC) -> dict[str, Any]:
    """Column changes that make `secret` (new if None) current and keep the old one in grace."""
    changes: dict[str, Any] = {"hmac_secret": secret or new_secret(scheme)}
    if row.get("hmac_secret"):
        changes["hmac_secret_previous"] = row["hmac_secret"]
        changes["hmac_previous_until"] = now + grace
    return changes


def verify(secrets_: list[str], postback_id: str, timestamp: str, payload: str,
           header_value: str, now: datetime, tolerance: float = 300.0) -> bool:
    """Partner-side check (reference): a fresh timestamp and one matching v1 signature."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(now.timestamp() - ts) > tolerance:
        return False
    given = [p.split("=", 1)[1] for p in header_value.split(",") if p.startswith(f"{SCHEME}=")]
    expected = [signature(s, postback_id, ts, payload) for s in secrets_]
    return any(hmac.compare_digest(g, e) for g in given for e in expected)
