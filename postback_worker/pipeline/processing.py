"""The worker's logic: attribute a batch of conversions, fire postbacks, record every attempt.

Celery tasks are thin shells over `Pipeline`; everything here runs (and is tested) without Celery.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from postback_worker.delivery import signing
from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.domain.attribution import (
    ClickFacts,
    ConversionFacts,
    ConversionState,
    OfferFacts,
    attribute,
    dedupe_key,
    fires_on,
)
from postback_worker.domain.events import ConversionEvent
from postback_worker.domain.ids import new_id
from postback_worker.domain.macros import TemplateError, macro_values, render
from postback_worker.domain.masking import mask_url
from postback_worker.domain.retry import (
    RETRYABLE,
    FailureClass,
    classify,
    describe,
    parse_retry_after,
)
from postback_worker.pipeline.catalog import Catalog, Partner
from postback_worker.pipeline.guardrails import Guardrails, Limits
from postback_worker.settings import Settings
from postback_worker.store import repo
from postback_worker.store.journal import Journal, conversion_row
from postback_worker.store.repo import Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# BatchResult key for postbacks put back to wait (paused, circuit open, over a limit).
WAITING = "waiting"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class BatchResult:
    """What one call did, for logs, tests and the task's return value."""

    conversions: dict[str, int] = field(default_factory=dict)
    postbacks: dict[str, int] = field(default_factory=dict)

    def count(self, bucket: dict[str, int], key: str, n: int = 1) -> None:
        bucket[key] = bucket.get(key, 0) + n

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"conversions": self.conversions, "postbacks": self.postbacks}


