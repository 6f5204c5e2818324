"""Admission: which claimed postbacks of a partner fire now, and which wait (attempts kept).

One small interface over the guardrails:

- `PausesOnly`  pauses (read from PostgreSQL) and nothing else: runs without Redis (tests,
                tools). Results are not counted anywhere.
- `Guarded`     pauses, then the circuit breaker, the concurrency cap and the rate limit,
                shared through Redis (`pipeline.guardrails`). If Redis fails, the partner is
                fired unguarded (logged), never stalled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from redis.exceptions import RedisError

from postback_worker.domain.failures import NOT_THE_PARTNERS, RETRYABLE, FailureClass
from postback_worker.pipeline.catalog import Partner
from postback_worker.pipeline.guardrails import Guardrails, Limits
from postback_worker.settings import Settings
from postback_worker.store.postbacks import Claimed
from postback_worker.store.repo import Store

log = logging.getLogger(__name__)


@dataclass
class Admitted:
    """One partner's claimed postbacks: those that fire now, those that wait (until, why),
    and the one that probes a half-open circuit, if any."""

    fire: list[Claimed] = field(default_factory=list)
    wait: list[tuple[Claimed, datetime, str]] = field(default_factory=list)
    probe: str | None = None


class Admission(Protocol):
    def admit(self, partner: Partner, group: list[Claimed], now: datetime) -> Admitted: ...

    def observe(self, partner: Partner, postback_id: str, failure: FailureClass,
                retry_after: float | None, probe: bool, now: datetime) -> None:
        """One answer: counted for the breaker (sent at the next `report`), slot freed."""

    def report(self, now: datetime) -> None:
        """Send the answers observed since the last report."""


class PausesOnly:
    """A paused partner's postbacks wait; everything else fires."""

    def __init__(self, settings: Settings, store: Store,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self._monotonic = monotonic
        self._limits: dict[str, Limits] = {}
        self._loaded_at = float("-inf")

    def limits(self, partner_id: str) -> Limits:
        """The partner's pause and limits, cached like the catalog."""
        mono = self._monotonic()
        stale = mono - self._loaded_at >= self.settings.delivery.config_cache_seconds
        if stale or partner_id not in self._limits:
            self._limits = {
                r["id"]: Limits(paused=bool(r["paused"]), paused_reason=r["paused_reason"],
                                rate_limit=r["rate_limit"], max_concurrency=r["max_concurrency"],
                                timeout=float(r["timeout"]))
                for r in self.store.list_partners()
            }
            self._loaded_at = mono
        return self._limits.get(partner_id, Limits())

    def admit(self, partner: Partner, group: list[Claimed], now: datetime) -> Admitted:
        limits = self.limits(partner.id)
        if not limits.paused:
            return Admitted(fire=list(group))
        why = "partner paused" + (f" ({limits.paused_reason})" if limits.paused_reason
                                  else "") + "; 'postback-worker partners resume' releases it"
        later = now + timedelta(seconds=self.settings.oncall.pause_recheck)
        return Admitted(wait=[(c, later, why) for c in group])

    def observe(self, partner: Partner, postback_id: str, failure: FailureClass,
                retry_after: float | None, probe: bool, now: datetime) -> None:
        return None

    def report(self, now: datetime) -> None:
        return None


@dataclass
class _Stats:
    total: int = 0
    failed: int = 0
    probe_ok: bool | None = None
    hold_until: float | None = None


class Guarded(PausesOnly):
    """Pauses, circuit breaker, concurrency cap and rate limit (Redis)."""

    def __init__(self, settings: Settings, store: Store, redis_client: Any,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(settings, store, monotonic)
        self.guard = Guardrails(redis_client, settings)
        self._stats: dict[str, _Stats] = {}
        self._slotted: set[str] = set()

    def admit(self, partner: Partner, group: list[Claimed], now: datetime) -> Admitted:
        paused = super().admit(partner, group, now)
        if not paused.fire:
            return paused
        limits = self.limits(partner.id)
        try:
            verdict = self.guard.admit(partner.id, [c.id for c in group], limits,
                                       now.timestamp())
        except RedisError as exc:
            log.warning("guardrails unavailable (%s); firing partner %s unguarded", exc,
                        partner.id)
            return Admitted(fire=list(group))
        by_id = {c.id: c for c in group}
        out = Admitted(probe=verdict.probe)
        out.wait = [(by_id[pid], now + timedelta(seconds=delay), why)
                    for pid, (delay, why) in verdict.wait.items()]
        out.fire = [by_id[i] for i in verdict.fire]
        if limits.max_concurrency:
            self._slotted.add(partner.id)
        return out

    def observe(self, partner: Partner, postback_id: str, failure: FailureClass,
                retry_after: float | None, probe: bool, now: datetime) -> None:
        if failure in NOT_THE_PARTNERS:  # our egress proxy failed: says nothing of the partner
            self._free_slot(partner, postback_id)
            return
        stats = self._stats.setdefault(partner.id, _Stats())
        stats.total += 1
        if failure in RETRYABLE:
            stats.failed += 1
        if probe:
            stats.probe_ok = failure not in RETRYABLE
        if failure == FailureClass.THROTTLED and retry_after:
            cap = partner.policy(self.settings.retry).max_retry_after
            until = now.timestamp() + min(retry_after, cap)
            stats.hold_until = max(stats.hold_until or 0.0, until)
        self._free_slot(partner, postback_id)

    def _free_slot(self, partner: Partner, postback_id: str) -> None:
        if partner.id in self._slotted:
            try:
                self.guard.release_slots(partner.id, [postback_id])
            except RedisError as exc:
                log.warning("could not free a concurrency slot (it expires): %s", exc)

    def report(self, now: datetime) -> None:
        """Send batched results to the breaker; a closed circuit releases waiting postbacks."""
        stats, self._stats = self._stats, {}
        for partner_id, st in stats.items():
            try:
                before, after = self.guard.record(
                    partner_id, now=now.timestamp(), total=st.total, failed=st.failed,
                    probe_ok=st.probe_ok, retry_after_until=st.hold_until)
            except RedisError as exc:
                log.warning("could not record results for the circuit breaker: %s", exc)
                continue
            if before != "closed" and after == "closed":
                woke = self.store.wake_waiting(partner_id, now)
                log.warning("partner %s circuit closed; %d waiting postbacks released",
                            partner_id, woke)
