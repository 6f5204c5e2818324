"""Ingestion benchmark: one API process, wrk as the load generator, ours vs a naive endpoint.

    .venv/bin/python bench/ingest.py [--runs 3] [--seconds 5] [--batch 500] [--connections 32]

Figures (medians of --runs):
- conversions/s accepted by `POST /v1/conversions` with batches of --batch events;
- requests/s on the single-event advertiser `GET /postback`;
each next to a naive endpoint served by the same uvicorn: one Celery `send_task` per event,
stdlib json (what most teams write first). Needs `wrk` (Debian package) on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from postback_worker.dev.services import free_port  # noqa: E402
from postback_worker.settings import Settings  # noqa: E402
from postback_worker.store.db import normalize_url, upgrade  # noqa: E402

TOKEN = "bench-admin-token"


def wrk(url: str, seconds: float, connections: int, script: Path | None) -> float:
    """Run wrk; return requests/s (non-2xx answers make the run fail)."""
    args = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:.0f}s", "--latency"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed: {out.stderr or out.stdout}")
    if "Non-2xx" in out.stdout:
        raise SystemExit(f"wrk saw error answers:\n{out.stdout}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not match:
        raise SystemExit(f"cannot read wrk output:\n{out.stdout}")
    return float(match.group(1))


def lua_post(body_path: Path, token: str) -> str:
    return f"""
local f = assert(io.open("{body_path}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
"""


def lua_get(token: str) -> str:
    return f'wrk.headers["Authorization"] = "Bearer {token}"\n'


class Server:
    def __init__(self, app: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1",
                 "--port", str(self.port), "--no-access-log", "--log-level", "warning"],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{app} exited; see {log}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{app} did not answer within 30 s; see {log}")

    def settle(self, timeout: float = 120) -> None:
        """Wait until requests queued by the last load run have been served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            started = time.monotonic()
            with contextlib.suppress(requests.RequestException):
                requests.get(f"{self.url}/health", timeout=timeout)
            if time.monotonic() - started < 0.05:
                return
        raise SystemExit(f"{self.url} still busy after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--pg-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--redis-url", default=os.environ.get(
        "BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2

    name = f"pbw_bench_ingest_{secrets.token_hex(3)}"
    admin = create_engine(normalize_url(args.pg_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = args.pg_url.rsplit("/", 1)[0] + "/" + name
    tmp = Path(tempfile.mkdtemp(prefix="pbw-ingest-"))
    servers: list[Server] = []
    rds = redis.Redis.from_url(args.redis_url)
    try:
        upgrade(db_url)
        settings = Settings.build(database_url=db_url, redis_url=args.redis_url, admin_token=TOKEN)
        env = {**os.environ, **settings.to_env()}
        ours = Server("postback_worker.api.app:app_from_env", env, tmp / "ours.log")
        servers.append(ours)
        naive = Server("bench.naive_api:create", env, tmp / "naive.log")
        servers.append(naive)
        offer = requests.post(f"{ours.url}/v1/offers", json={"id": "o1"},
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        token = offer.get("security_token") or ""
        body = tmp / "batch.json"
        body.write_text(json.dumps([
            {"transaction_id": f"tx{i:06d}", "payout": "1.25", "currency": "USD"}
            for i in range(args.batch)
        ]))
        post_lua = tmp / "post.lua"
        post_lua.write_text(lua_post(body, TOKEN))
        get_lua = tmp / "get.lua"
        get_lua.write_text(lua_get(TOKEN))
        query = "transaction_id=tx000001&payout=1.25&goal_id=g&adv_sub=order-1"
        if token:
            query += f"&security_token={token}"
        figures: dict[str, list[float]] = {k: [] for k in (
            "ours_batch_cps", "naive_batch_cps", "ours_get_rps", "naive_get_rps")}
        for run in range(args.runs):
            for label, server in (("ours", ours), ("naive", naive)):
                rds.flushdb()
                rps = wrk(f"{server.url}/v1/conversions", args.seconds, args.connections,
                          post_lua)
                figures[f"{label}_batch_cps"].append(rps * args.batch)
                server.settle()
                rds.flushdb()
                rps = wrk(f"{server.url}/postback?{query}", args.seconds, args.connections,
                          get_lua)
                figures[f"{label}_get_rps"].append(rps)
                server.settle()
            print(f"run {run + 1}: " + ", ".join(
                f"{k} {v[-1]:,.0f}" for k, v in figures.items()), flush=True)
        med = {k: statistics.median(v) for k, v in figures.items()}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        print(f"\ncommit {commit}, {args.runs} runs of {args.seconds:.0f} s, "
              f"{args.connections} connections, one API process (uvicorn)")
        print(f"{'figure':<46}{'ours':>12}{'naive':>12}{'ratio':>8}")
        rows = [(f"POST /v1/conversions, batches of {args.batch}: conv/s",
                 "ours_batch_cps", "naive_batch_cps"),
                ("GET /postback, single event: requests/s", "ours_get_rps", "naive_get_rps")]
        for title, a, b in rows:
            print(f"{title:<46}{med[a]:>12,.0f}{med[b]:>12,.0f}{med[a] / med[b]:>8.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": figures, "median": med}, indent=2))
        return 0
    finally:
        for s in servers:
            s.stop()
        rds.flushdb()
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