class Pipeline:
    """Attribution, postback creation, claiming, firing and recording for one process."""

    def __init__(self, settings: Settings, store: Store, sender: Sender, *,
                 clock: Clock = utcnow, rand: Callable[[], float] = random.random,
                 worker_name: str | None = None, redis: Any | None = None) -> None:
        self.settings = settings
        self.store = store
        self.sender = sender
        self.clock = clock
        self.rand = rand
        self.catalog = Catalog(store, settings.delivery.config_cache_seconds)
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        # Without Redis (unit tests, tools) pauses still hold; breaker and limits are off.
        self.guard = Guardrails(redis, settings) if redis is not None else None
        self._controls: dict[str, Limits] = {}
        self._controls_at = float("-inf")

    # -- conversions ----------------------------------------------------------------------

    def process_conversions(self, messages: Sequence[Mapping[str, Any]],
                            triggered_by: str | None = None) -> BatchResult:
        """Persist, attribute and fire a batch; safe to run again on the same messages.

        `triggered_by` is recorded on the postbacks created (e.g. a re-attribution run).
        """
        result = BatchResult()
        events = [ConversionEvent.from_message(m) for m in messages]
        if not events:
            return result
        now = self.clock()
        rows = [conversion_row(e) for e in events]
        ids = [r["id"] for r in rows]
        with self.store.engine.begin() as conn:
            self.store.insert_conversions(conn, rows)
            decided = self._attribute(conn, self.store.unprocessed_conversions(conn, ids),
                                      triggered_by, now)
        for d in decided:
            result.count(result.conversions, d.state)
        # Fire what is claimable for every conversion in the batch, including postbacks a
        # previous, interrupted delivery of this message created but never fired.
        self._fire(self._claim(conversion_ids=ids), result)
        return result

    def intake_pending(self, limit: int, max_rounds: int,
                       on_backlog: Callable[[], None] | None = None) -> BatchResult:
        """Take accepted events waiting in the journal in batches of `limit` (whatever
        message woke us), attribute them and fire; stop when a batch comes back short.
        `on_backlog` is called when a batch comes back full (e.g. to wake another worker)."""
        result = BatchResult()
        journal = Journal(self.store)
        stuck_after = timedelta(seconds=self.settings.sweep.stuck_conversion_after)
        for _ in range(max_rounds):
            now = self.clock()
            with self.store.engine.begin() as conn:
                todo = journal.claim(conn, limit, reattributed_before=now - stuck_after)
                decided = self._attribute(conn, todo, None, now)
            if len(todo) == limit and on_backlog is not None:
                on_backlog()
            for d in decided:
                result.count(result.conversions, d.state)
            if todo:
                self._fire(self._claim(conversion_ids=[c["id"] for c in todo]), result)
            if len(todo) < limit:
                break
        return result

    def _attribute(self, conn: Any, todo: list[dict[str, Any]], triggered_by: str | None,
                   now: datetime) -> list[_Decided]:
        """Attribute locked `received` conversions and create their postbacks (in `conn`)."""
        clicks = self.store.clicks_by_transaction(conn, [c["transaction_id"] for c in todo])
        decided = [self._decide(c, clicks.get(c["transaction_id"])) for c in todo]
        self._mark_duplicates(conn, decided)
        postbacks, dead = self._build_postbacks(decided, clicks, now)
        for row in postbacks:
            row["triggered_by"] = triggered_by
        self.store.set_conversion_states(conn, [
            {"id": d.conv["id"], "state": d.state, "reason": d.reason,
             "offer_id": d.offer_id, "aff_id": d.aff_id, "processed_at": now}
            for d in decided
        ])
        self.store.insert_postbacks(conn, postbacks)
        self.store.dead_letter_now(conn, dead)
        return decided

    def _decide(self, conv: dict[str, Any], click: dict[str, Any] | None) -> _Decided:
        offer_id = conv["offer_id"] or (click["offer_id"] if click else None)
        offer = self.catalog.offer(offer_id)
        decision = attribute(
            ConversionFacts(conv["transaction_id"], conv["offer_id"], conv["occurred_at"]),
            None if click is None else ClickFacts(
                click["transaction_id"], click["offer_id"], click["aff_id"], click["clicked_at"]
            ),
            None if offer is None else OfferFacts(offer.id, offer.lifespan_days),
        )
        return _Decided(
            conv=conv,
            state=decision.state.value,
            reason=decision.reason,
            offer_id=offer_id,
            aff_id=click["aff_id"] if click else None,
            allow_multiple=bool(offer and offer.allow_multiple),
        )

    def _mark_duplicates(self, conn: Any, decided: list[_Decided]) -> None:
        keys: dict[str, str] = {}
        in_batch: dict[str, _Decided] = {}
        for d in decided:
            if d.state != ConversionState.ATTRIBUTED or d.allow_multiple:
                continue
            key = dedupe_key(d.offer_id or "", d.conv["transaction_id"], d.conv["goal_id"])
            first = in_batch.get(key)
            if first is not None:
                d.state, d.reason = "duplicate", f"duplicate of conversion {first.conv['id']}"
                continue
            in_batch[key] = d
            keys[key] = d.conv["id"]
        owners = self.store.claim_keys(conn, keys) if keys else {}
        for key, d in in_batch.items():
            owner = owners.get(key)
            if owner is not None and owner != d.conv["id"]:
                d.state = ConversionState.DUPLICATE.value
                d.reason = (
                    f"duplicate of conversion {owner} (same offer, transaction_id and goal_id)"
                )

    def _build_postbacks(self, decided: list[_Decided], clicks: Mapping[str, dict[str, Any]],
                         now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        postbacks: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        for d in decided:
            if d.state != ConversionState.ATTRIBUTED:
                continue
            assert d.offer_id is not None and d.aff_id is not None
            click = clicks[d.conv["transaction_id"]]
            partners = self.catalog.destinations(d.offer_id, d.aff_id)
            if not partners:
                d.reason = f"{d.reason}; no postback destination for affiliate {d.aff_id!r}"
                continue
            firing = 0
            for partner in partners:
                row = self._postback_row(d, click, partner, now)
                if row["state"] == repo.PENDING:
                    firing += 1
                elif row["state"] == repo.DEAD_LETTERED:
                    dead.append(_dead_letter_row(row, d.offer_id, "config", None, now))
                postbacks.append(row)
            if firing == 0 and all(
                not fires_on(d.conv["status"], p.fire_statuses) for p in partners
            ):
                d.state = ConversionState.REJECTED_STATUS.value
                d.reason = f"status {d.conv['status']!r} fires no partner"
        return postbacks, dead

    def _postback_row(self, d: _Decided, click: Mapping[str, Any], partner: Partner,
                      now: datetime) -> dict[str, Any]:
        pid = new_id("pb")
        row: dict[str, Any] = {
            "id": pid, "conversion_id": d.conv["id"], "partner_id": partner.id, "url": "",
            "method": partner.method, "attempts": 0, "received_at": d.conv["received_at"],
            "created_at": now, "updated_at": now, "next_attempt_at": now,
            "state": repo.PENDING, "reason": None,
        }
        if not partner.enabled:
            row.update(state=repo.SKIPPED, reason="partner disabled", next_attempt_at=None)
            return row
        if not fires_on(d.conv["status"], partner.fire_statuses):
            fires = ", ".join(partner.fire_statuses) or "nothing"
            status = d.conv["status"]
            row.update(
                state=repo.SKIPPED, next_attempt_at=None,
                reason=f"status {status!r} does not fire this partner (fires on: {fires})",
            )
            return row
        try:
            row["url"] = render_postback_url(partner.postback_url, {**d.conv,
                                             "offer_id": d.offer_id}, click, pid, now)
        except TemplateError as exc:
            row.update(url=partner.postback_url, state=repo.DEAD_LETTERED, next_attempt_at=None,
                       reason=f"config: template cannot render: {exc}", last_class="config")
        return row

    # -- delivery -------------------------------------------------------------------------

    def deliver(self, postback_ids: Sequence[str], triggered_by: str | None = None) -> BatchResult:
        """Claim and fire the given postbacks (retries, replays); already final ones are left."""
        result = BatchResult()
        self._fire(self._claim(ids=postback_ids), result)
        return result

    def _claim(self, *, ids: Sequence[str] = (),
               conversion_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        now = self.clock()
        token = secrets.token_hex(8)
        claimed = self.store.claim(
            now=now, lease_until=now + timedelta(seconds=self.settings.delivery.lease_seconds),
            token=token, ids=ids, conversion_ids=conversion_ids,
        )
        for c in claimed:
            c["token"] = token
        return claimed

    def _fire(self, claimed: list[dict[str, Any]], result: BatchResult) -> None:
        """Fire claimed postbacks concurrently; save results in small batches as they arrive,
        so a worker killed mid-batch leaves only a few fired-but-unrecorded postbacks."""
        if not claimed:
            return
        partners = {c["partner_id"]: self.catalog.partner(c["partner_id"]) for c in claimed}
        buf = _Buffer()
        sendable: list[tuple[dict[str, Any], Partner]] = []
        now = self.clock()
        groups: dict[str, list[dict[str, Any]]] = {}
        for c in claimed:
            p = partners[c["partner_id"]]
            if p is None or not p.enabled:
                why = "partner deleted" if p is None else "partner disabled"
                buf.updates.append(_update(c, repo.SKIPPED, why, now))
                result.count(result.postbacks, repo.SKIPPED)
            else:
                groups.setdefault(p.id, []).append(c)
        for partner_id, group in groups.items():
            p = partners[partner_id]
            assert p is not None
            sendable.extend((c, p) for c in self._admit(p, group, buf, now, result))
        requests = [
            PostbackRequest(postback_id=c["id"], url=c["url"], method=c["method"],
                            timeout=p.timeout,
                            headers=signing.headers_for(p, c["id"], c["url"], now, c["method"]))
            for c, p in sendable
        ]
        flush_every = max(1, self.settings.delivery.concurrency)
        started = extended = self.clock()
        unanswered = {c["id"] for c, _ in sendable}
        for index, outcome in self.sender.send_iter(requests):
            c, p = sendable[index]
            unanswered.discard(c["id"])
            state = self._record(buf, c, p, outcome, started)
            result.count(result.postbacks, state)
            if len(buf.updates) >= flush_every:
                self._flush(buf)
                extended = self._keep_leases(unanswered, claimed[0]["token"], extended)
        self._flush(buf)

    def _keep_leases(self, ids: set[str], token: str, last: datetime) -> datetime:
        """Renew leases once a third of their time has passed, for batches slower than a lease."""
        now = self.clock()
        lease = self.settings.delivery.lease_seconds
        if ids and (now - last).total_seconds() > lease / 3:
            self.store.extend_leases(sorted(ids), token, now + timedelta(seconds=lease))
            return now
        return last

    # -- guardrails: pause, circuit breaker, rate limit, concurrency cap --------------------

    def _limits(self, partner_id: str) -> Limits:
        """The partner's pause and limits, cached like the catalog."""
        mono = time.monotonic()
        stale = mono - self._controls_at >= self.settings.delivery.config_cache_seconds
        if stale or partner_id not in self._controls:
            self._controls = {
                r["id"]: Limits(paused=bool(r["paused"]), paused_reason=r["paused_reason"],
                                rate_limit=r["rate_limit"], max_concurrency=r["max_concurrency"],
                                timeout=float(r["timeout"]))
                for r in self.store.list_partners()
            }
            self._controls_at = mono
        return self._controls.get(partner_id, Limits())

    def _admit(self, partner: Partner, group: list[dict[str, Any]], buf: _Buffer,
               now: datetime, result: BatchResult) -> list[dict[str, Any]]:
        """The claimed postbacks of one partner that fire now; the others wait, attempts kept."""
        limits = self._limits(partner.id)
        if limits.paused:
            why = "partner paused" + (f" ({limits.paused_reason})" if limits.paused_reason
                                      else "") + "; 'postback-worker partners resume' releases it"
            later = now + timedelta(seconds=self.settings.oncall.pause_recheck)
            buf.released.extend(_release(c, later, why, now) for c in group)
            result.count(result.postbacks, WAITING, len(group))
            return []
        if self.guard is None:
            return group
        from redis.exceptions import RedisError

        try:
            verdict = self.guard.admit(partner.id, [c["id"] for c in group], limits,
                                       now.timestamp())
        except RedisError as exc:
            log.warning("guardrails unavailable (%s); firing partner %s unguarded", exc,
                        partner.id)
            return group
        by_id = {c["id"]: c for c in group}
        for pid, (delay, why) in verdict.wait.items():
            buf.released.append(_release(by_id[pid], now + timedelta(seconds=delay), why, now))
        if verdict.wait:
            result.count(result.postbacks, WAITING, len(verdict.wait))
        if verdict.probe is not None:
            buf.probes.add(verdict.probe)
        if limits.max_concurrency:
            buf.slotted.add(partner.id)
        return [by_id[i] for i in verdict.fire]

    def _observe(self, buf: _Buffer, c: Mapping[str, Any], partner: Partner,
                 failure: FailureClass, retry_after: float | None, now: datetime) -> None:
        """Feed one result to the breaker (batched until the next flush) and free its slot."""
        if self.guard is None:
            return
        stats = buf.stats.setdefault(partner.id, _Stats())
        stats.total += 1
        if failure in RETRYABLE:
            stats.failed += 1
        if c["id"] in buf.probes:
            stats.probe_ok = failure not in RETRYABLE
        if failure == FailureClass.THROTTLED and retry_after:
            cap = partner.policy(self.settings.retry).max_retry_after
            until = now.timestamp() + min(retry_after, cap)
            stats.hold_until = max(stats.hold_until or 0.0, until)
        if partner.id in buf.slotted:
            from redis.exceptions import RedisError

            try:
                self.guard.release_slots(partner.id, [c["id"]])
            except RedisError as exc:
                log.warning("could not free a concurrency slot (it expires): %s", exc)

    def _report(self, buf: _Buffer) -> None:
        """Send batched results to the breaker; a closed circuit releases waiting postbacks."""
        if self.guard is None or not buf.stats:
            return
        from redis.exceptions import RedisError

        now = self.clock()
        for partner_id, st in buf.stats.items():
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
        buf.stats.clear()

    def _record(self, buf: _Buffer, c: dict[str, Any], partner: Partner, outcome: Any,
                started: datetime) -> str:
        now = self.clock()
        failure = classify(outcome, partner.success_check)
        attempt_no = int(c["attempts"]) + 1
        retry_after = parse_retry_after(outcome.retry_after, now)
        self._observe(buf, c, partner, failure, retry_after, now)
        decision = partner.policy(self.settings.retry).decide(
            failure, attempts_made=attempt_no,
            first_attempt_at=c["first_attempt_at"] or started, now=now,
            retry_after=retry_after, rand=self.rand(),
        )
        text = "" if failure == FailureClass.DELIVERED else describe(outcome, failure)
        buf.attempts.append({
            "postback_id": c["id"], "attempt_no": attempt_no, "started_at": started,
            "duration_ms": round(outcome.duration_ms, 3), "url": mask_url(c["url"]),
            "status_code": outcome.status_code, "failure_class": failure.value,
            "error": text or None, "response_excerpt": outcome.body_excerpt,
            "worker": self.worker_name, "is_test": False,
        })
        next_at = None
        if (decision.action == "dead_letter" and c["id"] in buf.probes
                and failure in RETRYABLE):
            # A failed circuit probe only confirms the partner is still down: the postback
            # waits for the circuit instead of being dead-lettered for the outage.
            state = repo.RETRY_SCHEDULED
            reason = f"{repo.WAITING_PREFIX}circuit open (probe failed: {text})"
            next_at = now + timedelta(seconds=self.settings.breaker.cooldown)
        elif decision.action == "delivered":
            state, reason = repo.DELIVERED, None
        elif decision.action == "retry":
            assert decision.delay is not None
            state, reason = repo.RETRY_SCHEDULED, f"{text}; {decision.reason}"
            next_at = now + timedelta(seconds=decision.delay)
        else:
            state, reason = repo.DEAD_LETTERED, f"{text}; {decision.reason}"
            buf.dead.append(_dead_letter_row(
                {"id": c["id"], "partner_id": c["partner_id"], "attempts": attempt_no,
                 "reason": reason}, None, failure.value, outcome.status_code, now,
                conversion_id=c["conversion_id"],
            ))
        buf.updates.append(_update(c, state, reason, now, next_attempt_at=next_at,
                                   last_status=outcome.status_code, last_class=failure.value))
        return state

    def _flush(self, buf: _Buffer) -> None:
        if buf.released:
            self.store.release(buf.released)
            buf.released = []
        if not (buf.updates or buf.attempts):
            self._report(buf)
            return
        if buf.dead:
            self._fill_offer_ids(buf.dead)
        saved = self.store.finish(updates=buf.updates, attempts=buf.attempts,
                                  dead_letters=buf.dead)
        if saved < len(buf.updates):
            log.warning("%d postback lease(s) expired before their result was saved",
                        len(buf.updates) - saved)
        buf.updates, buf.attempts, buf.dead = [], [], []
        self._report(buf)

    def _fill_offer_ids(self, dead: list[dict[str, Any]]) -> None:
        wanted = {r["conversion_id"] for r in dead if r.get("conversion_id")}
        offers = self.store.conversion_offers(sorted(wanted)) if wanted else {}
        for row in dead:
            conversion_id = row.pop("conversion_id", None)
            if row.get("offer_id") is None:
                row["offer_id"] = offers.get(conversion_id)

    # -- sweeping -------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Postbacks due for another attempt (or stuck), marked queued; the caller enqueues them."""
        now = self.clock()
        return self.store.sweep_due(
            now=now,
            stale_pending_before=now - timedelta(seconds=self.settings.delivery.lease_seconds),
            requeue_at=now + timedelta(seconds=self.settings.sweep.requeue_after),
            limit=self.settings.sweep.batch,
        )

    def stuck_conversions(self) -> list[dict[str, Any]]:
        """Conversions persisted but never processed (their message was lost), as messages."""
        now = self.clock()
        rows = self.store.stuck_conversions(
            now - timedelta(seconds=self.settings.sweep.stuck_conversion_after),
            self.settings.sweep.batch,
        )
        return [_conversion_message(r) for r in rows]

    def reprocess(self, conversion_ids: Sequence[str], triggered_by: str | None) -> BatchResult:
        """Process stored conversions handed back to `received` (re-attribution) again."""
        rows = [self.store.get_conversion(i) for i in conversion_ids]
        msgs = [_conversion_message(r) for r in rows if r is not None and r["state"] == "received"]
        return self.process_conversions(msgs, triggered_by)


@dataclass
class _Stats:
    total: int = 0
    failed: int = 0
    probe_ok: bool | None = None
    hold_until: float | None = None


@dataclass
class _Buffer:
    updates: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)
    released: list[dict[str, Any]] = field(default_factory=list)
    probes: set[str] = field(default_factory=set)
    slotted: set[str] = field(default_factory=set)
    stats: dict[str, _Stats] = field(default_factory=dict)


def render_postback_url(template: str, conversion: Mapping[str, Any],
                        click: Mapping[str, Any], postback_id: str, now: datetime) -> str:
    """A postback URL from a template, a stored conversion and its click (raises TemplateError)."""
    values = macro_values(conversion=conversion, click=click, postback_id=postback_id, now=now,
                          random_value=secrets.token_hex(8))
    return render(template, values)


def _release(c: Mapping[str, Any], next_at: datetime, why: str,
             now: datetime) -> dict[str, Any]:
    return {"id": c["id"], "token": c["token"], "next_attempt_at": next_at,
            "reason": repo.WAITING_PREFIX + why, "updated_at": now}


@dataclass
class _Decided:
    conv: dict[str, Any]
    state: str
    reason: str
    offer_id: str | None
    aff_id: str | None
    allow_multiple: bool


def _conversion_message(row: Mapping[str, Any]) -> dict[str, Any]:
    event = ConversionEvent(
        id=row["id"], transaction_id=row["transaction_id"], offer_id=row["offer_id"],
        goal_id=row["goal_id"] or "", payout=row["payout"], sale_amount=row["sale_amount"],
        currency=row["currency"], status=row["status"], adv_sub=row["adv_sub"], ip=row["ip"],
        device_id=row["device_id"], occurred_at=row["occurred_at"],
        received_at=row["received_at"],
    )
    return dict(event.to_message())


def _update(c: Mapping[str, Any], state: str, reason: str | None, now: datetime, *,
            next_attempt_at: datetime | None = None, last_status: int | None = None,
            last_class: str | None = None) -> dict[str, Any]:
    return {
        "id": c["id"], "token": c["token"], "state": state, "reason": reason,
        "next_attempt_at": next_attempt_at, "last_status": last_status,
        "last_class": last_class, "delivered_at": now if state == repo.DELIVERED else None,
        "updated_at": now,
    }


def _dead_letter_row(pb: Mapping[str, Any], offer_id: str | None, failure_class: str,
                     last_status: int | None, now: datetime,
                     conversion_id: str | None = None) -> dict[str, Any]:
    row = {
        "postback_id": pb["id"], "partner_id": pb["partner_id"], "offer_id": offer_id,
        "failure_class": failure_class, "last_status": last_status,
        "reason": pb["reason"] or failure_class, "attempts": pb["attempts"],
        "created_at": now, "replayed_at": None, "replay_count": 0,
    }
    if conversion_id is not None:
        row["conversion_id"] = conversion_id
    return row
