"""Hide secrets in URLs, request bodies and headers before they are logged, stored in
attempts, shown or exported."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit

SECRET_PARAM = re.compile(
    r"(token|secret|password|passwd|pwd|api[_-]?key|apikey|key|sig|signature|auth|hash)",
    re.IGNORECASE,
)
MASK = "***"
# Every name SECRET_PARAM matches contains one of these (in ASCII, lowercased): a URL with none
# of them anywhere has no secret-looking name (a plain substring test is ~15x cheaper).
_SECRET_PARTS = ("token", "secret", "password", "passwd", "pwd", "key", "sig", "auth", "hash")


def mask_url(url: str) -> str:
    """Mask userinfo passwords and the values of query parameters that look secret."""
    if "@" not in url and url.isascii() and not _may_hold_secret(url.lower()):
        return url  # no userinfo and no secret-looking name anywhere: nothing to mask
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
    query = "&".join(_mask_pair(p) for p in parts.query.split("&")) if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return url
    return SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment).geturl()


def _may_hold_secret(lowered: str) -> bool:
    return any(part in lowered for part in _SECRET_PARTS)


def _mask_pair(pair: str) -> str:
    name, sep, value = pair.partition("=")
    if sep and value and SECRET_PARAM.search(name):
        return f"{name}={MASK}"
    return pair


def mask_form(body: str) -> str:
    """A form body with the values of secret-looking fields masked."""
    return "&".join(_mask_pair(p) for p in body.split("&")) if body else body


def _mask_json(value: object) -> object:
    if isinstance(value, dict):
        return {k: MASK if SECRET_PARAM.search(str(k)) and v not in ("", None) else _mask_json(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_json(v) for v in value]
    return value


def mask_body(body: str | None, fmt: str | None) -> str | None:
    """A request body safe to show: secret-looking fields masked (form or JSON)."""
    if not body:
        return body
    if fmt == "json":
        try:
            return json.dumps(_mask_json(json.loads(body)), ensure_ascii=False)
        except ValueError:
            return MASK
    return mask_form(body)


def mask_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Custom request headers as shown anywhere: names kept, every value masked."""
    return {name: MASK for name in (headers or {})}


def load_headers(raw: str | Mapping[str, object] | None) -> dict[str, str]:
    """Custom headers as stored (a JSON object, or already loaded); {} when unset or
    unreadable."""
    if not raw:
        return {}
    value: object = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
