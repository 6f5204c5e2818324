"""Per-partner rate limit, concurrency cap and circuit breaker, shared through Redis.

Redis keys (all per partner id):

- ``pbw:circuit:{pid}``          hash: state (closed|open|half_open), opened_at, retry_at,
                                 cooldown, probe_until, hold_until, reason, updated_at
- ``pbw:circuit:{pid}:window``   hash: t:{bucket} attempts, f:{bucket} retryable failures
- ``pbw:rate:{pid}``             hash: tokens, at (token bucket)
- ``pbw:inflight:{pid}``         sorted set: postback id -> expiry (concurrency slots)
- ``pbw:events``                 list: circuit opened/closed operator events (JSON), pushed in
                                 the transaction that changes the circuit, so exactly once;
                                 the operator-event relay moves them to PostgreSQL

Times stored are epoch seconds from the caller's clock. The state machine and bucket maths are
the pure functions of `domain.guards`; this module only loads, applies and saves them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from postback_worker.domain import guards as g
from postback_worker.domain.operator_events import circuit_transition
from postback_worker.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "pbw"


def circuit_key(partner_id: str) -> str:
    return f"{PREFIX}:circuit:{partner_id}"


def window_key(partner_id: str) -> str:
    return f"{PREFIX}:circuit:{partner_id}:window"


def rate_key(partner_id: str) -> str:
    return f"{PREFIX}:rate:{partner_id}"


def inflight_key(partner_id: str) -> str:
    return f"{PREFIX}:inflight:{partner_id}"


EVENTS_KEY = f"{PREFIX}:events"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def circuit_states(redis_client: Any, partner_ids: Iterable[str]) -> dict[str, str]:
    """partner id -> closed | open | half_open (closed when Redis knows nothing of it)."""
    ids = list(partner_ids)
    if not ids:
        return {}
    pipe = redis_client.pipeline(transaction=False)
    for pid in ids:
        pipe.hget(circuit_key(pid), "state")
    return {pid: _text(s) if s else g.CLOSED for pid, s in zip(ids, pipe.execute(), strict=True)}


def load_circuit(raw: dict[Any, Any]) -> g.Circuit:
    data = {_text(k): _text(v) for k, v in raw.items()}
    kwargs: dict[str, Any] = {}
    for f in fields(g.Circuit):
        if f.name in data:
            kwargs[f.name] = data[f.name] if f.name in {"state", "reason"} else float(data[f.name])
    return g.Circuit(**kwargs)


def dump_circuit(circuit: g.Circuit, now: float) -> dict[str, str]:
    out = {f.name: str(getattr(circuit, f.name)) for f in fields(g.Circuit)}
    out["updated_at"] = str(now)
    return out


# KEYS[1] bucket; ARGV: rate, burst, now, want, ttl. Mirrors domain.guards.take.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(h[1])
local at = tonumber(h[2])
if tokens == nil or at == nil then tokens = burst; at = now end
if now > at then tokens = math.min(burst, tokens + (now - at) * rate); at = now end
local granted = math.floor(tokens + 1e-9)
if granted > want then granted = want end
if granted < 0 then granted = 0 end
tokens = math.max(0, tokens - granted)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'at', string.format('%.17g', at))
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {granted, string.format('%.17g', tokens)}
"""

