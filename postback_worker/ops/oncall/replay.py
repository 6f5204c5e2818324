"""Safe dead-letter replay: dry run, atomic hand-back to the pipeline, bounded rate, tally.

A replay moves each selected dead letter from `dead_lettered` to `queued` in one guarded
UPDATE (only rows still dead move, so two runs never both take one postback), renders its URL
again from the stored conversion and click with the partner's CURRENT template, and records
the run on each postback (`triggered_by`) and in `replay_runs`. The `replay` queue then feeds
them to the normal claim/lease protocol at a bounded rate: a delivered postback is never fired
again, whatever is replayed or redelivered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from postback_worker.domain.deadletters import Filter
from postback_worker.domain.ids import new_id
from postback_worker.domain.macros import TemplateError
from postback_worker.domain.masking import mask_url
from postback_worker.domain.postback import PostbackState
from postback_worker.pipeline.lifecycle import rerender
from postback_worker.settings import Settings
from postback_worker.store.repo import Store
from postback_worker.store.runs import marker

# enqueue(task name, args): publishes a task on the `replay` queue.
Enqueue = Callable[[str, list[Any]], None]


@dataclass
class Candidate:
    postback_id: str
    partner_id: str
    failure_class: str
    old_url: str
    new_url: str | None
    problem: str | None = None
    new_body: str | None = None

    @property
    def rerendered(self) -> bool:
        return self.new_url is not None and self.new_url != self.old_url

    def as_dict(self) -> dict[str, Any]:
        return {"postback_id": self.postback_id, "partner_id": self.partner_id,
                "failure_class": self.failure_class, "url": mask_url(self.new_url or self.old_url),
                "previous_url": mask_url(self.old_url), "rerendered": self.rerendered,
                "problem": self.problem}


@dataclass
class Plan:
    """What a replay selects: candidates that can go, and those that cannot (with why)."""

    filt: Filter
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def ready(self) -> list[Candidate]:
        return [c for c in self.candidates if c.problem is None]

    @property
    def rerendered(self) -> int:
        return sum(1 for c in self.ready if c.rerendered)


def plan(store: Store, filt: Filter, now: datetime, limit: int | None = None) -> Plan:
    """Select dead letters and render their URLs with the partners' current templates."""
    rows, convs, clicks = store.replay_selection(filt, limit)
    out = Plan(filt)
    out.candidates = _candidates(store, rows, convs, clicks, now)
    return out


def _candidates(store: Store, rows: list[dict[str, Any]], convs: dict[str, dict[str, Any]],
                clicks: dict[str, dict[str, Any]], now: datetime) -> list[Candidate]:
    """Render postbacks (rows: postback_id, partner_id, failure_class, url, conversion_id)
    again from their stored conversion and click with the partners' current templates."""
    history = store.conversion_history(list(convs))
    partners = {p["id"]: p for p in store.list_partners()}
    offers = {o["id"]: o for o in store.list_offers()}
    out: list[Candidate] = []
    for r in rows:
        cand = Candidate(r["postback_id"], r["partner_id"], r["failure_class"], r["url"], None)
        partner = partners.get(r["partner_id"])
        conv = convs.get(r["conversion_id"])
        click = clicks.get(conv["transaction_id"]) if conv else None
        if partner is None:
            cand.problem = "partner no longer exists"
        elif not partner["enabled"]:
            cand.problem = "partner is disabled"
        elif conv is None or click is None:
            cand.problem = "conversion or click no longer stored (retention)"
        else:
            try:
                cand.new_url, cand.new_body = rerender(
                    partner, offers.get(conv["offer_id"]), conv, click, r["event"],
                    history.get((r["conversion_id"], r["event_seq"])), r["postback_id"],
                    now)
            except TemplateError as exc:
                cand.problem = f"current template cannot render: {exc}"
        out.append(cand)
    return out


def rerender_waiting(store: Store, partner_id: str, now: datetime) -> int:
    """Render a partner's waiting postbacks again with its current templates (after a 410
    Gone pause, the endpoint they were rendered for no longer exists). Returns how many."""
    rows, convs, clicks = store.waiting_selection(partner_id)
    fresh = [c for c in _candidates(store, rows, convs, clicks, now) if c.new_url is not None]
    return store.set_rendered([{"id": c.postback_id, "url": c.new_url, "body": c.new_body}
                               for c in fresh], now)


@dataclass
class Run:
    id: str
    kind: str
    triggered_by: str
    selected: int
    queued: int
    rerendered: int
    skipped: list[Candidate]
    dry_run: bool


