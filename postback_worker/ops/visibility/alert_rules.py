"""Alert conditions as a pure function of a snapshot of figures (stdlib only, time injected).

`conditions(snapshot, thresholds)` says, for each alert key, whether its condition holds
(True), has cleared (False) or sits in the hysteresis band between the firing threshold and
the clearing one (None: an open alert stays open, nothing new fires). `transitions` turns that
and the currently open keys into fire / resolve actions: one of each per episode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from postback_worker.settings import AlertSettings

FAILURE_RATE = "failure_rate"
DEAD_LETTERS = "dead_letters_growing"
RETRY_BACKLOG = "retry_backlog_overdue"
CIRCUIT_OPEN = "circuit_open"
LOST_CONVERSIONS = "lost_conversions"
PARTNER_GONE = "partner_gone"
BACKLOG_AGE = "backlog_age"


@dataclass(frozen=True)
class Thresholds(AlertSettings):
    """The alert settings, plus the egress IPs that alert texts name."""

    egress_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class PartnerWindow:
    """One partner's attempts within the window."""

    partner_id: str
    attempts: int
    failed: int
    status_codes: Mapping[str, int] = field(default_factory=dict)  # failed attempts only
    classes: Mapping[str, int] = field(default_factory=dict)  # failed attempts only


@dataclass(frozen=True)
class OfferLost:
    offer_id: str | None
    conversions: int
    expired_click: int
    unknown_click: int


