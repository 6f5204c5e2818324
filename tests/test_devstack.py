"""`postback-worker up --demo`: the README's first command, on SQLite and a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from postback_worker.dev.services import free_port

pytestmark = pytest.mark.e2e


def test_up_runs_the_demo(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("POSTBACK_") and k != "DATABASE_URL"}
    env["REDIS_URL"] = redis_url
    cmd = [sys.executable, "-m", "postback_worker.cli", "up", "--exit-after-demo",
           "--data-dir", str(tmp_path), "--api-port", str(free_port()),
           "--flower-port", str(free_port())]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"sqlite:///{tmp_path}/postback-worker.db" in out
    assert "postbacks delivered: 2, skipped: 1, dead-lettered: 2, still pending: 0" in out
    for state in ("attributed", "expired_click", "duplicate", "unknown_click",
                  "rejected_status"):
        assert state in out
    assert "aff-down: dead_lettered after 3 attempt(s)" in out
    assert "aff-blocked: dead_lettered after 1 attempt(s)" in out
    assert "sub=summer%20sale%20%26%20more" in out or "sub=banner-2" in out
    assert (tmp_path / "logs" / "worker.log").exists()