def record_run(store: Store, *, kind: str, who: str, filters: dict[str, Any], dry_run: bool,
               selected: int, now: datetime, prefix: str = "rr") -> str:
    run_id = new_id(prefix)
    store.record_run(run_id=run_id, kind=kind, who=who, filters=filters, dry_run=dry_run,
                     selected=selected, now=now)
    return run_id


def start(store: Store, settings: Settings, filt: Filter, *, who: str, rate: float,
          now: datetime, enqueue: Enqueue | None, dry_run: bool = False,
          limit: int | None = None) -> tuple[Run, Plan]:
    """Plan, and unless `dry_run`, hand the dead letters back and enqueue the run driver."""
    p = plan(store, filt, now, limit)
    ready = p.ready
    filters = {**filt.as_dict(), "rate": rate, **({"limit": limit} if limit else {})}
    run_id = record_run(store, kind="replay", who=who, filters=filters, dry_run=dry_run,
                        selected=len(ready), now=now)
    skipped = [c for c in p.candidates if c.problem is not None]
    if dry_run or not ready:
        return Run(run_id, "replay", who, len(ready), 0, p.rerendered, skipped, dry_run), p
    tag = (marker("replay", run_id) + who)[:200]
    queued = _hand_back(store, settings, ready, tag, run_id, rate, now)
    if queued and enqueue is not None:
        enqueue(TASK_REPLAY_RUN, [run_id, rate])
    return Run(run_id, "replay", who, len(ready), queued, p.rerendered, skipped, False), p


def _hand_back(store: Store, settings: Settings, ready: list[Candidate], tag: str, run_id: str,
               rate: float, now: datetime) -> int:
    """Atomically move still-dead postbacks to `queued`; returns how many moved."""
    # The run driver takes them in this order; the sweeper is a safety net only if the
    # driver falls `requeue_after` seconds behind its schedule.
    def due_at(n: int) -> datetime:
        return now + timedelta(seconds=n / rate + settings.sweep.requeue_after)

    return store.requeue_dead([(c.postback_id, c.new_url) for c in ready], due_at=due_at,
                              tag=tag, reason=f"replay run {run_id} queued", now=now,
                              bodies={c.postback_id: c.new_body for c in ready})


TASK_REPLAY_RUN = "postback_worker.replay_run"
TASK_REATTRIBUTE_RUN = "postback_worker.reattribute_run"


def next_chunk(store: Store, kind: str, run_id: str, size: int) -> list[str]:
    """The run's postbacks still waiting in `queued`, in schedule order."""
    return store.run_next_chunk(kind, run_id, size)


def tally(store: Store, kind: str, run_id: str) -> dict[str, int]:
    """delivered / failed (dead-lettered again) / pending, over the run's postbacks."""
    counts = store.run_states(kind, run_id)
    delivered = counts.pop(PostbackState.DELIVERED, 0)
    failed = counts.pop(PostbackState.DEAD_LETTERED, 0) + counts.pop(PostbackState.SKIPPED, 0)
    return {"delivered": delivered, "failed": failed, "pending": sum(counts.values())}


def save_tally(store: Store, kind: str, run_id: str, now: datetime) -> dict[str, int]:
    """Store the current tally on the run; finished once nothing is pending."""
    counts = tally(store, kind, run_id)
    store.save_run_tally(run_id, counts, now)
    return counts


def get_run(store: Store, run_id: str) -> dict[str, Any] | None:
    row = store.get_run(run_id)
    if row is None:
        return None
    row["filters"] = json.loads(row["filters"])
    if not row["dry_run"]:
        row["tally"] = tally(store, row["kind"], run_id)
    return row


def chunking(rate: float) -> tuple[int, float]:
    """(postbacks per step, seconds per step) for a rate in postbacks per second."""
    size = max(1, int(rate))
    return size, size / rate


def parse_rate(text: str) -> float:
    """'10', '10/s' or '2.5/s' -> postbacks per second (positive, at most 10000)."""
    raw = text.strip().lower().removesuffix("/s").strip()
    try:
        rate = float(raw)
    except ValueError:
        raise ValueError("must be a rate such as 10/s") from None
    if not 0 < rate <= 10000:
        raise ValueError("must be between 0 and 10000 per second")
    return rate


def celery_enqueue(settings: Settings) -> Enqueue:
    """An `Enqueue` that publishes to the `replay` queue of the settings' broker."""
    from celery import Celery

    from postback_worker.worker.queues import REPLAY

    app = Celery("postback_worker_oncall", broker=settings.redis.effective_broker_url)
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True,
                    broker_transport_options=settings.redis.broker_transport_options())

    def enqueue(name: str, args: list[Any]) -> None:
        app.send_task(name, args=args, queue=REPLAY, retry=True,
                      retry_policy={"max_retries": 3, "interval_start": 0.1})

    return enqueue
