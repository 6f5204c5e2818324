"""Celery tasks for on-call work on the `replay` queue: replay runs and re-attribution.

A replay run is driven by one task that fires a chunk of the run's postbacks and re-publishes
itself about a second later (a short countdown, never a long one), so a run goes at its rate
however many workers there are. Its postbacks stay `queued` in PostgreSQL with a
`next_attempt_at`, so the beat sweeper picks them up if the driver's chain is ever lost.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task

from postback_worker.ops.oncall import replay
from postback_worker.settings import Settings
from postback_worker.worker.queues import REPLAY
from postback_worker.worker.tasks import DB_RETRY


def drive_replay(pipeline: Any, run_id: str, rate: float) -> tuple[dict[str, Any], float | None]:
    """Fire the run's next chunk; returns (result, seconds until the next chunk or None)."""
    size, period = replay.chunking(rate)
    started = time.monotonic()
    ids = replay.next_chunk(pipeline.store, "replay", run_id, size)
    result = pipeline.deliver(ids).as_dict() if ids else {"postbacks": {}}
    if replay.next_chunk(pipeline.store, "replay", run_id, 1):
        return result, max(0.0, period - (time.monotonic() - started))
    result["tally"] = replay.save_tally(pipeline.store, "replay", run_id, datetime.now(UTC))
    return result, None


def register(app: Celery) -> None:
    """Register this module's tasks on `app`."""
    services = app.postback_services  # type: ignore[attr-defined]

    @app.task(name=replay.TASK_REPLAY_RUN, bind=True, **DB_RETRY)
    def replay_run(self: Task, run_id: str, rate: float) -> dict[str, Any]:
        result, again = drive_replay(services.pipeline, run_id, rate)
        if again is not None:
            replay_run.apply_async((run_id, rate), queue=REPLAY, countdown=again)
        return result

    @app.task(name=replay.TASK_REATTRIBUTE_RUN, bind=True, **DB_RETRY)
    def reattribute_run(self: Task, run_id: str, conversion_ids: list[str],
                        triggered_by: str) -> dict[str, Any]:
        pipeline = services.pipeline
        result: dict[str, Any] = pipeline.reprocess(conversion_ids, triggered_by).as_dict()
        result["tally"] = replay.save_tally(pipeline.store, "reattribute", run_id,
                                            datetime.now(UTC))
        return result


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat entries (name -> entry) for this module's periodic tasks.

    None: circuit probes are the partner's own waiting postbacks, which become due when the
    cool-down ends and are swept like any retry.
    """
    return {}
