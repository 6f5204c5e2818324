"""Schema and migrations: one schema for PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from support.helpers import NOW, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.db import make_engine, upgrade
from postback_worker.store.repo import Store
from postback_worker.store.schema import metadata
from postback_worker.store.sql import hoist_shared


def test_migrations_match_the_tables(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


@pytest.fixture()
def sqlite_store(tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'pbw.db'}"
    upgrade(url)
    return Store(make_engine(url))


def test_pipeline_on_sqlite(sqlite_store: Store, settings: Settings,
                            partner: PartnerServer) -> None:
    """The embedded default runs the same pipeline: claim, retry, sweep, deliver."""
    store = sqlite_store
    add_offer(store, "o1", "lead_gen")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    add_click(store, "tx-old", clicked_at=NOW - timedelta(days=15))
    partner.set_script([503])
    now = [NOW]
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        pipeline = Pipeline(settings.with_overrides(database_url=str(store.engine.url)), store,
                            sender, clock=lambda: now[0], rand=lambda: 0.0)
        a, b = conversion("tx1"), conversion("tx-old")
        pipeline.process_conversions(messages(a, b))
        pipeline.process_conversions(messages(a, b))
        (pb,) = store.postbacks_for(a.id)
        assert pb["state"] == "retry_scheduled"
        assert pb["next_attempt_at"] == NOW + timedelta(seconds=0.1)
        now[0] += timedelta(seconds=1)
        pipeline.deliver(pipeline.sweep())
    assert store.postbacks_for(a.id)[0]["state"] == "delivered"
    assert store.get_conversion(b.id)["state"] == "expired_click"  # type: ignore[index]
    assert partner.count() == 2


def test_every_saved_configuration_is_kept_redacted(store: Store) -> None:
    from support.helpers import add_partner

    add_partner(store, "p1", "https://p.example", path="/pb", timeout=5)
    store.upsert_partner({**store.get_partner("p1"),  # type: ignore[dict-item]
                          "timeout": 7.0, "hmac_secret": "sekrit-1"})
    history = store.config_history("partner", "p1")
    assert len(history) == 2
    import json

    first, second = (json.loads(h["snapshot"]) for h in history)
    assert (first["timeout"], second["timeout"]) == (5.0, 7.0)
    assert second["hmac_secret"] == "(set, not shown)"
    assert "sekrit-1" not in "".join(h["snapshot"] for h in history)


def test_finish_only_under_our_lease_and_says_how_many(store: Store) -> None:
    """A result saved after the lease moved to another worker changes nothing, and is counted."""
    from support.helpers import add_click, add_offer, conversion

    from postback_worker.store.schema import conversions, postbacks

    add_offer(store)
    add_click(store, "tx1")
    event = conversion("tx1")
    with store.engine.begin() as conn:
        conn.execute(conversions.insert().values(
            id=event.id, transaction_id="tx1", goal_id="", status="approved",
            occurred_at=NOW, received_at=NOW, state="attributed"))
        conn.execute(postbacks.insert().values(
            id="pb1", conversion_id=event.id, partner_id="p1", url="http://x/", method="GET",
            state="pending", attempts=0, received_at=NOW, created_at=NOW, updated_at=NOW))
    (claimed,) = store.claim(now=NOW, lease_until=NOW + timedelta(seconds=5), token="mine",
                             ids=["pb1"])
    update = {"id": "pb1", "state": "delivered", "reason": None, "next_attempt_at": None,
              "last_status": 200, "last_class": "delivered", "delivered_at": NOW,
              "updated_at": NOW}
    assert store.finish(updates=[{**update, "token": "someone-else"}], attempts=[],
                        dead_letters=[]) == 0
    assert store.postbacks_for(event.id)[0]["state"] == "in_flight"
    assert store.finish(updates=[{**update, "token": "mine"}], attempts=[],
                        dead_letters=[]) == 1
    (pb,) = store.postbacks_for(event.id)
    assert (pb["state"], pb["attempts"], pb["lease_token"], pb["last_status"]) == (
        "delivered", 1, None, 200)


@pytest.mark.parametrize("db", ["postgresql", "sqlite"])
def test_finish_saves_answers_and_wakes_later_events_in_one_call(
        db: str, store: Store, sqlite_store: Store) -> None:
    """`finish` records the attempts, moves the claimed postbacks on (under their lease), puts
    hand-backs back to wait, and makes due the postbacks waiting behind one now delivered
    (same conversion and partner, later event); not those of another partner, nor those
    behind a postback that failed."""
    from postback_worker.domain.lifecycle import ORDER_PREFIX
    from postback_worker.store.schema import conversions, postbacks

    s = store if db == "postgresql" else sqlite_store
    later = NOW + timedelta(hours=1)
    with s.engine.begin() as conn:
        for cid in ("c1", "c2"):
            conn.execute(conversions.insert().values(
                id=cid, transaction_id=cid, goal_id="", status="approved",
                occurred_at=NOW, received_at=NOW, state="attributed"))

        def pb(pid: str, cid: str, partner: str, seq: int, state: str, reason: str | None,
               ) -> None:
            conn.execute(postbacks.insert().values(
                id=pid, conversion_id=cid, partner_id=partner, url="http://x/", method="GET",
                state=state, reason=reason, attempts=0, received_at=NOW, created_at=NOW,
                updated_at=NOW, event_seq=seq,
                next_attempt_at=later if state == "retry_scheduled" else None))

        pb("a1", "c1", "p1", 1, "pending", None)
        pb("a2", "c1", "p1", 2, "retry_scheduled", f"{ORDER_PREFIX}a1 (approved) is in flight")
        pb("b2", "c1", "p2", 2, "retry_scheduled", f"{ORDER_PREFIX}b1 (approved) is in flight")
        pb("f1", "c2", "p1", 1, "pending", None)
        pb("f2", "c2", "p1", 2, "retry_scheduled", f"{ORDER_PREFIX}f1 (approved) is in flight")
        pb("h1", "c2", "p2", 1, "pending", None)
    claimed = {c.id: c for c in s.claim(now=NOW, lease_until=later, token="mine",
                                        ids=["a1", "f1", "h1"])}
    assert {c.id: c.event_seq for c in claimed.values()} == {"a1": 1, "f1": 1, "h1": 1}

    def update(pid: str, state: str) -> dict[str, object]:
        return {"id": pid, "token": "mine", "state": state, "reason": None,
                "next_attempt_at": None, "last_status": 200 if state == "delivered" else 500,
                "last_class": "delivered" if state == "delivered" else "partner_5xx",
                "delivered_at": NOW if state == "delivered" else None, "updated_at": NOW}

    def attempt(pid: str, status: int) -> dict[str, object]:
        return {"postback_id": pid, "attempt_no": 1, "started_at": NOW, "duration_ms": 1.5,
                "url": "http://x/", "status_code": status,
                "failure_class": "delivered" if status == 200 else "partner_5xx",
                "error": None, "response_excerpt": "", "worker": "w", "is_test": False}

    released = [{"id": "h1", "token": "mine", "next_attempt_at": later,
                 "reason": "waiting: partner paused", "updated_at": NOW}]
    saved = s.finish(updates=[update("a1", "delivered"), update("f1", "dead_lettered")],
                     attempts=[attempt("a1", 200), attempt("f1", 500)], dead_letters=[],
                     released=released)
    assert saved == 2
    rows = {p["id"]: p for cid in ("c1", "c2") for p in s.postbacks_for(cid)}
    due = {pid: rows[pid]["next_attempt_at"].replace(tzinfo=None) for pid in ("a2", "b2", "f2")}
    assert due == {"a2": NOW.replace(tzinfo=None), "b2": later.replace(tzinfo=None),
                   "f2": later.replace(tzinfo=None)}
    assert (rows["a1"]["state"], rows["a1"]["attempts"], rows["f1"]["state"]) == (
        "delivered", 1, "dead_lettered")
    assert (rows["h1"]["state"], rows["h1"]["attempts"], rows["h1"]["lease_token"]) == (
        "retry_scheduled", 0, None)
    assert [a["status_code"] for a in s.attempts_for(["a1", "f1"])] == [200, 500]


NOW_UTC = datetime(2026, 11, 26, 20, 30, tzinfo=UTC)
URL = "http://partner.example/pb?a=%20b&c='d'"


@pytest.mark.parametrize(
    ("template", "rows", "width"),
    [
        # shared objects (clock reading, None, int, a URL with % and ') are quoted once
        (None, [("a", NOW_UTC, None, 1, URL), ("b", NOW_UTC, None, 1, URL)], 1),
        ("(%s::TEXT, %s::timestamptz, %s::TEXT, %s::INTEGER, %s::TEXT)",
         [("a", NOW_UTC, None, 1, URL), ("b", NOW_UTC, None, 1, URL)], 1),
        # equal but not the same object (an aware time in another zone, True == 1): per row
        (None, [("a", NOW_UTC, 1), ("b", NOW_UTC.astimezone(timezone(timedelta(hours=2))),
                                    True)], 3),
        # equal values of one type read from each row (str, int, a time in the same zone):
        # quoted once too
        (None, [("a", "approved", 7, datetime(2026, 1, 2, tzinfo=UTC), "x"),
                ("b", "".join(["appro", "ved"]), 7, datetime(2026, 1, 2, tzinfo=UTC), "y")], 2),
        # equal but quoted apart (0.0 and -0.0; the same time naive and aware): per row
        (None, [("a", 0.0, datetime(2026, 1, 2)), ("b", -0.0, datetime(2026, 1, 2, tzinfo=UTC))],
         3),
        # every value shared: the first column stays per row
        (None, [("a", None), ("a", None)], 1),
        # one row, or another % in the template: unchanged
        (None, [("a", None)], 2),
        ("(%s, '100%%')", [("a",), ("a",)], 1),
    ],
)
def test_hoist_shared_gives_the_same_statement(store: Store, template: str | None,
                                               rows: list[tuple[Any, ...]],
                                               width: int) -> None:
    plain = template or "(" + ",".join(["%s"] * len(rows[0])) + ")"
    with store.engine.connect() as conn:
        cursor = conn.connection.cursor()
        want = b",".join(cursor.mogrify(plain, r) for r in rows)
        shared, rest = hoist_shared(cursor, template, rows)
        assert b",".join(cursor.mogrify(shared, r) for r in rest) == want
        assert len(rest[0]) == width


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris"])
def test_fetch_dicts_reads_what_sqlalchemy_reads(store: Store, zone: str) -> None:
    """The driver-cursor reads give the same dicts as SQLAlchemy's rows: text, integers,
    booleans, NULLs, and times made UTC whatever the session's time zone."""
    from sqlalchemy import select, update

    from postback_worker.store import schema as t
    from postback_worker.store.journal import Journal
    from postback_worker.store.sql import fetch_dicts

    add_click(store, "tx-f1", aff_sub="s1")
    Journal(store).record([conversion("tx-f1", payout="2.5", ip="10.0.0.1")])
    stmts = [select(t.clicks), select(t.conversions),
             update(t.conversions).values(reason="r").returning(
                 t.conversions.c.id, t.conversions.c.received_at, t.conversions.c.processed_at)]
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"SET LOCAL TIME ZONE '{zone}'")
        for stmt in stmts:
            want = [dict(r) for r in conn.execute(stmt).mappings()]
            got = fetch_dicts(conn, stmt)
            assert got == want and len(got) == 1
            for key, value in got[0].items():
                assert type(value) is type(want[0][key]), key
                if isinstance(value, datetime):
                    assert value.tzinfo is UTC and str(value) == str(want[0][key]), key
