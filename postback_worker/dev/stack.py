"""`postback-worker up`: the whole stack on one machine with embedded defaults."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import requests

from postback_worker.dev.services import ensure_redis, port_is_free, stop
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
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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


def run_stack(*, demo: bool, exit_after_demo: bool, api_port: int, flower_port: int,
              data_dir: str) -> int:
    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"sqlite:///{root / 'postback-worker.db'}")
    # The demo partner listens on loopback, which outbound requests refuse unless allowlisted.
    env.setdefault("POSTBACK_ALLOW_NETWORKS", "127.0.0.0/8,::1/128")
    # Every API endpoint but /click and /health needs a credential: a bootstrap admin token.
    env.setdefault("POSTBACK_ADMIN_TOKEN", secrets.token_urlsafe(18))
    for port, flag in ((api_port, "--api-port"), (flower_port, "--flower-port")):
        if not port_is_free(port):
            raise click.ClickException(f"port {port} is in use; choose another with {flag}")

    redis_url, redis_proc = ensure_redis(env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                                         root / "redis")
    env["REDIS_URL"] = redis_url
    click.echo(f"redis:    {redis_url}" + (" (started locally)" if redis_proc else ""))
    click.echo(f"database: {env['DATABASE_URL']}")
    from postback_worker.domain.masking import mask_url
    from postback_worker.store.db import upgrade

    upgrade(env["DATABASE_URL"])
    click.echo(f"database: migrated ({mask_url(env['DATABASE_URL'])})")

    py = sys.executable
    celery = [py, "-m", "celery", "-A", "postback_worker.worker.app"]
    stack = Stack(root, env)
    try:
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
        _wait_http(f"{api_url}/health", stack)
        _wait_http(f"http://127.0.0.1:{flower_port}/healthcheck", stack)
        click.echo(f"\nAPI     {api_url}   (try: curl -H 'Authorization: Bearer "
                   f"{env['POSTBACK_ADMIN_TOKEN']}' {api_url}/v1/offers)")
        click.echo(f"Flower  http://127.0.0.1:{flower_port}\n")
        if demo:
            from postback_worker.dev.demo import run_demo

            ok = run_demo(api_url, token=env["POSTBACK_ADMIN_TOKEN"])
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
        if redis_proc is not None:
            stop(redis_proc)
