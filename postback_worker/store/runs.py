"""Replay and re-attribution runs: the run record, its postbacks' progress and tally."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update

from postback_worker.domain.postback import PostbackState
from postback_worker.store import schema as t
from postback_worker.store.sql import StoreBase


def marker(kind: str, run_id: str) -> str:
    """Prefix of `postbacks.triggered_by` for one run, e.g. 'replay rr_x by alice'."""
    return f"{kind} {run_id} by "


class RunRecords(StoreBase):
    def record_run(self, *, run_id: str, kind: str, who: str, filters: dict[str, Any],
                   dry_run: bool, selected: int, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(t.replay_runs).values(
                id=run_id, kind=kind, triggered_by=who[:200],
                filters=json.dumps(filters, default=str, sort_keys=True), dry_run=dry_run,
                selected=selected, created_at=now))

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.replay_runs).where(t.replay_runs.c.id == run_id)
                               ).mappings().first()
        return None if row is None else dict(row)

    def run_next_chunk(self, kind: str, run_id: str, size: int) -> list[str]:
        """The run's postbacks still waiting in `queued`, in schedule order."""
        pb = t.postbacks.c
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(
                select(pb.id).where(pb.state == PostbackState.QUEUED,
                                    pb.triggered_by.like(marker(kind, run_id) + "%"))
                .order_by(pb.next_attempt_at, pb.id).limit(size))]

    def run_states(self, kind: str, run_id: str) -> dict[str, int]:
        """How many of the run's postbacks are in each state."""
        pb = t.postbacks.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(pb.state, func.count()).where(
                pb.triggered_by.like(marker(kind, run_id) + "%")).group_by(pb.state)).all()
        return {state: int(n) for state, n in rows}

    def save_run_tally(self, run_id: str, counts: dict[str, int], now: datetime) -> None:
        """Store the tally on the run; finished once nothing is pending."""
        with self.engine.begin() as conn:
            conn.execute(update(t.replay_runs).where(t.replay_runs.c.id == run_id).values(
                delivered=counts["delivered"], failed=counts["failed"],
                pending=counts["pending"],
                finished_at=now if counts["pending"] == 0 else None))
