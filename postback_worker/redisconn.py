"""Redis clients for everything that is not the Celery broker (guardrails, metrics, alerts).

Plain `redis://` / `rediss://` URLs, or Redis Sentinel in the form Celery's broker accepts:
`sentinel://[:password@]host:port[/db];sentinel://host2:port...` with the monitored primary's
name in POSTBACK_REDIS_SENTINEL_MASTER.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit


def sentinel_nodes(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    """(host, port) of every sentinel, the database number and the password of a URL list."""
    nodes: list[tuple[str, int]] = []
    db, password = 0, None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel:// URL: {part.strip()!r}")
        nodes.append((parts.hostname, parts.port or 26379))
        if parts.password:
            password = unquote(parts.password)
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return nodes, db, password


def client(url: str, *, master: str = "", timeout: float = 5.0) -> Any:
    """A Redis client for `url`, following the Sentinel primary for sentinel:// URLs."""
    import redis

    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, socket_timeout=timeout,
                                    socket_connect_timeout=timeout, health_check_interval=30)
    if not master:
        raise ValueError("a sentinel:// Redis URL needs POSTBACK_REDIS_SENTINEL_MASTER")
    from redis.sentinel import Sentinel

    nodes, db, password = sentinel_nodes(url)
    sentinel = Sentinel(nodes, socket_timeout=timeout, socket_connect_timeout=timeout)
    return sentinel.master_for(master, db=db, password=password, socket_timeout=timeout,
                               socket_connect_timeout=timeout, health_check_interval=30)