# KEYS[1] slots; ARGV: cap, now, expires_at, ttl, member... Slots of dead workers expire.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local got = {}
for i = 5, #ARGV do
  if free <= 0 then break end
  if redis.call('ZADD', KEYS[1], ARGV[3], ARGV[i]) == 1 then free = free - 1 end
  table.insert(got, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return got
"""


@dataclass(frozen=True)
class Limits:
    """A partner's manual controls as saved in the partners table."""

    paused: bool = False
    paused_reason: str | None = None
    rate_limit: float | None = None
    max_concurrency: int | None = None
    timeout: float = 10.0


@dataclass
class Verdict:
    """Which postbacks of one partner go now, and how long the others wait (and why)."""

    fire: list[str] = field(default_factory=list)
    probe: str | None = None
    wait: dict[str, tuple[float, str]] = field(default_factory=dict)


class Guardrails:
    """Admission and result recording for partners, against one Redis client."""

    def __init__(self, redis_client: Any, settings: Settings) -> None:
        self.redis = redis_client
        self.settings = settings
        self.config: g.BreakerConfig = settings.breaker
        self._take = redis_client.register_script(_TAKE)
        self._acquire = redis_client.register_script(_ACQUIRE)

    # -- circuit --------------------------------------------------------------------------

    def _update_circuit(self, partner_id: str, change: Any, now: float,
                        by: str = "probe") -> Any:
        """Apply change(circuit) -> (circuit, result) atomically (optimistic WATCH); an
        opening or closing also queues its operator event in the same transaction."""
        from redis.exceptions import WatchError

        key = circuit_key(partner_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    before = load_circuit(pipe.hgetall(key))
                    after, result = change(before)
                    pipe.multi()
                    if after != before:
                        pipe.hset(key, mapping=dump_circuit(after, now))
                    event = circuit_transition(
                        partner_id, before.state, after.state, reason=after.reason,
                        opened_at=before.opened_at or after.opened_at, retry_at=after.retry_at,
                        now=now, by=by)
                    if event is not None:
                        pipe.rpush(EVENTS_KEY, json.dumps(event))
                    pipe.execute()
                    return before, after, result
                except WatchError:
                    continue

    def circuit(self, partner_id: str) -> g.Circuit:
        return load_circuit(self.redis.hgetall(circuit_key(partner_id)))

    def window(self, partner_id: str, now: float) -> tuple[int, int]:
        raw = self.redis.hgetall(window_key(partner_id))
        return g.window_counts(_buckets(raw), now, self.config)

    def close(self, partner_id: str, now: float) -> g.Circuit:
        """Close the circuit by hand (an operator resumed the partner)."""
        self.redis.delete(window_key(partner_id))
        _, after, _ = self._update_circuit(
            partner_id, lambda c: (g.Circuit(hold_until=c.hold_until), None), now, "operator")
        return after  # type: ignore[no-any-return]

    # -- admission ------------------------------------------------------------------------

    def admit(self, partner_id: str, postback_ids: Sequence[str], limits: Limits,
              now: float) -> Verdict:
        """Decide, for one partner's claimed postbacks, which fire now and which wait."""
        verdict = Verdict()
        ids = list(postback_ids)
        if self.settings.breaker.enabled:
            _, _, admission = self._update_circuit(
                partner_id, lambda c: g.admit(c, now, self.config), now)
        else:  # the partner's Retry-After still holds every postback to it
            admission = g.holding(self.circuit(partner_id), now) or g.Admission("all")
        if admission.verdict != "all":
            if admission.verdict == "none":
                wait = max(admission.wait, 0.05)
                for i, pid in enumerate(ids):
                    # spread the wake-ups a little so they do not all land on one sweep
                    verdict.wait[pid] = (wait + 0.01 * i, admission.reason)
                return verdict
            if admission.verdict == "probe":
                verdict.probe = ids[0]
                for pid in ids[1:]:
                    verdict.wait[pid] = (self.config.probe_timeout / 3, admission.reason)
                ids = ids[:1]
        if limits.max_concurrency:
            expires = now + limits.timeout * 2 + self.settings.delivery.lease_seconds
            got = self._acquire(
                keys=[inflight_key(partner_id)],
                args=[limits.max_concurrency, now, expires,
                      int(limits.timeout * 2 + self.settings.delivery.lease_seconds) + 60, *ids])
            acquired = {_text(x) for x in got}
            spare = self.settings.oncall.guard_wait
            for i, pid in enumerate(p for p in ids if p not in acquired):
                verdict.wait[pid] = (spare + 0.05 * i,
                                     f"concurrency cap of {limits.max_concurrency} reached")
            ids = [p for p in ids if p in acquired]
        if limits.rate_limit and ids:
            rate = float(limits.rate_limit)
            granted_raw, tokens = self._take(
                keys=[rate_key(partner_id)],
                args=[rate, g.burst_for(rate), now, len(ids), int(g.burst_for(rate) / rate) + 60])
            granted = int(granted_raw)
            bucket = g.Bucket(float(_text(tokens)), now)
            denied = ids[granted:]
            for i, pid in enumerate(denied, start=1):
                delay = max(0.05, g.wait_for(bucket, i, rate))
                verdict.wait[pid] = (delay, f"rate limit of {rate:g}/s reached")
            if denied and limits.max_concurrency:
                self.release_slots(partner_id, denied)
            ids = ids[:granted]
        if verdict.probe is not None and verdict.probe not in ids:
            verdict.probe = None  # the probe itself had to wait: let another worker probe
            self._update_circuit(partner_id, lambda c: (
                c if c.state != g.HALF_OPEN else replace(c, probe_until=0.0), None), now)
        verdict.fire = ids
        return verdict

    def release_slots(self, partner_id: str, postback_ids: Sequence[str]) -> None:
        if postback_ids:
            self.redis.zrem(inflight_key(partner_id), *postback_ids)

    # -- results --------------------------------------------------------------------------

    def record(self, partner_id: str, *, now: float, total: int, failed: int,
               probe_ok: bool | None, retry_after_until: float | None) -> tuple[str, str]:
        """Count results in the window and move the circuit; returns (state before, after)."""
        if not self.settings.breaker.enabled:
            if retry_after_until is not None:
                self._update_circuit(partner_id, lambda c: (g.hold(c, retry_after_until), None),
                                     now)
            return g.CLOSED, g.CLOSED
        bucket = g.bucket_of(now, self.config)
        key = window_key(partner_id)
        pipe = self.redis.pipeline(transaction=False)
        if total:
            pipe.hincrby(key, f"t:{bucket}", total)
            if failed:
                pipe.hincrby(key, f"f:{bucket}", failed)
            pipe.expire(key, int(self.config.window * 2) + 60)
        pipe.hgetall(key)
        raw = pipe.execute()[-1]
        buckets = _buckets(raw)
        stale = [k for k in raw if _bucket_index(k) < bucket - g.WINDOW_BUCKETS]
        if stale:
            self.redis.hdel(key, *stale)
        win_total, win_failed = g.window_counts(buckets, now, self.config)

        def change(c: g.Circuit) -> tuple[g.Circuit, None]:
            after = g.after_results(c, now=now, total=win_total, failed=win_failed,
                                    probe_ok=probe_ok, config=self.config)
            if retry_after_until is not None:
                after = g.hold(after, retry_after_until)
            return after, None

        before, after, _ = self._update_circuit(partner_id, change, now)
        if before.state != after.state:
            log.warning("circuit of partner %s: %s -> %s (%s)", partner_id, before.state,
                        after.state, after.reason or "probe succeeded")
            if after.state == g.CLOSED:
                self.redis.delete(key)
        return before.state, after.state

    def inflight(self, partner_id: str, now: float) -> int:
        return int(self.redis.zcount(inflight_key(partner_id), now, "+inf"))


def _bucket_index(key: Any) -> int:
    try:
        return int(_text(key).split(":", 1)[1])
    except (IndexError, ValueError):
        return -(2**62)


def _buckets(raw: dict[Any, Any]) -> dict[int, tuple[int, int]]:
    out: dict[int, list[int]] = {}
    for k, v in raw.items():
        name = _text(k)
        kind, _, _ = name.partition(":")
        entry = out.setdefault(_bucket_index(k), [0, 0])
        entry[0 if kind == "t" else 1] += int(_text(v))
    return {i: (t, f) for i, (t, f) in out.items()}

