"""`postback-worker up --demo`, the README's first command, and what a newcomer does next:
the CLI in another terminal of a fresh clone, every README example, on SQLite and a real Redis.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import redis
import requests
from conftest import ROOT, TEST_REDIS_DB
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support import redisdb

from postback_worker.dev import state
from postback_worker.dev.demo import DemoPartner
from postback_worker.dev.services import free_port
from postback_worker.dev.stack import OWNER_KEY, REDIS_DB, claim_redis_db
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e


def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a new terminal: no DATABASE_URL, REDIS_URL or POSTBACK_* setting."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("POSTBACK_") and k not in ("DATABASE_URL", "REDIS_URL")}
    return {**env, **extra}


def up_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "postback_worker.cli", "up", "--api-port", str(free_port()),
            "--flower-port", str(free_port()), "--partner-port", str(free_port()), *args]


def test_up_runs_the_demo_and_prints_no_secret(tmp_path: Path, pg_url: str, redis_url: str,
                                               redis_client: redis.Redis, store: Store) -> None:
    url = make_url(pg_url)
    if not url.password:  # the server trusts local connections: any password does
        url = url.set(password="s3cret-db-pw")
    db_password = str(url.password)
    redis_client.delete(redisdb.OWNER_KEY)  # up refuses a database holding others' keys
    env = bare_env(DATABASE_URL=url.render_as_string(hide_password=False), REDIS_URL=redis_url,
                   POSTBACK_ADMIN_TOKEN="adm-tok-never-printed")
    result = subprocess.run(up_command("--exit-after-demo", "--data-dir", str(tmp_path)),
                            env=env, capture_output=True, text=True, timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # No secret printed; the URLs are shown masked, the Redis database number said.
    assert db_password not in out and "adm-tok-never-printed" not in out
    assert f"database: postgresql://{url.username}:***@" in out
    db_number = redis_url.rsplit("/", 1)[1]
    assert f"redis:    {redis_url} (database {db_number})" in out
    # The demo's story.
    assert "postbacks delivered: 2, skipped: 1, dead-lettered: 2, still pending: 0" in out
    for conversion_state in ("attributed", "expired_click", "duplicate", "unknown_click",
                             "rejected_status"):
        assert conversion_state in out
    assert "aff-down: dead_lettered after 3 attempt(s)" in out
    assert "aff-blocked: dead_lettered after 1 attempt(s)" in out
    assert "sub=summer%20sale%20%26%20more" in out or "sub=banner-2" in out
    assert (tmp_path / "logs" / "worker.log").exists()
    # The state file for the CLI: owner-only, holding what the CLI needs.
    saved = tmp_path / "stack.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    data = json.loads(saved.read_text())
    assert data["admin_token"] == "adm-tok-never-printed" and data["redis_url"] == redis_url
    # The Redis database is marked as this stack's.
    assert json.loads(redis_client.get(OWNER_KEY) or "{}")["data_dir"] == str(tmp_path)


def test_up_and_the_suite_never_take_a_redis_database_holding_others_keys(
        tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    assert REDIS_DB == 1 and TEST_REDIS_DB == 9  # as README.md says
    mine, other = tmp_path / "a" / ".postback-worker", tmp_path / "b" / ".postback-worker"
    # up: someone else's key -> refused, nothing written.
    redis_client.flushdb()
    redis_client.set("session:42", "someone's data")
    with pytest.raises(click.ClickException, match="keys that postback-worker up did not create"):
        claim_redis_db(redis_url, mine)
    assert redis_client.keys("*") == [b"session:42"]
    # An empty database becomes ours; ours again later; another clone's stack is refused,
    # running or stopped, each with what to do.
    redis_client.flushdb()
    claim_redis_db(redis_url, mine)
    redis_client.rpush("conversions", "work")
    claim_redis_db(redis_url, mine)
    with pytest.raises(click.ClickException, match=f"used by the stack running in {mine} "
                                                   rf"\(pid {os.getpid()}\): stop it, or"):
        claim_redis_db(redis_url, other)
    owner = json.loads(redis_client.get(OWNER_KEY) or "{}")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    redis_client.set(OWNER_KEY, json.dumps({**owner, "pid": ended.pid}))
    db = redis_url.rsplit("/", 1)[1]
    with pytest.raises(click.ClickException, match=f"keys of the stopped stack in {mine}: delete "
                                                   rf"them \(redis-cli -n {db} flushdb\)"):
        claim_redis_db(redis_url, other)
    assert redis_client.lrange("conversions", 0, -1) == [b"work"]  # untouched
    # The suite: it flushes its database, so it takes only one holding its own kinds of keys
    # and no other live run's mark.
    redis_client.flushdb()
    redis_client.set("session:42", "someone's data")
    assert redisdb.claim(redis_client) == "holds keys the test suite did not create"
    redis_client.flushdb()
    redis_client.set("pbw:circuit:p1", "x")
    redis_client.rpush("retries", "x")
    assert redisdb.claim(redis_client) is None  # left by an earlier run
    redis_client.set(redisdb.OWNER_KEY, f"{os.uname().nodename}:{os.getppid()}")
    reason = redisdb.claim(redis_client)
    assert reason and reason.startswith("is in use by another test run")
    redis_client.set(redisdb.OWNER_KEY, f"{os.uname().nodename}:{ended.pid}")
    assert redisdb.claim(redis_client) is None  # that run has ended


def test_demo_partner_answers_until_closed_and_heals() -> None:
    partner = DemoPartner()
    try:
        def get(path: str) -> tuple[int, str]:
            r = requests.get(f"{partner.url}{path}?tid=1", timeout=5)
            return r.status_code, r.text

        assert [get(p) for p in ("/ok", "/down", "/blocked", "/other")] == [
            (200, "success=true"), (503, "maintenance"), (403, "forbidden"), (404, "not found")]
        assert requests.post(f"{partner.url}/heal", timeout=5).status_code == 200
        assert [get(p) for p in ("/down", "/blocked", "/other")] == [
            (200, "success=true"), (200, "success=true"), (404, "not found")]
        assert requests.post(f"{partner.url}/break", timeout=5).status_code == 200
        assert get("/down") == (503, "maintenance")
        assert requests.post(f"{partner.url}/down", timeout=5).status_code == 404
    finally:
        partner.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{partner.url}/ok", timeout=5)


# -- a newcomer's first hour: a fresh clone, `up --demo`, the README's commands ---------------

def fresh_clone(dest: Path) -> Path:
    """The repository as a fresh clone has it: tracked and new files, nothing ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode & 0o777)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh clone"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
    return dest


