"""Shared fixtures: a real PostgreSQL, a real Redis, real Celery workers, a local partner.

PostgreSQL: TEST_DATABASE_URL, else the server on 127.0.0.1:5432, else an embedded one.
Redis: TEST_REDIS_URL, else 127.0.0.1:6379, else a local redis-server started for the run.
Each run gets its own PostgreSQL database. Redis: database TEST_REDIS_DB (default 9; never 1,
which `postback-worker up` uses); the suite flushes it, so it refuses to start on a database
holding keys it did not write or one another live test run is using.
TEST_EMBEDDED=1 ignores running servers and starts both (what a fresh machine does).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from support import redisdb
from support.helpers import NOW, Clock, warm_stop
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.dev import services as devservices
from postback_worker.dev.stack import REDIS_DB as UP_REDIS_DB
from postback_worker.domain.retry import RetryPolicy
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.db import make_engine, normalize_url, upgrade
from postback_worker.store.repo import Store
from postback_worker.store.schema import metadata

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.0.0.0/8", "::1/128")
ADMIN_TOKEN = "test-admin-token"
# The Redis database the suite uses unless TEST_REDIS_DB says otherwise.
TEST_REDIS_DB = 9
# Send with every API request in tests: the bootstrap admin credential (all scopes).
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll a real, asynchronous system (a worker, a server) until `predicate` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


EMBEDDED = os.environ.get("TEST_EMBEDDED") == "1"


def _postgres_server(tmp: Path) -> tuple[str, Any]:
    if EMBEDDED:
        return devservices.ensure_postgres(None, tmp / "pg")
    url = os.environ.get("TEST_DATABASE_URL")
    candidates = [url] if url else [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://127.0.0.1:5432/postgres",
        "postgresql://127.0.0.1:5432/test",
    ]
    for candidate in candidates:
        if candidate and devservices.postgres_answers(candidate):
            return candidate, None
    if url:
        pytest.exit(f"TEST_DATABASE_URL={url} does not answer", returncode=2)
    return devservices.ensure_postgres(None, tmp / "pg")


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server_url, handle = _postgres_server(tmp_path_factory.mktemp("postgres"))
    name = f"pbw_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, query = server_url.partition("?")
    url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
        ), {"n": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()
    if handle is not None:
        devservices.stop(handle)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if EMBEDDED:
        url = f"redis://127.0.0.1:{devservices.free_port()}/0"
    url, proc = devservices.ensure_redis(url, tmp_path_factory.mktemp("redis"))
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    db = int(os.environ.get("TEST_REDIS_DB", str(TEST_REDIS_DB)))
    client = redis.Redis.from_url(f"{base}/{db}")
    problem = redisdb.claim(client)
    client.close()
    if problem:
        pytest.exit(f"Redis database {db} at {base} {problem}; the suite flushes its database, "
                    "so give it another one: TEST_REDIS_DB=<0-15> (default "
                    f"{TEST_REDIS_DB}; postback-worker up uses {UP_REDIS_DB})", returncode=2)
    yield f"{base}/{db}"
    if proc is not None:
        devservices.stop(proc)


@pytest.fixture()
def settings(pg_url: str, redis_url: str) -> Settings:
    """Test settings: loopback allowed, a short retry schedule, fast sweeps and leases."""
    return Settings.build(
        database_url=pg_url,
        redis_url=redis_url,
        allow_networks=LOOPBACK,
        retry=RetryPolicy(max_attempts=4, base_delay=0.2, max_delay=1.0, horizon=120.0),
        sweep_interval=0.2,
        lease_seconds=5,
        requeue_after=5,
        visibility_timeout=4,
        config_cache_seconds=0.0,
        default_timeout=2.0,
        admin_token=ADMIN_TOKEN,
    )


@pytest.fixture()
def store(pg_url: str) -> Iterator[Store]:
    """A store over an emptied database."""
    engine = make_engine(pg_url)
    names = ", ".join(t.name for t in reversed(metadata.sorted_tables))
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} CASCADE"))
    yield Store(engine)
    engine.dispose()


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    redisdb.mark(client)
    yield client
    client.flushdb()
    redisdb.mark(client)
    client.close()


@pytest.fixture()
def partner() -> Iterator[PartnerServer]:
    with PartnerServer() as server:
        yield server


@pytest.fixture()
def clock() -> Clock:
    """An injected clock at helpers.NOW that a test moves with clock.advance(seconds)."""
    return Clock(NOW)


@pytest.fixture()
def make_pipeline(store: Store, clock: Clock) -> Iterator[Callable[..., Pipeline]]:
    """Factory: make(settings, redis=None, clock=None) -> a Pipeline without Celery (real
    PostgreSQL and HTTP sender; the injected clock unless another is given; jitter fixed)."""
    senders: list[Sender] = []

    def make(settings: Settings, *, redis: Any | None = None,
             clock: Callable[[], Any] | None = None) -> Pipeline:
        sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=8)
        senders.append(sender)
        return Pipeline(settings, store, sender, clock=clock or default_clock,
                        rand=lambda: 0.5, worker_name="test", redis=redis)

    default_clock = clock
    yield make
    for sender in senders:
        sender.close()


@pytest.fixture()
def pipeline_redis() -> Any | None:
    """The Redis client of the `pipeline` fixture's guardrails: none (pauses only), unless a
    test module overrides this fixture."""
    return None


@pytest.fixture()
def pipeline(make_pipeline: Callable[..., Pipeline], settings: Settings,
             pipeline_redis: Any | None) -> Pipeline:
    """The pipeline in-process: the test settings, the injected clock, no Celery."""
    return make_pipeline(settings, redis=pipeline_redis)


@pytest.fixture()
def serve() -> Iterator[Callable[[Settings], str]]:
    """Factory: serve the API for these settings with uvicorn on a free port; its base URL."""
    import threading

    import uvicorn

    from postback_worker.api.app import create_app

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings) -> str:
        port = devservices.free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1",
                                               port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_until(lambda: server.started, 10, message="uvicorn to start")
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


class Proc:
    """A Celery worker or beat as a separate process group, killable like a real one."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            warm_stop(self.proc, 20)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture()
def celery_procs(settings: Settings, redis_client: redis.Redis,
                 tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Factory: start('worker' | 'beat', **settings overrides) -> a running process."""
    procs: list[Proc] = []

    def start(kind: str = "worker", concurrency: int = 2, name: str | None = None,
              **overrides: Any) -> Proc:
        s = settings.with_overrides(**overrides) if overrides else settings
        env = {**os.environ, **s.to_env()}
        base = [sys.executable, "-m", "celery", "-A", "postback_worker.worker.app"]
        label = name or f"{kind}{len(procs)}"
        if kind == "worker":
            args = base + ["worker", "-Q", "conversions,retries,replay,maintenance",
                           "--concurrency", str(concurrency), "-n", f"{label}@%h",
                           "-l", "info", "--without-mingle", "--without-gossip"]
        else:
            args = base + ["beat", "-l", "info", "-s", str(tmp_path / f"{label}-schedule")]
        proc = Proc(label, args, env, tmp_path / f"{label}.log").start()
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()
    for p in procs:
        if "Traceback" in p.output() and os.environ.get("SHOW_WORKER_LOGS"):
            print(p.output())
