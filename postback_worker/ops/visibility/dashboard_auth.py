"""Browser access to the dashboard without putting the admin token in a URL.

A browser cannot send `Authorization: Bearer`, so an admin asks for a short-lived signed link
(`postback-worker dashboard link`, or POST /v1/dashboard/link with the admin credential).
Opening it sets an HttpOnly, SameSite=Strict session cookie, signed the same way, that the
read-only visibility pages (dashboard, reports, alerts) accept. The key is
`dashboard_secret`, or the admin token when that is empty; with neither, no link is issued.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from urllib.parse import urlencode

from postback_worker.errors import InvalidInput
from postback_worker.settings import Settings

LINK_SECONDS = 600
SESSION_SECONDS = 12 * 3600
COOKIE = "pbw_dashboard"


class NoSigningKey(InvalidInput):
    """Neither dashboard_secret nor admin_token is set."""


def signing_key(settings: Settings) -> bytes:
    key = settings.security.dashboard_secret or settings.security.admin_token
    if not key:
        raise NoSigningKey("set POSTBACK_DASHBOARD_SECRET (or POSTBACK_ADMIN_TOKEN) to issue "
                           "dashboard links")
    return key.encode()


def _sign(key: bytes, purpose: str, expires: int) -> str:
    mac = hmac.new(key, f"{purpose}|{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def make_token(settings: Settings, purpose: str, now: datetime, seconds: int) -> str:
    """`purpose` is "link" or "session"; the token expires `seconds` after `now`."""
    return _sign(signing_key(settings), purpose, int(now.timestamp()) + seconds)


def check_token(settings: Settings, purpose: str, token: str, now: datetime) -> bool:
    try:
        key = signing_key(settings)
    except NoSigningKey:
        return False
    expires_text, _, _ = token.partition(".")
    if not expires_text.isdigit() or int(expires_text) < now.timestamp():
        return False
    return hmac.compare_digest(_sign(key, purpose, int(expires_text)), token)


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a local path only (no open redirect)."""
    if path and path.startswith("/") and not path.startswith("//") and "\\" not in path:
        return path
    return "/dashboard"


def dashboard_link(settings: Settings, base_url: str, now: datetime,
                   next_path: str | None = None) -> str:
    """A sign-in link valid LINK_SECONDS; `next_path` (e.g. /dashboard?since=7d) follows."""
    token = make_token(settings, "link", now, LINK_SECONDS)
    query = {"t": token}
    if next_path:
        query["next"] = safe_next(next_path)
    return f"{base_url.rstrip('/')}/dashboard/session?{urlencode(query)}"
