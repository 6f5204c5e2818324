"""`postback-worker up`: the whole stack on one machine with embedded defaults."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import click
import requests

from postback_worker import redisconn
from postback_worker.dev import state
from postback_worker.dev.demo import DEMO_PARTNER_PORT, DemoPartner, run_demo
from postback_worker.dev.services import ensure_redis, port_is_free, process_alive, stop
from postback_worker.domain.masking import mask_url
from postback_worker.store.db import upgrade
from postback_worker.worker.queues import QUEUES


class Stack:
    """Child processes (API, worker, beat, Flower) with logs under data_dir/logs."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.env = env
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        click.echo(f"  started {name:<7} pid {proc.pid:<7} log {self.logs / (name + '.log')}")

    def check(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}; see {self.logs}/{name}.log"
        return None

    def stop(self) -> None:
        """SIGTERM to each main process only, as deploy/ does (a Celery worker's warm shutdown
        lets its pool children finish their task); SIGKILL to what is left after 15 s."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # a child its main process left behind


def _wait_http(url: str, stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        problem = stack.check()
        if problem:
            raise click.ClickException(problem)
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise click.ClickException(f"{url} did not answer within {timeout:.0f} s")


# `up` keeps its work in this Redis database (unless REDIS_URL says otherwise); the test suite
# uses another one (TEST_REDIS_DB, default 9), so neither flushes the other's keys.
REDIS_DB = 1
# Set in the Redis database `up` uses: which stack owns it ({"data_dir", "host", "pid"}).
OWNER_KEY = "postback-worker:up:owner"


def claim_redis_db(url: str, data_dir: Path) -> None:
    """Mark the Redis database at `url` as this stack's; refuse one that holds keys this
    stack did not create (another program's data, or another clone's stack)."""
    client = redisconn.client(url)
    try:
        raw = client.get(OWNER_KEY)
        try:
            owner = json.loads(raw) if raw else None
        except ValueError:
            owner = {"data_dir": "?"}
        other = "set REDIS_URL to another database number"
        where = mask_url(url)
        if owner is None and client.dbsize() > 0:
            raise click.ClickException(
                f"Redis database {where} holds keys that postback-worker up did not create, "
                f"and up never touches them: {other} (an empty one)")
        if owner is not None and owner.get("data_dir") != str(data_dir):
            if process_alive(str(owner.get("host")), owner.get("pid")):
                raise click.ClickException(
                    f"Redis database {where} is used by the stack running in "
                    f"{owner.get('data_dir')} (pid {owner.get('pid')}): stop it, or {other}")
            db = urlsplit(url).path.strip("/") or "0"
            raise click.ClickException(
                f"Redis database {where} holds the keys of the stopped stack in "
                f"{owner.get('data_dir')}: delete them (redis-cli -n {db} flushdb), or {other}")
        client.set(OWNER_KEY, json.dumps({"data_dir": str(data_dir), "pid": os.getpid(),
                                          "host": socket.gethostname()}))
    finally:
        client.close()


def _stack_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"sqlite:///{root / 'postback-worker.db'}")
    # The demo partner listens on loopback, which outbound requests refuse unless allowlisted.
    env.setdefault("POSTBACK_ALLOW_NETWORKS", "127.0.0.0/8,::1/128")
    # Every API endpoint but /click and /health needs a credential: a bootstrap admin token,
    # kept across runs of the same data directory (links and scripts keep working).
    if "POSTBACK_ADMIN_TOKEN" not in env:
        previous = root / state.FILE_NAME
        try:
            env["POSTBACK_ADMIN_TOKEN"] = state.read(previous).admin_token
        except (OSError, ValueError, TypeError):
            env["POSTBACK_ADMIN_TOKEN"] = secrets.token_urlsafe(18)
    return env


def _cli_hint() -> str:
    """How to run this CLI from the current directory (e.g. `.venv/bin/postback-worker`)."""
    exe = Path(sys.executable).parent / "postback-worker"
    return _shown(exe) if exe.exists() else "postback-worker"


def _shown(path: Path) -> str:
    """`path` relative to the current directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and a closed terminal all stop the stack cleanly (SIGINT too when
    started in the background, where the shell makes it ignored)."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run_stack(*, demo: bool, exit_after_demo: bool, api_port: int, flower_port: int,
              data_dir: str, partner_port: int = DEMO_PARTNER_PORT) -> int:
    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = _stack_env(root)
    ports = [(api_port, "--api-port"), (flower_port, "--flower-port")]
    if demo:
        ports.append((partner_port, "--partner-port"))
    for port, flag in ports:
        if not port_is_free(port):
            raise click.ClickException(f"port {port} is in use; choose another with {flag}")

    redis_url, redis_proc = ensure_redis(
        env.get("REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}"), root / "redis")
    env["REDIS_URL"] = redis_url
    partner: DemoPartner | None = None
    stack = Stack(root, env)
    _stop_on_signals()
    try:
        claim_redis_db(redis_url, root)
        db_number = urlsplit(redis_url).path.strip("/") or "0"
        click.echo(f"redis:    {mask_url(redis_url)} (database {db_number}"
                   + (", started locally" if redis_proc else "") + ")")
        upgrade(env["DATABASE_URL"])
        click.echo(f"database: {mask_url(env['DATABASE_URL'])} (migrated)")
        py = sys.executable
        celery = [py, "-m", "celery", "-A", "postback_worker.worker.app"]
        stack.start("api", [py, "-m", "uvicorn", "postback_worker.api.app:app_from_env",
                            "--factory", "--host", "127.0.0.1", "--port", str(api_port),
                            "--no-access-log"])
        stack.start("worker", celery + ["worker", "-Q", ",".join(QUEUES), "--concurrency", "2",
                                        "-n", "worker@%h", "-l", "info"])
        stack.start("beat", celery + ["beat", "-l", "info",
                                      "-s", str(root / "celerybeat-schedule")])
        # Development: Flower on loopback only; open unless POSTBACK_FLOWER_BASIC_AUTH is set.
        stack.start("flower", [py, "-m", "postback_worker.cli", "flower", "--dev",
                               "--address=127.0.0.1", f"--port={flower_port}"])
        api_url = f"http://127.0.0.1:{api_port}"
        if demo:
            partner = DemoPartner(partner_port)
        saved = state.StackState(
            database_url=env["DATABASE_URL"], redis_url=redis_url,
            admin_token=env["POSTBACK_ADMIN_TOKEN"], api_url=api_url,
            allow_networks=env["POSTBACK_ALLOW_NETWORKS"],
            demo_partner_url=partner.url if partner else "").write(root)
        _wait_http(f"{api_url}/health", stack)
        _wait_http(f"http://127.0.0.1:{flower_port}/healthcheck", stack)
        cli = _cli_hint()
        click.echo(f"\nAPI     {api_url}   (start page; API docs at {api_url}/docs)")
        click.echo(f"Flower  http://127.0.0.1:{flower_port}")
        click.echo(f"CLI     {cli} offers list   (in another terminal of this directory: it "
                   f"reads the database, Redis and admin token from {_shown(saved)})\n")
        if partner is not None:
            ok = run_demo(api_url, partner, token=env["POSTBACK_ADMIN_TOKEN"], cli=cli)
            if exit_after_demo:
                return 0 if ok else 1
        click.echo("Running. Press Ctrl-C to stop.")
        while True:
            problem = stack.check()
            if problem:
                raise click.ClickException(problem)
            time.sleep(1)
    except KeyboardInterrupt:
        click.echo("\nstopping...")
        return 0
    finally:
        stack.stop()
        if partner is not None:
            partner.close()
        if redis_proc is not None:
            stop(redis_proc)
