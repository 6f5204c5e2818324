"""Partner health (circuit, limits, backlog, recent success) and manual pause/resume/limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from postback_worker.domain import guards as g
from postback_worker.errors import UnknownPartner
from postback_worker.ops.oncall.replay import rerender_waiting
from postback_worker.pipeline.guardrails import Guardrails
from postback_worker.settings import Settings
from postback_worker.store.figures import figures_for
from postback_worker.store.repo import Store


def _ts(value: float) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value else None


def health(store: Store, settings: Settings, redis_client: Any | None,
           now: datetime) -> list[dict[str, Any]]:
    """One row per partner: pause, circuit, limits, in flight, waiting, dead letters, last hour."""
    waiting, dead, recent = store.partner_counts(now - timedelta(hours=1))
    held = store.held_by_partner()
    guard = Guardrails(redis_client, settings) if redis_client is not None else None
    backlog = figures_for(store).backlog_by_partner()
    rows = []
    for p in store.list_partners():
        pid = p["id"]
        attempts, ok = recent.get(pid, (0, 0))
        row: dict[str, Any] = {
            "partner_id": pid, "enabled": bool(p["enabled"]), "paused": bool(p["paused"]),
            "paused_reason": p["paused_reason"], "paused_at": p["paused_at"],
            "paused_by": p.get("paused_by"),
            "circuit": "unknown", "circuit_reason": None, "next_probe_at": None,
            "window_attempts": None, "window_failed": None,
            "rate_limit": p["rate_limit"], "max_concurrency": p["max_concurrency"],
            "in_flight": None, "waiting": int(waiting.get(pid, 0)),
            # Seconds since its oldest undelivered postback was created (None: no backlog).
            "backlog_age_seconds": (max(0.0, (now - backlog[pid][1]).total_seconds())
                                    if pid in backlog else None),
            "dead_letters": int(dead.get(pid, 0)), "attempts_last_hour": attempts,
            # Of those waiting: held for a hold period; behind a dead-lettered earlier event.
            "held": held.get(pid, {}).get("held", 0),
            "behind_dead_letter": held.get(pid, {}).get("blocked", 0),
            "success_rate_last_hour": round(ok / attempts, 3) if attempts else None,
        }
        if guard is not None:
            c = guard.circuit(pid)
            total, failed = guard.window(pid, now.timestamp())
            row.update(circuit=c.state, circuit_reason=c.reason or None,
                       next_probe_at=_ts(c.retry_at) if c.state == g.OPEN else None,
                       window_attempts=total, window_failed=failed,
                       in_flight=guard.inflight(pid, now.timestamp()))
            if c.hold_until > now.timestamp():
                row["retry_after_until"] = _ts(c.hold_until)
        rows.append(row)
    return rows


def _set(store: Store, partner_id: str, **values: Any) -> None:
    if not store.set_partner_fields(partner_id, **values):
        raise UnknownPartner(partner_id)


def pause(store: Store, partner_id: str, reason: str | None, now: datetime) -> None:
    """Stop firing to the partner; its postbacks wait (no attempts spent) until resumed."""
    if store.set_paused(partner_id, True, reason=reason, by="operator", now=now) is None:
        raise UnknownPartner(partner_id)


def resume(store: Store, settings: Settings, redis_client: Any | None, partner_id: str,
           now: datetime) -> int:
    """Fire again: clear the pause, close an open circuit, make waiting postbacks due now.

    After a 410 Gone pause the waiting postbacks are first rendered again with the partner's
    current templates (the endpoint they were rendered for is gone).

    Returns how many waiting postbacks were released.
    """
    row = store.get_partner(partner_id)
    if store.set_paused(partner_id, False, reason=None, by=None, now=now) is None:
        raise UnknownPartner(partner_id)
    if row is not None and row.get("paused_by") == "gone":
        rerender_waiting(store, partner_id, now)
    if redis_client is not None:
        Guardrails(redis_client, settings).close(partner_id, now.timestamp())
    return store.wake_waiting(partner_id, now)


def set_limits(store: Store, partner_id: str, *, rate_limit: float | None,
               max_concurrency: int | None, now: datetime) -> None:
    """Requests per second and at once across all workers (None or 0: unlimited)."""
    _set(store, partner_id, rate_limit=rate_limit or None, max_concurrency=max_concurrency or None,
         updated_at=now)
