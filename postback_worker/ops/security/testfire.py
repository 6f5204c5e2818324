"""Test-fire a partner's postback: render it with sample (or given) values, optionally send it
once and explain the outcome. A fired test is recorded as an attempt with is_test = true on a
conversion and postback in state "test", so delivery reports can leave it out."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.domain.diagnosis import TITLES
from postback_worker.domain.failures import FACTS, Cause, cause_of
from postback_worker.domain.macros import TemplateError, macro_values, render, render_body
from postback_worker.domain.masking import mask_body, mask_headers, mask_url
from postback_worker.domain.retry import FailureClass, classify, describe
from postback_worker.pipeline.catalog import Partner

TEST_STATE = "test"
EXCERPT_CHARS = 300

@dataclass
class FireReport:
    """What `partners test` shows (URLs with secrets masked)."""

    partner_id: str
    method: str
    url: str
    values: dict[str, str]
    fired: bool = False
    status_code: int | None = None
    duration_ms: float | None = None
    response_excerpt: str | None = None
    failure_class: str | None = None
    outcome: str | None = None
    cause: str | None = None
    advice: str | None = None
    signed: bool = False
    postback_id: str | None = None
    problems: list[str] = field(default_factory=list)
    # The request body (secret-looking fields masked) and custom header names (values masked).
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    signature_scheme: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_values(partner_id: str, postback_id: str, now: datetime, *,
                  transaction_id: str | None = None, payout: str | None = None,
                  random_value: str = "r4nd0m") -> dict[str, str]:
    """Macro values for a test: realistic samples, or the given transaction id and payout."""
    conversion = {
        "id": "cv_test", "transaction_id": transaction_id or "tx_test_0001",
        "offer_id": "test-offer", "goal_id": "", "payout": payout or "1.00",
        "sale_amount": "10.00", "currency": "USD", "status": "approved", "adv_sub": "order-1",
        "ip": "203.0.113.7", "device_id": "test-device",
    }
    click = {"aff_id": partner_id, "aff_sub": "sub1", "aff_sub2": "sub2", "source": "test"}
    return macro_values(conversion=conversion, click=click, postback_id=postback_id, now=now,
                        random_value=random_value)


def run_test_fire(store: Any, partner: Mapping[str, Any], now: datetime, *,
              sender: Sender | None = None, fire: bool = False,
              transaction_id: str | None = None, payout: str | None = None,
              clock: Callable[[], datetime] | None = None) -> FireReport:
    """Render the partner's postback and, with `fire`, send it once and record the attempt."""
    postback_id = "pb_test_" + secrets.token_hex(8)
    values = sample_values(partner["id"], postback_id, now, transaction_id=transaction_id,
                           payout=payout)
    method = partner["method"]
    p = Partner.from_row(partner)
    try:
        url = render(partner["postback_url"], values)
        body = (render_body(p.body_template, p.body_format, values)
                if p.body_format and p.body_template else None)
    except TemplateError as exc:
        return FireReport(partner["id"], method, mask_url(partner["postback_url"]), values,
                          failure_class="config", outcome="template cannot render",
                          cause=TITLES[cause_of("config", None) or Cause.URL_CONFIG],
                          advice=FACTS[FailureClass.CONFIG].advice,
                          problems=[p.describe() for p in exc.problems])
    result = FireReport(partner["id"], method, mask_url(url), values,
                        signed=p.signing is not None, body=mask_body(body, p.body_format),
                        headers=mask_headers(p.headers),
                        signature_scheme=p.signing.scheme if p.signing else None)
    if not fire:
        return result
    assert sender is not None, "firing needs a Sender"
    outcome = sender.send(PostbackRequest(
        postback_id=postback_id, url=url, method=method, timeout=p.timeout, headers=p.headers,
        body=body, content_type=p.content_type, signing=p.signing, signed_at=now,
        proxy=p.egress_proxy))
    failure = classify(outcome, partner.get("success_check"))
    cause = cause_of(failure.value, outcome.status_code)
    result.fired = True
    result.postback_id = postback_id
    result.status_code = outcome.status_code
    result.duration_ms = round(outcome.duration_ms, 1)
    result.response_excerpt = outcome.body_excerpt[:EXCERPT_CHARS]
    result.failure_class = failure.value
    result.outcome = describe(outcome, failure)
    result.cause = TITLES[cause] if cause else None
    result.advice = FACTS[failure].advice
    _record(store, partner, postback_id, url, result.body, now, outcome, failure,
            result.outcome, (clock or (lambda: now))())
    return result


def _record(store: Any, partner: Mapping[str, Any], postback_id: str, url: str,
            masked_body: str | None, started: datetime, outcome: Any, failure: FailureClass,
            text: str, finished: datetime) -> None:
    conversion_id = "cv_test_" + postback_id.removeprefix("pb_test_")
    delivered = failure is FailureClass.DELIVERED
    store.record_test_fire(
        conversion=dict(
            id=conversion_id, transaction_id="test-fire", offer_id=None, aff_id=partner["id"],
            goal_id="", status="approved", occurred_at=started, received_at=started,
            state=TEST_STATE, reason="test fire (partners test --fire)", processed_at=finished),
        postback=dict(
            id=postback_id, conversion_id=conversion_id, partner_id=partner["id"],
            url=mask_url(url), method=partner["method"], body=masked_body, state=TEST_STATE,
            reason=None if delivered else text, attempts=1, first_attempt_at=started,
            last_attempt_at=started, last_status=outcome.status_code,
            last_class=failure.value, received_at=started, created_at=started,
            updated_at=finished, delivered_at=finished if delivered else None,
            triggered_by="test-fire"),
        attempt=dict(
            postback_id=postback_id, attempt_no=1, started_at=started,
            duration_ms=round(outcome.duration_ms, 3), url=mask_url(url),
            status_code=outcome.status_code, failure_class=failure.value,
            error=None if delivered else text, response_excerpt=outcome.body_excerpt,
            worker="test-fire", is_test=True))
