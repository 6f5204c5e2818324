"""The `postback-worker` command line against a real database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect
from support.helpers import add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.cli import main
from postback_worker.delivery.sender import Sender
from postback_worker.dev.state import StackState
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.db import make_engine
from postback_worker.store.repo import Store


@pytest.fixture()
def cli(store: Store, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    return CliRunner()


def test_offers(cli: CliRunner) -> None:
    r = cli.invoke(main, ["offers", "add", "--id", "o1", "--campaign-type", "financial"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "offer o1: financial, lifespan 120 days"
    r = cli.invoke(main, ["offers", "add", "--id", "o2", "--lifespan-days", "45"])
    assert "ecommerce, lifespan 45 days" in r.output
    r = cli.invoke(main, ["offers", "list"])
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "CAMPAIGN_TYPE", "LIFESPAN_DAYS"]
    assert [ln.split()[:4] for ln in lines[1:]] == [["o1", "o1", "financial", "120"],
                                                   ["o2", "o2", "ecommerce", "45"]]
    r = cli.invoke(main, ["offers", "list", "--format", "json"])
    assert [o["id"] for o in json.loads(r.output)] == ["o1", "o2"]
    r = cli.invoke(main, ["offers", "add", "--id", "bad id"])
    assert r.exit_code == 2 and "error: id:" in r.output
    r = cli.invoke(main, ["offers", "add", "--id", "o3", "--campaign-type", "crypto"])
    assert r.exit_code == 2 and "Invalid value for '--campaign-type'" in r.output


def test_partners(cli: CliRunner) -> None:
    r = cli.invoke(main, ["partners", "add", "--id", "p1", "--url",
                          "https://p.example/pb?tid={transaction_id}&token=abc",
                          "--fire-on", "approved,pending", "--max-attempts", "3"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == (
        "partner p1 (enabled): GET https://p.example/pb?tid={transaction_id}&token=***")
    r = cli.invoke(main, ["partners", "add", "--id", "p2", "--url",
                          "p.example/pb?tid=#tid#&x={aff_sub9}"])
    assert r.exit_code == 2
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: postback_url:")]
    assert len(errors) >= 3, r.output
    r = cli.invoke(main, ["partners", "list", "--format", "json"])
    (p,) = json.loads(r.output)
    assert (p["id"], p["fire_statuses"], p["max_attempts"]) == ("p1", "approved,pending", 3)
    assert "abc" not in r.output


def test_show(cli: CliRunner, store: Store, settings: Settings, partner: PartnerServer) -> None:
    add_offer(store)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    partner.set_script([503])
    event = conversion("tx1", payout="4.20")
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        Pipeline(settings, store, sender).process_conversions(messages(event))
    r = cli.invoke(main, ["show", event.id])
    assert r.exit_code == 0, r.output
    assert f"conversion {event.id}: attributed" in r.output
    assert "-> partner p1: retry_scheduled after 1 attempt(s)" in r.output
    assert "status 503 partner_5xx" in r.output
    r = cli.invoke(main, ["show", event.id, "--format", "json"])
    detail = json.loads(r.output)
    assert detail["postbacks"][0]["attempts_log"][0]["status_code"] == 503
    r = cli.invoke(main, ["show", "cv_nope"])
    assert r.exit_code == 3 and "no conversion 'cv_nope'" in r.output


def test_db_upgrade_on_a_fresh_sqlite_file(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    runner = CliRunner()
    r = runner.invoke(main, ["db", "current"])
    assert "none (run: postback-worker db upgrade)" in r.output
    r = runner.invoke(main, ["db", "upgrade"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["db", "current"])
    from alembic.script import ScriptDirectory

    from postback_worker.store.db import alembic_config
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert r.output.strip() == head and head is not None
    tables = set(inspect(make_engine(url)).get_table_names())
    assert {"offers", "partners", "clicks", "conversions", "postbacks", "attempts",
            "dead_letters", "conversion_keys"} <= tables


def test_bad_setting_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_LEASE_SECONDS", "soon")
    r = CliRunner().invoke(main, ["offers", "list"])
    assert r.exit_code == 2 and "POSTBACK_LEASE_SECONDS" in r.output


# -- the local stack's file and unmigrated databases ------------------------------------------

def _bare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name in ("DATABASE_URL", "REDIS_URL") or name.startswith("POSTBACK_"):
            monkeypatch.delenv(name)


def test_cli_uses_the_local_stack_file_without_any_setting(
        store: Store, pg_url: str, redis_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _bare_env(monkeypatch)
    data = tmp_path / ".postback-worker"
    data.mkdir()
    path = StackState(database_url=pg_url, redis_url=redis_url, admin_token="tok-123",
                      api_url="http://127.0.0.1:18999").write(data)
    assert path.stat().st_mode & 0o777 == 0o600
    add_offer(store, "from-stack")
    deeper = tmp_path / "docs" / "runbooks"
    deeper.mkdir(parents=True)
    monkeypatch.chdir(deeper)  # found in a parent directory too
    r = CliRunner().invoke(main, ["offers", "list", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert [o["id"] for o in json.loads(r.output)] == ["from-stack"]
    # The admin token signs dashboard links for the stack's API.
    r = CliRunner().invoke(main, ["dashboard", "link"])
    assert r.exit_code == 0 and r.output.startswith("http://127.0.0.1:18999/dashboard/session?t=")
    # DATABASE_URL in the environment wins: the file is not read at all.
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    r = CliRunner().invoke(main, ["offers", "list"])
    assert r.exit_code == 5 and "no database file" in r.output


def test_unmigrated_database_one_line_exit_5_no_file(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _bare_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for args in (["offers", "list"], ["show", "cv_x"], ["dlq", "stats"], ["report"]):
        r = subprocess.run([sys.executable, "-m", "postback_worker.cli", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 5, (args, r.stdout, r.stderr)
        assert r.stderr == ("error: database not migrated: run postback-worker db upgrade "
                            "(no database file postback-worker.db)\n"), args
        assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no stray SQLite file
    # An existing file, or a PostgreSQL database, without the schema.
    sqlite3.connect(tmp_path / "empty.db").close()
    admin = make_engine(pg_url.rsplit("/", 1)[0] + "/postgres",
                        ).execution_options(isolation_level="AUTOCOMMIT")
    name = f"pbw_unmigrated_{os.getpid()}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        for url in (f"sqlite:///{tmp_path / 'empty.db'}", pg_url.rsplit("/", 1)[0] + "/" + name):
            monkeypatch.setenv("DATABASE_URL", url)
            r = CliRunner().invoke(main, ["partners", "list"])
            assert r.exit_code == 5 and r.output == (
                "error: database not migrated: run postback-worker db upgrade\n"), url
            assert CliRunner().invoke(main, ["db", "current"]).output.startswith("none")
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres:pw@127.0.0.1:1/nowhere")
    r = CliRunner().invoke(main, ["offers", "list"])
    assert r.exit_code == 5 and r.output.startswith("error: the database is unavailable: ")
    assert len(r.output.splitlines()) == 1 and ":pw@" not in r.output


def test_unreachable_database_and_redis_exit_5(monkeypatch: pytest.MonkeyPatch) -> None:
    from postback_worker.dev.services import free_port

    monkeypatch.setenv("DATABASE_URL", f"postgresql://127.0.0.1:{free_port()}/nothing")
    r = CliRunner().invoke(main, ["offers", "list"])
    assert r.exit_code == 5, r.output
    assert r.stderr.startswith("error: the database is unavailable: ")
    assert "Traceback" not in r.output


def test_bad_setting_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_LEASE_SECONDS", "soon")
    r = CliRunner().invoke(main, ["offers", "list"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: POSTBACK_LEASE_SECONDS: invalid literal for int() with "
                                "base 10: 'soon'")