@dataclass(frozen=True)
class Snapshot:
    now: datetime
    partners: Sequence[PartnerWindow] = ()
    new_dead_letters: int = 0
    dead_letters_by_partner: Mapping[str, int] = field(default_factory=dict)
    dead_letters_by_class: Mapping[str, int] = field(default_factory=dict)
    retry_backlog: int = 0
    oldest_due: datetime | None = None
    circuits: Mapping[str, str] = field(default_factory=dict)
    lost: Sequence[OfferLost] = ()
    # Partners paused because they answered 410 Gone -> why (their pause reason).
    gone: Mapping[str, str] = field(default_factory=dict)
    # Partner -> (postbacks not yet delivered nor given up, seconds since the oldest was created)
    backlog_age: Mapping[str, tuple[int, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    key: str
    kind: str
    active: bool | None
    message: str
    partner_id: str | None = None
    severity: str = "warning"
    details: Mapping[str, Any] = field(default_factory=dict)
    # One line with the current figure, used when the alert resolves.
    summary: str = ""


@dataclass(frozen=True)
class Transition:
    action: str  # "fire" or "resolve"
    key: str
    condition: Condition | None  # None: the condition is no longer observed at all


def _band(value: float, fire_at: float, clear_below: float) -> bool | None:
    if value >= fire_at:
        return True
    if value < clear_below:
        return False
    return None


def _top(counts: Mapping[str, int], n: int = 3) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _fmt_top(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in _top(counts)) or "none"


def _minutes(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes >= 1 else f"{seconds:.0f} s"


def next_step(top_class: str | None, top_status: str | None, egress_ips: Sequence[str]) -> str:
    """What the on-call engineer should do, from the dominant failure class / status code."""
    if top_class == "blocked" or top_status == "403":
        ips = ", ".join(egress_ips) if egress_ips else "(none configured: set POSTBACK_EGRESS_IPS)"
        return f"ask the partner to allowlist our egress IPs: {ips}"
    if top_class == "gone" or top_status == "410":
        return ("the partner's endpoint is gone (410) and the partner is paused: get the new "
                "URL, fix it (postback-worker partners add), then partners resume and dlq replay")
    if top_status in {"404", "400"} or top_class == "config":
        return ("check the partner's postback URL template (postback-worker partners list; "
                "fix it with postback-worker partners add)")
    if top_class == "timeout":
        return "contact the partner: their endpoint does not answer within the timeout"
    if top_class == "partner_5xx":
        return "contact the partner: their endpoint returns server errors; retries continue"
    if top_class == "auth":
        return "the partner refused our credentials: update the token in the postback URL"
    if top_class == "throttled":
        return "the partner is rate limiting us: lower the partner's rate limit or ask for more"
    if top_class == "dns":
        return "the partner's host name does not resolve: confirm the domain with the partner"
    if top_class == "network":
        return "connections to the partner fail: check the network path and TLS to its host"
    return "inspect the failed postbacks: postback-worker report failed --format csv"


def _failure_rate(p: PartnerWindow, th: Thresholds) -> Condition:
    rate = p.failed / p.attempts if p.attempts else 0.0
    window = _minutes(th.window_seconds)
    if p.attempts >= th.min_volume:
        active = _band(rate, th.failure_rate, th.failure_rate * th.clear_ratio)
    else:
        # Below the minimum volume nothing new fires; an open alert clears once the rate is low.
        active = False if rate < th.failure_rate * th.clear_ratio else None
    top_status = _top(p.status_codes, 1)[0][0] if p.status_codes else None
    top_class = _top(p.classes, 1)[0][0] if p.classes else None
    step = next_step(top_class, top_status, th.egress_ips)
    message = (
        f"Partner {p.partner_id}: {rate * 100:.1f}% of {p.attempts} postback attempts failed in "
        f"the last {window} (threshold {th.failure_rate * 100:.1f}%). "
        f"Top status codes: {_fmt_top(p.status_codes)}. "
        f"Top failure classes: {_fmt_top(p.classes)}. Next step: {step}."
    )
    return Condition(
        key=f"{FAILURE_RATE}:{p.partner_id}", kind=FAILURE_RATE, active=active,
        message=message, partner_id=p.partner_id,
        severity="critical" if rate >= 0.5 else "warning",
        summary=(f"partner {p.partner_id} failure rate {rate * 100:.1f}% of {p.attempts} "
                 f"attempts in the last {window}"),
        details={"rate": rate, "attempts": p.attempts, "failed": p.failed,
                 "status_codes": dict(p.status_codes), "failure_classes": dict(p.classes),
                 "next_step": step},
    )


def _dead_letters(s: Snapshot, th: Thresholds) -> Condition:
    n = s.new_dead_letters
    active = _band(n, th.dead_letter_growth, th.dead_letter_growth * th.clear_ratio)
    top_class = _top(s.dead_letters_by_class, 1)[0][0] if s.dead_letters_by_class else None
    step = next_step(top_class, None, th.egress_ips)
    message = (
        f"Dead letters growing: {n} new in the last {_minutes(th.window_seconds)} "
        f"(threshold {th.dead_letter_growth}). Top partners: "
        f"{_fmt_top(s.dead_letters_by_partner)}. Top failure classes: "
        f"{_fmt_top(s.dead_letters_by_class)}. Next step: {step}; replay once fixed."
    )
    return Condition(key=DEAD_LETTERS, kind=DEAD_LETTERS, active=active, message=message,
                     summary=f"{n} new dead letters in the last {_minutes(th.window_seconds)}",
                     details={"new_dead_letters": n,
                              "by_partner": dict(s.dead_letters_by_partner),
                              "by_class": dict(s.dead_letters_by_class), "next_step": step})


def _retry_backlog(s: Snapshot, th: Thresholds) -> Condition:
    overdue = 0.0
    if s.oldest_due is not None and s.retry_backlog:
        overdue = max(0.0, (s.now - s.oldest_due).total_seconds())
    bound = th.retry_overdue_seconds
    active = _band(overdue, bound, bound * th.clear_ratio) if s.retry_backlog else False
    message = (
        f"Retry backlog overdue: {s.retry_backlog} postbacks wait for a retry and the oldest "
        f"was due {_minutes(overdue)} ago (bound {_minutes(bound)}). Next step: check that "
        "beat and the workers consuming the 'retries' queue are running (Flower)."
    )
    return Condition(key=RETRY_BACKLOG, kind=RETRY_BACKLOG, active=active, message=message,
                     severity="critical",
                     summary=(f"{s.retry_backlog} postbacks wait for a retry, oldest "
                              f"{_minutes(overdue)} past due"),
                     details={"backlog": s.retry_backlog, "overdue_seconds": overdue})


def _backlog_age(partner_id: str, count: int, age: float, th: Thresholds) -> Condition:
    bound = th.backlog_age_seconds
    active = _band(age, bound, bound * th.clear_ratio)
    message = (
        f"Partner {partner_id}: the oldest of its {count} undelivered postbacks was created "
        f"{_minutes(age)} ago (bound {_minutes(bound)}); they wait for a retry, a limit, the "
        "circuit breaker or a pause. Next step: postback-worker partners health, then "
        f"postback-worker report --partner {partner_id}."
    )
    return Condition(key=f"{BACKLOG_AGE}:{partner_id}", kind=BACKLOG_AGE, active=active,
                     message=message, partner_id=partner_id,
                     severity="critical" if age >= 2 * bound else "warning",
                     summary=(f"partner {partner_id} backlog of {count}, oldest "
                              f"{_minutes(age)} old"),
                     details={"postbacks": count, "age_seconds": age})


def _circuit(partner_id: str, state: str) -> Condition:
    # half_open keeps an open alert open (the probe has not succeeded yet); only closed clears.
    active: bool | None = True if state == "open" else (None if state == "half_open" else False)
    message = (
        f"Circuit opened for partner {partner_id}: its postbacks wait (no attempts spent) until "
        "a probe succeeds. Next step: see the partner's failures with postback-worker report "
        f"--partner {partner_id}."
    )
    return Condition(key=f"{CIRCUIT_OPEN}:{partner_id}", kind=CIRCUIT_OPEN, active=active,
                     message=message, partner_id=partner_id, severity="critical",
                     summary=f"circuit of partner {partner_id} is {state}",
                     details={"state": state})


def _gone(partner_id: str, reason: str) -> Condition:
    message = (
        f"Partner {partner_id} answered 410 Gone and is paused: {reason}. Its postbacks wait "
        "(no attempts spent). Next step: get the partner's new endpoint, fix it with "
        f"postback-worker partners add, then postback-worker partners resume {partner_id} and "
        f"postback-worker dlq replay --partner {partner_id}."
    )
    return Condition(key=f"{PARTNER_GONE}:{partner_id}", kind=PARTNER_GONE, active=True,
                     message=message, partner_id=partner_id, severity="critical",
                     summary=f"partner {partner_id} is paused after 410 Gone",
                     details={"reason": reason})


def _lost(o: OfferLost, th: Thresholds) -> Condition:
    lost = o.expired_click + o.unknown_click
    rate = lost / o.conversions if o.conversions else 0.0
    offer = o.offer_id or "(no offer)"
    if o.conversions >= th.lost_min_volume:
        active = _band(rate, th.lost_rate, th.lost_rate * th.clear_ratio)
    else:
        active = False if rate < th.lost_rate * th.clear_ratio else None
    if o.expired_click >= o.unknown_click:
        step = (f"conversions arrive after the click lifespan: review offer {offer}'s "
                "lifespan (postback-worker offers add --lifespan-days), then re-attribute")
    else:
        step = "conversions name clicks we never recorded: check the advertiser's transaction ids"
    message = (
        f"Lost conversions for offer {offer}: {lost} of {o.conversions} ({rate * 100:.1f}%) in "
        f"the last {_minutes(th.window_seconds)} (threshold {th.lost_rate * 100:.1f}%): "
        f"expired_click x{o.expired_click}, unknown_click x{o.unknown_click}. Next step: {step}."
    )
    return Condition(key=f"{LOST_CONVERSIONS}:{offer}", kind=LOST_CONVERSIONS, active=active,
                     message=message,
                     summary=(f"offer {offer} lost {lost} of {o.conversions} conversions "
                              f"({rate * 100:.1f}%) in the last {_minutes(th.window_seconds)}"),
                     details={"offer_id": o.offer_id, "rate": rate, "lost": lost,
                              "conversions": o.conversions, "expired_click": o.expired_click,
                              "unknown_click": o.unknown_click, "next_step": step})


def conditions(s: Snapshot, th: Thresholds) -> list[Condition]:
    """Every condition observable in the snapshot."""
    out = [_failure_rate(p, th) for p in s.partners if p.attempts]
    out.append(_dead_letters(s, th))
    out.append(_retry_backlog(s, th))
    out.extend(_circuit(pid, state) for pid, state in sorted(s.circuits.items()))
    out.extend(_lost(o, th) for o in s.lost if o.conversions)
    out.extend(_gone(pid, why) for pid, why in sorted(s.gone.items()))
    out.extend(_backlog_age(pid, n, age, th) for pid, (n, age) in sorted(s.backlog_age.items()))
    return out


def transitions(observed: Sequence[Condition], open_keys: set[str]) -> list[Transition]:
    """Fire what starts, resolve what cleared or is no longer observed; leave the rest."""
    out: list[Transition] = []
    seen = set()
    for c in observed:
        seen.add(c.key)
        if c.active is True and c.key not in open_keys:
            out.append(Transition("fire", c.key, c))
        elif c.active is False and c.key in open_keys:
            out.append(Transition("resolve", c.key, c))
    out.extend(Transition("resolve", key, None) for key in sorted(open_keys - seen))
    return out
