"""Optional per-partner HMAC-SHA256 request signing, with secret rotation.

Each signed request carries two headers:

    X-Postback-Timestamp: 1795725000
    X-Postback-Signature: v1=<hex>[,v1=<hex>]

The signature is HMAC-SHA256(secret, "{postback_id}.{timestamp}.{payload}") in hex, where
`payload` is the request target exactly as sent (path and query string) for GET, and the
request body for POST. The postback id is also sent as `X-Postback-Id`. While a rotated-out
secret is in its grace period, a second `v1=` signature made with it is sent too, so the
partner can switch secrets at any moment of that period. See docs/signing.md.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from postback_worker.delivery.sender import InvalidURL, PostbackRequest, wire_payload

TIMESTAMP_HEADER = "X-Postback-Timestamp"
DEFAULT_SIGNATURE_HEADER = "X-Postback-Signature"
SCHEME = "v1"


@dataclass(frozen=True, repr=False)
class SigningKeys:
    """A partner's signing secrets; repr never shows them."""

    secret: str
    header: str = DEFAULT_SIGNATURE_HEADER
    previous: str | None = None
    previous_until: datetime | None = None

    def __repr__(self) -> str:
        return f"SigningKeys(header={self.header!r}, rotating={self.previous is not None})"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SigningKeys | None:
        """Keys from a partners row, or None when the partner does not sign."""
        secret = row.get("hmac_secret")
        if not secret:
            return None
        return cls(secret=secret, header=row.get("signature_header") or DEFAULT_SIGNATURE_HEADER,
                   previous=row.get("hmac_secret_previous") or None,
                   previous_until=row.get("hmac_previous_until"))

    def active(self, now: datetime) -> list[str]:
        """Secrets that sign at `now`: the current one, then the previous during its grace."""
        keys = [self.secret]
        if self.previous and self.previous_until is not None and now < self.previous_until:
            keys.append(self.previous)
        return keys


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def signature(secret: str, postback_id: str, timestamp: int, payload: str) -> str:
    """Hex HMAC-SHA256 of "{postback_id}.{timestamp}.{payload}"."""
    message = f"{postback_id}.{timestamp}.{payload}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign_headers(keys: SigningKeys, postback_id: str, url: str, method: str,
                 now: datetime) -> dict[str, str]:
    """The signing headers for one request."""
    timestamp = int(now.timestamp())
    payload = wire_payload(PostbackRequest(postback_id=postback_id, url=url, method=method))
    sigs = ",".join(f"{SCHEME}={signature(k, postback_id, timestamp, payload)}"
                    for k in keys.active(now))
    return {TIMESTAMP_HEADER: str(timestamp), keys.header: sigs}


def headers_for(partner: Any, postback_id: str, url: str, now: datetime,
                method: str | None = None) -> dict[str, str]:
    """Signing headers for `partner` (a catalog Partner with `signing`), or {} if unsigned."""
    keys: SigningKeys | None = getattr(partner, "signing", None)
    if keys is None:
        return {}
    try:
        chosen = method or str(getattr(partner, "method", "GET"))
        return sign_headers(keys, postback_id, url, chosen, now)
    except InvalidURL:
        return {}  # the send itself fails and is classed config


def rotation(row: Mapping[str, Any], now: datetime, grace: timedelta,
             secret: str | None = None) -> dict[str, Any]:
    """Column changes that make `secret` (new if None) current and keep the old one in grace."""
    changes: dict[str, Any] = {"hmac_secret": secret or new_secret()}
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
