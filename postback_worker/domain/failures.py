"""What each failure class means: one table used by the retry policy, test-fire advice,
diagnosis and the support bundle (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FailureClass(StrEnum):
    """What an attempt's outcome means for delivery."""

    DELIVERED = "delivered"
    PARTNER_5XX = "partner_5xx"
    TIMEOUT = "timeout"
    THROTTLED = "throttled"
    DNS = "dns"
    NETWORK = "network"
    AUTH = "auth"
    BLOCKED = "blocked"
    GONE = "gone"
    CONFIG = "config"
    PROXY = "proxy"


class Cause(StrEnum):
    """DESIGN.md's six causes of lost postbacks (and "none")."""

    EXPIRED_CLICK = "expired_click_lifespan"
    PROVIDER = "third_party_provider"
    URL_CONFIG = "incorrect_postback_url"
    PARTNER_DOWN = "partner_timeouts_or_downtime"
    FIREWALL = "firewall_or_security"
    NETWORK = "network_or_dns"
    NONE = "no_failures_found"


@dataclass(frozen=True)
class ClassFacts:
    """The facts of one failure class."""

    retried: bool
    # Why the policy does not retry it (None when it is retried or delivered).
    not_retried: str | None
    # What to do about one such attempt, in plain words (test fire, support bundle).
    advice: str
    # The most likely of the six causes (None for delivered).
    cause: Cause | None


F = FailureClass

FACTS: dict[FailureClass, ClassFacts] = {
    F.DELIVERED: ClassFacts(
        False, None, "The partner accepted the postback. Nothing to do.", None),
    F.PARTNER_5XX: ClassFacts(
        True, None,
        "The partner's server failed (5xx). Real postbacks are retried with backoff; if it "
        "persists, ask the partner about an outage or maintenance.",
        Cause.PARTNER_DOWN),
    F.TIMEOUT: ClassFacts(
        True, None,
        "The partner did not answer in time. Real postbacks are retried; if it persists, ask "
        "the partner about slowness or raise the partner's timeout.",
        Cause.PARTNER_DOWN),
    F.THROTTLED: ClassFacts(
        True, None,
        "The partner is rate limiting us (429). Real postbacks wait for Retry-After; ask the "
        "partner for a higher limit or set the partner's rate_limit.",
        Cause.PROVIDER),
    F.DNS: ClassFacts(
        True, None,
        "The partner's host name does not resolve. Check the spelling of the host in the "
        "template, or ask the partner whether their DNS changed.",
        Cause.NETWORK),
    F.NETWORK: ClassFacts(
        True, None,
        "The connection failed (refused, reset or TLS). Check the host and port, and ask the "
        "partner whether their server or certificate changed.",
        Cause.NETWORK),
    F.AUTH: ClassFacts(
        False, "auth (HTTP 401) is not retried; the partner's credentials need fixing",
        "The partner refused our credentials (401). Ask the partner for a current token and "
        "update the template; postbacks with 401 are not retried.",
        Cause.PROVIDER),
    F.BLOCKED: ClassFacts(
        False, "blocked (HTTP 403) is not retried; the partner must allowlist us",
        "The partner's firewall refused us (403). Ask the partner to allowlist our egress IP "
        "addresses (POSTBACK_EGRESS_IPS).",
        Cause.FIREWALL),
    F.GONE: ClassFacts(
        False, "gone (HTTP 410) is not retried; the partner is paused until its endpoint is "
               "fixed and it is resumed",
        "The partner's endpoint is gone (410). Real postbacks pause the partner: ask the "
        "partner for the new endpoint, fix the template, resume the partner and replay.",
        Cause.PROVIDER),
    F.PROXY: ClassFacts(
        True, None,
        "Our egress proxy failed (unreachable or it refused the tunnel). Not the partner's "
        "fault: check POSTBACK_EGRESS_PROXY or the partner's egress_proxy.",
        Cause.NETWORK),
    F.CONFIG: ClassFacts(
        False, "config (bad URL, redirect or 4xx) is not retried; fix the postback URL",
        "The request or template is wrong for this partner (other 4xx, a redirect, a failed "
        "success check, a refused address or a template that cannot render). Compare the "
        "template with the partner's documentation and fix it.",
        Cause.URL_CONFIG),
}

RETRYABLE: frozenset[FailureClass] = frozenset(c for c, f in FACTS.items() if f.retried)
# Failures that say nothing about the partner: never counted against its circuit breaker or
# failure rate (our egress proxy failed).
NOT_THE_PARTNERS: frozenset[FailureClass] = frozenset({F.PROXY})
# Every class an attempt can fail with (what dead-letter filters accept).
FAILED_CLASSES: tuple[FailureClass, ...] = tuple(c for c in FailureClass if c is not F.DELIVERED)
# Statuses of class "config" that mean an endpoint moved or vanished (a provider change).
ENDPOINT_GONE = frozenset({404, 410})


def cause_of(failure_class: str, status: int | None) -> Cause | None:
    """Which of the six causes a failure class (and status code) points to."""
    try:
        facts = FACTS[FailureClass(failure_class)]
    except ValueError:
        return None
    if facts.cause is Cause.URL_CONFIG and status in ENDPOINT_GONE:
        return Cause.PROVIDER
    return facts.cause
