"""GroupCommit: concurrent callers share commits; every caller hears its group's outcome."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from postback_worker.producer import GroupCommit, _Waker


class Log:
    """A commit step that records its batches; it fails on events named 'bad'."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.after: list[list[Any]] = []
        self.gate = threading.Event()
        self.gate.set()

    def commit(self, events: list[Any]) -> None:
        self.gate.wait(5)
        self.batches.append(list(events))
        if "bad" in events:
            raise RuntimeError("commit failed")

    def woke(self, events: list[Any]) -> None:
        self.after.append(list(events))


def test_a_lone_caller_commits_at_once() -> None:
    log = Log()
    group = GroupCommit(log.commit, log.woke, max_events=10)
    group.submit(["a"])  # type: ignore[list-item]
    group.submit(["b", "c"])  # type: ignore[list-item]
    assert log.batches == [["a"], ["b", "c"]] and log.after == log.batches


@pytest.mark.parametrize(("max_events", "largest"), [(1, 1), (4, 4), (100, 8)])
def test_callers_waiting_during_a_commit_share_the_next(max_events: int, largest: int) -> None:
    log = Log()
    log.gate.clear()  # the first commit blocks until every other caller waits
    group = GroupCommit(log.commit, log.woke, max_events=max_events)
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(group.submit, ["first"])
        while not group._busy:
            threading.Event().wait(0.001)
        others = [pool.submit(group.submit, [f"e{i}"]) for i in range(8)]
        while len(group._queue) < 8:
            threading.Event().wait(0.001)
        log.gate.set()
        for f in [first, *others]:
            f.result(5)
    committed = [e for b in log.batches for e in b]
    assert sorted(committed) == sorted(["first", *(f"e{i}" for i in range(8))])
    assert max(len(b) for b in log.batches[1:]) == largest
    assert all(len(b) <= max(1, max_events) for b in log.batches[1:])


def test_a_failed_commit_fails_its_whole_group_and_the_next_one_proceeds() -> None:
    log = Log()
    log.gate.clear()
    group = GroupCommit(log.commit, log.woke, max_events=100)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(group.submit, ["first"])
        while not group._busy:
            threading.Event().wait(0.001)
        bad = pool.submit(group.submit, ["bad"])
        good = pool.submit(group.submit, ["good"])
        while len(group._queue) < 2:
            threading.Event().wait(0.001)
        log.gate.set()
        first.result(5)
        with pytest.raises(RuntimeError, match="commit failed"):
            bad.result(5)
        with pytest.raises(RuntimeError, match="commit failed"):
            good.result(5)  # same group as "bad": nothing of it was committed
    group.submit(["later"])  # type: ignore[list-item]
    assert log.batches[-1] == ["later"]
    assert ["bad", "good"] not in log.after


def test_waker_sends_at_once_then_coalesces_what_comes_during_its_pause() -> None:
    """The first ids go out at once; ids handed over while a wake-up is sent or during the
    pause after it share the next wake-up; flush waits for them; close sends what is left."""
    sent: list[list[str]] = []
    in_pause, resume = threading.Event(), threading.Event()

    def pause(seconds: float) -> None:
        assert seconds == 0.02
        in_pause.set()
        assert resume.wait(5)
        in_pause.clear()

    waker = _Waker(sent.append, coalesce=0.02, pause=pause)
    waker.wake(["a"])
    assert in_pause.wait(5)
    assert sent == [["a"]]  # the first wake-up did not wait
    waker.wake(["b"])
    waker.wake(["c", "d"])
    assert sent == [["a"]]  # paused: b, c and d wait for the next one
    resume.set()
    waker.flush()
    assert sent == [["a"], ["b", "c", "d"]]
    waker.close()
    assert sent == [["a"], ["b", "c", "d"]]
