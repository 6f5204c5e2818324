"""The intake journal on real PostgreSQL (and SQLite, the embedded default): record, claim in
bulk with FOR UPDATE SKIP LOCKED, and what counts as waiting."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from support.helpers import NOW, conversion

from postback_worker.dev.services import free_port
from postback_worker.store import schema as t
from postback_worker.store.db import make_engine, upgrade
from postback_worker.store.journal import Journal, JournalUnavailable, LoopJournal
from postback_worker.store.repo import Store


def _events(n: int, start: int = 0) -> list:  # type: ignore[type-arg]
    return [conversion(f"tx{i}", now=NOW + timedelta(seconds=i), id=f"cv{i:03d}")
            for i in range(start, start + n)]


def test_workers_claim_disjoint_batches_oldest_first(store: Store) -> None:
    journal = Journal(store)
    journal.record(_events(5))
    journal.record(_events(2))  # the same ids again: nothing new
    later = NOW + timedelta(hours=1)
    with store.engine.begin() as first:
        mine = journal.claim(first, 3, reattributed_before=later)
        assert [r["id"] for r in mine] == ["cv000", "cv001", "cv002"]
        # A second worker meanwhile skips the locked rows instead of waiting for them.
        with store.engine.begin() as second:
            theirs = journal.claim(second, 10, reattributed_before=later)
        assert [r["id"] for r in theirs] == ["cv003", "cv004"]
    assert journal.pending(later) == 5  # nobody changed their state: all still waiting


def test_fresh_reattributions_wait_for_their_run(store: Store) -> None:
    journal = Journal(store)
    journal.record(_events(3))
    with store.engine.begin() as conn:
        conn.execute(update(t.conversions).where(t.conversions.c.id == "cv001")
                     .values(reattributed_at=NOW + timedelta(minutes=5)))
    cutoff = NOW + timedelta(minutes=1)
    with store.engine.begin() as conn:
        assert [r["id"] for r in journal.claim(conn, 10, reattributed_before=cutoff)] == [
            "cv000", "cv002"]
    # Handed back long ago and still waiting: its run's message was lost; intake takes it.
    with store.engine.begin() as conn:
        assert len(journal.claim(conn, 10, reattributed_before=cutoff + timedelta(hours=1))) == 3
    # Received before NOW+2s: cv000 and cv001, but cv001 belongs to its run until then.
    assert journal.pending(NOW + timedelta(seconds=2)) == 1
    assert journal.pending(NOW + timedelta(hours=1)) == 3


def test_journal_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pbw.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        journal = Journal.over(engine)
        journal.record(_events(4))
        with engine.begin() as conn:
            got = journal.claim(conn, 3, reattributed_before=NOW + timedelta(hours=1))
        assert [r["id"] for r in got] == ["cv000", "cv001", "cv002"]
        assert got[0]["state"] == "received" and got[0]["received_at"] == NOW
    finally:
        engine.dispose()


def _stored(store: Store) -> list[tuple[str, str]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            select(t.conversions.c.id, t.conversions.c.state).order_by(t.conversions.c.id))]


def test_loop_journal_commits_on_the_event_loop_and_reconnects(store: Store) -> None:
    """The API's journal: a group is one INSERT on an asynchronous connection; a connection
    the server dropped is replaced on the next group; the same ids again add nothing."""
    loop_journal = LoopJournal(Journal(store))

    async def scenario() -> None:
        await loop_journal.record(_events(3))
        pid = loop_journal._conn.get_backend_pid()
        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        await loop_journal.record(_events(4))  # cv000-002 again, and cv003
        assert loop_journal._conn.get_backend_pid() != pid

    try:
        asyncio.run(scenario())
    finally:
        loop_journal.close()
    assert _stored(store) == [(f"cv{i:03d}", "received") for i in range(4)]


def test_loop_journal_raises_when_the_database_is_unreachable(store: Store) -> None:
    """Nothing is acknowledged that is not stored: an unreachable server is JournalUnavailable
    (the API answers 503), after one retry on a new connection."""
    url = store.engine.url.set(port=free_port())  # nothing listens there
    engine = make_engine(url.render_as_string(hide_password=False))
    loop_journal = LoopJournal(Journal(Store(engine)), timeout=5)
    try:
        with pytest.raises(JournalUnavailable, match="nothing was accepted"):
            asyncio.run(loop_journal.record(_events(1)))
    finally:
        loop_journal.close()
        engine.dispose()
    assert _stored(store) == []


def test_loop_journal_on_sqlite_goes_through_a_thread(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pbw.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        asyncio.run(LoopJournal(Journal.over(engine)).record(_events(2)))
        assert _stored(Store(engine)) == [("cv000", "received"), ("cv001", "received")]
    finally:
        engine.dispose()
