"""The most likely of DESIGN.md's six causes of lost postbacks, from counts (pure).

Which cause a failure class points to is the table in `domain.failures`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from postback_worker.domain.failures import Cause, cause_of

__all__ = ["ACTIONS", "TITLES", "Cause", "Diagnosis", "cause_of", "diagnose"]

EXPIRED_CLICK = Cause.EXPIRED_CLICK
PROVIDER = Cause.PROVIDER
URL_CONFIG = Cause.URL_CONFIG
PARTNER_DOWN = Cause.PARTNER_DOWN
FIREWALL = Cause.FIREWALL
NETWORK = Cause.NETWORK
NONE = Cause.NONE

TITLES = {
    EXPIRED_CLICK: "expired click session lifespan",
    PROVIDER: "third-party provider problems (rate limits, expired tokens, endpoint changes)",
    URL_CONFIG: "incorrect postback URL configuration",
    PARTNER_DOWN: "partner timeouts or downtime",
    FIREWALL: "firewall or security restrictions",
    NETWORK: "network or DNS issues",
    NONE: "no failures found",
}

ACTIONS = {
    EXPIRED_CLICK: "Conversions came after the offer's click session lifespan. If the campaign's "
                   "conversion window is longer, extend the offer's lifespan and run "
                   "'postback-worker reattribute --offer ID'.",
    PROVIDER: "The partner (or its tracking provider) throttled us, refused our credentials or "
              "moved its endpoint. Ask them about rate limits, token expiry and endpoint "
              "changes; fix the partner's postback URL if it changed, then replay the dead "
              "letters.",
    URL_CONFIG: "The partner's endpoint rejected the postback URL as sent (4xx, redirect, failed "
                "success check or a template that cannot render). Check the template against "
                "the partner's documentation, fix it, then replay: replays use the current "
                "template.",
    PARTNER_DOWN: "The partner's server answered 5xx or did not answer in time. Ask the partner "
                  "about outages or maintenance in this time range; once it is up, replay the "
                  "dead letters.",
    FIREWALL: "The partner's server refused us (HTTP 403). Ask the partner to allowlist our "
              "egress IP addresses listed in this bundle, then replay the dead letters.",
    NETWORK: "DNS lookups or connections to the partner's host failed. Check the host name in "
             "the postback URL and ask the partner whether their DNS or network changed.",
    NONE: "Every postback in this range was delivered or is still being retried normally. "
          "Send the partner the postback ids in this bundle so they can look them up on their "
          "side.",
}

@dataclass(frozen=True)
class Diagnosis:
    """The most likely cause, the evidence (cause -> count) and what to do."""

    cause: Cause
    title: str
    action: str
    evidence: dict[Cause, int]

    def summary(self) -> str:
        lines = [f"Most likely cause: {self.title}.", "", self.action]
        if self.evidence:
            lines += ["", "Evidence (affected postbacks or conversions per cause):"]
            for cause, n in sorted(self.evidence.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {TITLES[cause]}: {n}")
        return "\n".join(lines)


def diagnose(failed: Mapping[tuple[str, int | None], int], expired_conversions: int) -> Diagnosis:
    """`failed`: (failure class, last status) -> postbacks not delivered; plus expired clicks.

    Ties go to the cause listed first in DESIGN.md.
    """
    evidence: dict[Cause, int] = {}
    if expired_conversions:
        evidence[EXPIRED_CLICK] = expired_conversions
    for (failure_class, status), n in failed.items():
        cause = cause_of(failure_class, status)
        if cause is not None and n > 0:
            evidence[cause] = evidence.get(cause, 0) + n
    if not evidence:
        return Diagnosis(NONE, TITLES[NONE], ACTIONS[NONE], {})
    order = [EXPIRED_CLICK, PROVIDER, URL_CONFIG, PARTNER_DOWN, FIREWALL, NETWORK]
    best = max(order, key=lambda c: (evidence.get(c, 0), -order.index(c)))
    return Diagnosis(best, TITLES[best], ACTIONS[best], evidence)