def readme_commands() -> list[list[str]]:
    """Every shell command line in README.md's ```sh blocks, in order, split into words."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


class Newcomer:
    """The CLI typed in a second terminal of the clone: no setting exported."""

    def __init__(self, clone: Path) -> None:
        self.clone = clone
        self.env = bare_env(PYTHONPATH=str(clone))
        self.ran: list[str] = []

    def run(self, words: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        assert words[0] == "postback-worker"
        self.ran.append(shlex.join(words))
        return subprocess.run([sys.executable, "-m", "postback_worker.cli", *words[1:]],
                              cwd=cwd or self.clone, env=self.env, capture_output=True,
                              text=True, timeout=180)


@pytest.fixture()
def running_demo(tmp_path: Path, redis_url: str,
                 redis_client: redis.Redis) -> Iterator[tuple[Path, str, subprocess.Popen[Any]]]:
    clone = fresh_clone(tmp_path / "clone")
    redis_client.delete(redisdb.OWNER_KEY)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        # REDIS_URL: the suite's own database, not database 1 that a developer's `up` may use.
        proc = subprocess.Popen(up_command("--demo"), cwd=clone, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=bare_env(PYTHONPATH=str(clone), REDIS_URL=redis_url))
    try:
        deadline = time.monotonic() + 240
        while "Running. Press Ctrl-C to stop." not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield clone, log.read_text(), proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(900)
def test_every_readme_command_after_up_demo_from_a_fresh_clone(
        running_demo: tuple[Path, str, subprocess.Popen[Any]], tmp_path: Path) -> None:
    clone, up_output, up_proc = running_demo
    stack = state.read(clone / ".postback-worker" / "stack.json")
    assert stack.admin_token not in up_output
    conversion_id = re.findall(r"postback-worker show (cv_\w+)", up_output)[0]
    user = Newcomer(clone)
    down_id, down_conversion = _postback_of(stack, "aff-down")
    # The first command after the demo, typed as the README shows it.
    shown = user.run(["postback-worker", "show", conversion_id])
    assert shown.returncode == 0 and f"conversion {conversion_id}: attributed" in shown.stdout
    key_id = ""
    expected_exit = {"validate": 1, "audit": (0, 1)}
    replays: list[str] = []
    for words in readme_commands():
        if words[0] == "curl" and words[-1].endswith("/heal"):
            r = requests.post(f"{stack.demo_partner_url}/heal", timeout=5)
            assert r.status_code == 200 and r.text.startswith("healed")
            continue
        if words[0] != "postback-worker" or words[1] in ("up", "flower", "api"):
            continue
        words = list(words)
        out_file = None
        if ">" in words:  # `... --format csv > /tmp/failed.csv`
            words, out_file = words[:words.index(">")], tmp_path / "redirected.out"
        for i, word in enumerate(words):
            if word == "CONVERSION_ID":
                words[i] = conversion_id
            elif word == "POSTBACK_ID":
                listed = user.run(["postback-worker", "dlq", "list", "--format", "json"])
                words[i] = json.loads(listed.stdout)["dead_letters"][0]["postback_id"]
            elif word == "KEY_ID":
                assert key_id, "keys revoke before keys create"
                words[i] = key_id
        r = user.run(words)
        output = r.stdout + r.stderr
        want = expected_exit.get(words[2] if words[1] == "partners" else words[1], 0)
        assert r.returncode in (want if isinstance(want, tuple) else (want,)), (words, output)
        assert "Traceback" not in output, (words, output)
        if out_file is not None:
            out_file.write_text(r.stdout)
            assert r.stdout.startswith("postback_id,"), r.stdout[:200]
        if words[1:3] == ["keys", "create"]:
            key_id = re.findall(r"key (key_\w+) ", r.stdout)[0]
        if words[1:3] == ["dlq", "replay"] and "--dry-run" not in words:
            replays.append(r.stdout.strip().splitlines()[-1])
            if len(replays) == 1:  # failed again: a new round of 3 attempts, read right
                shown = user.run(["postback-worker", "dlq", "show", down_id]).stdout
                assert "dead_lettered after 6 attempt(s)" in shown, shown
                assert "retries exhausted: 3 of 3 attempts" in shown, shown
        if words[1:3] == ["dashboard", "link"]:
            link = r.stdout.strip()
            assert link.startswith(stack.api_url + "/dashboard/session?t="), link
            browser = requests.Session()
            page = browser.get(link, timeout=30)
            assert page.status_code == 200 and "<h1>Postback delivery</h1>" in page.text
    assert len(user.ran) >= 35, user.ran
    # The demo partner kept answering: 503 while down, delivered once healed; the README's
    # later replay found nothing of aff-down left dead.
    assert replays[:2] == ["delivered 0, failed again 1, still pending 0",
                           "delivered 1, failed again 0, still pending 0"], replays
    # Attempts after the replays: 3, a new round of 3, then 1 delivered, numbered on.
    down = user.run(["postback-worker", "show", "--format", "json", down_conversion])
    (postback,) = json.loads(down.stdout)["postbacks"]
    assert postback["state"] == "delivered" and postback["attempts"] == 7
    assert [a["attempt_no"] for a in postback["attempts_log"]] == list(range(1, 8))
    # Nothing left behind in the clone: the support bundle's default name is ignored.
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    status = [line for line in status if "__pycache__" not in line]
    assert sorted(status) == ["!! .postback-worker/", "!! " + _one_bundle(clone)], status
    # Elsewhere (no stack, no database): one line, exit code 5, no file created.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = user.run(["postback-worker", "offers", "list"], cwd=elsewhere)
    assert r.returncode == 5 and r.stdout == "" and r.stderr == (
        "error: database not migrated: run postback-worker db upgrade "
        "(no database file postback-worker.db)\n")
    assert list(elsewhere.iterdir()) == []
    # SIGTERM (like Ctrl-C) stops the whole stack: API and demo partner stop answering.
    os.killpg(up_proc.pid, signal.SIGTERM)
    assert up_proc.wait(60) == 0
    for url in (f"{stack.api_url}/health", stack.demo_partner_url + "/ok"):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=5)


def _postback_of(stack: state.StackState, partner_id: str) -> tuple[str, str]:
    """(postback id, conversion id) of the partner's one postback, from the stack's database."""
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT id, conversion_id FROM postbacks "
                                    "WHERE partner_id = :p"), {"p": partner_id}).one()
    finally:
        engine.dispose()
    return str(row[0]), str(row[1])


def _one_bundle(clone: Path) -> str:
    (bundle,) = clone.glob("support-bundle-aff-down-*.tar.gz")
    return bundle.name
