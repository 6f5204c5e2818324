"""The operator-event relay: from the outbox to a signed webhook, at least once.

One `run()` (beat calls it every POSTBACK_EVENTS_INTERVAL seconds, on the maintenance queue):

1. moves circuit events that Redis queued (`pbw:events`, pushed with the circuit change) into
   PostgreSQL; their ids are stable, so a move repeated after a crash keeps one of each;
2. plans deliveries for new events (`domain.operator_events.plan`: dead letters batched per
   partner and window), logging each event as one structured line;
3. sends due deliveries concurrently, signed with Standard Webhooks (`webhook-id` is the
   delivery id, the same on every retry, so receivers dedupe), through the same sender as
   postbacks (address guard, egress proxy, no redirects); 2xx settles a delivery, anything
   else retries with capped, jittered exponential backoff until POSTBACK_EVENTS_MAX_ATTEMPTS.

Nothing here runs in the delivery path: the path only writes outbox rows (or one Redis list
item) in transactions it already makes.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from postback_worker.delivery import signing
from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.delivery.signing import STANDARD, SigningKeys
from postback_worker.domain import operator_events as oe
from postback_worker.domain.retry import RetryPolicy
from postback_worker.errors import InvalidInput
from postback_worker.pipeline.guardrails import EVENTS_KEY
from postback_worker.settings import EventSettings, Settings
from postback_worker.store.events import event_row
from postback_worker.store.repo import Store

log = logging.getLogger("postback_worker.events")
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
# Redis items moved per run, events planned per run, deliveries sent per run.
DRAIN_LIMIT = 1000
PLAN_LIMIT = 5000
SEND_LIMIT = 200


@dataclass
class RunResult:
    moved: int = 0
    planned: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    skipped: int = 0
    purged: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v}


def signing_keys(events: EventSettings) -> SigningKeys:
    """The Standard Webhooks keys: the secret, and the previous one while it is set."""
    return SigningKeys(secret=events.secret, scheme=STANDARD,
                       previous=events.previous_secret or None,
                       previous_until=FAR_FUTURE if events.previous_secret else None)


class Relay:
    """Moves, plans and sends operator events; `clock` and `rand` are injected."""

    def __init__(self, settings: Settings, store: Store, sender: Sender, redis_client: Any,
                 *, clock: Callable[[], datetime], rand: Callable[[], float] = random.random,
                 ) -> None:
        settings.events.check()
        self.settings = settings
        self.events = settings.events
        self.store = store
        self.sender = sender
        self.redis = redis_client
        self.clock = clock
        self.rand = rand
        self.policy = RetryPolicy(max_attempts=self.events.max_attempts,
                                  base_delay=self.events.retry_base_delay,
                                  max_delay=self.events.retry_max_delay)

    def run(self) -> RunResult:
        result = RunResult()
        if self.redis is not None:
            try:
                result.moved = self.move_from_redis()
            except Exception as exc:  # noqa: BLE001 - Redis down: send what PostgreSQL has
                log.warning("operator events: could not read circuit events from Redis: %s",
                            exc)
                result.errors.append(f"redis: {exc}")
        result.planned, result.skipped = self.plan()
        self.send_due(result)
        result.purged = self.store.purge_operator_events(
            self.clock() - timedelta(days=self.events.retention_days), 1000)
        return result

    # -- 1. Redis -> PostgreSQL ---------------------------------------------------------

    def move_from_redis(self) -> int:
        """Circuit events queued in Redis, recorded in PostgreSQL, then removed from the list
        one by one (LREM of the exact item: a concurrent run never loses another's)."""
        raw = self.redis.lrange(EVENTS_KEY, 0, DRAIN_LIMIT - 1)
        if not raw:
            return 0
        rows = []
        for item in raw:
            try:
                e = json.loads(item)
                rows.append(event_row(e["type"], datetime.fromisoformat(
                    e["occurred_at"].replace("Z", "+00:00")), e["data"],
                    partner_id=e.get("partner_id"), id_=e["id"]))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("operator events: dropping an unreadable Redis item: %s", exc)
        self.store.add_events(rows)
        pipe = self.redis.pipeline(transaction=False)
        for item in raw:
            pipe.lrem(EVENTS_KEY, 1, item)
        pipe.execute()
        return len(rows)

    # -- 2. plan --------------------------------------------------------------------------

    def routing(self) -> oe.Routing:
        return oe.Routing(has_url=bool(self.events.url), types=self.events.types,
                          window=self.events.batch_window, max_batch=self.events.max_batch)

    def plan(self) -> tuple[int, int]:
        """Deliveries for new events; (deliveries planned, of which skipped)."""
        now = self.clock()
        with self.store.planning() as tx:
            if tx is None:
                return 0, 0
            events = tx.unplanned(PLAN_LIMIT)
            deliveries = oe.plan(events, now, self.routing())
            tx.save(deliveries, now)
        carrier = {i: d for d in deliveries for i in d.event_ids}
        for e in events:
            d = carrier.get(e.id)
            if d is not None:
                log.info("operator_event %s", json.dumps(
                    {**e.log_record(), "delivery_id": d.id, "delivery_state": d.state},
                    default=str, sort_keys=True))
        return len(deliveries), sum(d.state == oe.SKIPPED for d in deliveries)

    # -- 3. send --------------------------------------------------------------------------

    def send_due(self, result: RunResult) -> None:
        if not self.events.url:
            return
        now = self.clock()
        lease = timedelta(seconds=self.events.timeout * 2 + 30)
        rows = self.store.claim_deliveries(now, now + lease, SEND_LIMIT)
        if not rows:
            return
        outcomes = self.sender.send_many([self.request(r, now) for r in rows])
        done = self.clock()
        for row, outcome in zip(rows, outcomes, strict=True):
            self.settle(row, outcome.status_code, outcome.error_message, done, result)

    def request(self, row: dict[str, Any], now: datetime) -> PostbackRequest:
        return PostbackRequest(
            postback_id=row["id"], url=self.events.url, method="POST",
            timeout=self.events.timeout, body=row["payload"], content_type="application/json",
            headers={"webhook-event-type": row["type"]}, signing=signing_keys(self.events),
            signed_at=now)

    def settle(self, row: dict[str, Any], status: int | None, error: str, now: datetime,
               result: RunResult) -> None:
        attempts = int(row["attempts"]) + 1
        if status is not None and 200 <= status < 300:
            self.store.settle_delivery(row["id"], state=oe.DELIVERED, attempts=attempts,
                                       next_attempt_at=None, last_status=status,
                                       last_error=None, now=now)
            result.delivered += 1
            return
        why = f"HTTP {status}" if status is not None else (error or "no answer")
        if attempts >= self.policy.max_attempts:
            self.store.settle_delivery(row["id"], state=oe.FAILED, attempts=attempts,
                                       next_attempt_at=None, last_status=status,
                                       last_error=why, now=now)
            log.error("operator event delivery %s (%s) given up after %d attempts: %s",
                      row["id"], row["type"], attempts, why)
            result.failed += 1
            return
        delay = self.policy.backoff(attempts, self.rand())
        self.store.settle_delivery(row["id"], state=oe.PENDING, attempts=attempts,
                                   next_attempt_at=now + timedelta(seconds=delay),
                                   last_status=status, last_error=why, now=now)
        log.warning("operator event delivery %s (%s) attempt %d failed (%s); next in %.0f s",
                    row["id"], row["type"], attempts, why, delay)
        result.retrying += 1


def send_test(settings: Settings, store: Store, sender: Sender, now: datetime,
              note: str | None = None) -> dict[str, Any]:
    """Record an `operator.test` event and send it at once (its delivery is listed like any
    other); returns the delivery row after the attempt."""
    settings.events.check()
    if not settings.events.url:
        raise InvalidInput("POSTBACK_EVENTS_URL is not set: there is nowhere to send a test "
                           "event")
    row = event_row(oe.TEST, now, {"message": note or "test event from postback-worker",
                                   "sent_by": "postback-worker events send-test"},
                    id_=oe.event_id(oe.TEST, now, secrets.token_hex(8)))
    store.add_events([row])
    relay = Relay(settings, store, sender, None, clock=lambda: now)
    relay.plan()
    result = RunResult()
    relay.send_due(result)
    delivery = store.get_delivery(row["id"])
    assert delivery is not None
    return delivery


def list_events(store: Store, *, type_: str | None = None, partner_id: str | None = None,
                state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Recent operator events, newest first, with their delivery state."""
    return store.list_operator_events(type_=type_, partner_id=partner_id, state=state,
                                      limit=limit)


# The states an event listing can filter on: its deliveries' states, or not planned yet.
LIST_STATES = (*oe.DELIVERY_STATES, "unplanned")


def check_filters(type_: str | None, state: str | None) -> list[tuple[str, str]]:
    """(field, problem) for a bad listing filter."""
    bad = []
    if type_ and type_ not in oe.TYPES:
        bad.append(("type", "must be one of: " + ", ".join(oe.TYPES)))
    if state and state not in LIST_STATES:
        bad.append(("state", "must be one of: " + ", ".join(LIST_STATES)))
    return bad


def new_secret() -> str:
    """A new Standard Webhooks secret for POSTBACK_EVENTS_SECRET."""
    return signing.new_secret(STANDARD)
