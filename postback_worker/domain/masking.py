"""Hide secrets in URLs before they are logged, stored in attempts or exported."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

SECRET_PARAM = re.compile(
    r"(token|secret|password|passwd|pwd|api[_-]?key|apikey|key|sig|signature|auth|hash)",
    re.IGNORECASE,
)
MASK = "***"


def mask_url(url: str) -> str:
    """Mask userinfo passwords and the values of query parameters that look secret."""
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


def _mask_pair(pair: str) -> str:
    name, sep, value = pair.partition("=")
    if sep and value and SECRET_PARAM.search(name):
        return f"{name}={MASK}"
    return pair
