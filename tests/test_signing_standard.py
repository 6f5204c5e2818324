"""Standard Webhooks signing beside our HMAC: the `standardwebhooks` package is the receiver.

Real clock: the package checks timestamps against its own clock (5 minutes tolerance).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support.helpers import add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer, ReceivedRequest

from postback_worker.cli import main
from postback_worker.delivery import signing
from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.ops.config import change_signing
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

GRACE = timedelta(hours=72)
BODY = '{"click_id": "{transaction_id}", "amount": "{payout}"}'


@pytest.fixture()
def pipeline(settings: Settings, store: Store) -> Iterator[Pipeline]:
    sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=4)
    yield Pipeline(settings, store, sender, worker_name="test")
    sender.close()


def _verify(secret: str, got: ReceivedRequest) -> None:
    """What a partner does with the package: body (or the request target for a GET)."""
    payload = got.body.decode() if got.body else got.target
    Webhook(secret).verify(payload, dict(got.headers), json_parse=False)


def test_json_postbacks_verify_with_standardwebhooks_across_a_rotation(
        pipeline: Pipeline, store: Store, partner: PartnerServer) -> None:
    now = datetime.now(UTC)
    add_offer(store)
    for tx in ("tx1", "tx2"):
        add_click(store, tx)
    add_partner(store, "p1", partner.url, method="POST", body_format="json",
                body_template=BODY)
    secret, summary = change_signing(store, "p1", "enable", now, GRACE, scheme="standard")
    assert secret and secret.startswith("whsec_") and "(standard)" in summary
    first = conversion("tx1", payout="1.50")
    pipeline.process_conversions(messages(first))
    got = partner.requests[-1]
    pb_id = store.postbacks_for(first.id)[0]["id"]
    assert got.header("webhook-id") == pb_id and got.header("X-Postback-Signature") is None
    _verify(secret, got)
    with pytest.raises(WebhookVerificationError):
        _verify(signing.new_secret(signing.STANDARD), got)

    new_secret, _ = change_signing(store, "p1", "rotate", now, GRACE)
    assert new_secret and new_secret.startswith("whsec_")
    second = conversion("tx2", payout="2.50")
    pipeline.process_conversions(messages(second))
    got = partner.requests[-1]
    assert len((got.header("webhook-signature") or "").split(" ")) == 2
    _verify(secret, got)  # the partner has not switched yet
    _verify(new_secret, got)  # ... or already has
    assert json.loads(got.body) == {"click_id": "tx2", "amount": "2.50"}


def test_get_request_signs_the_request_target(partner: PartnerServer) -> None:
    secret = signing.new_secret(signing.STANDARD)
    keys = signing.SigningKeys(secret, scheme=signing.STANDARD)
    with Sender(allow_networks=("127.0.0.0/8",)) as sender:
        sender.send(PostbackRequest("pb_1", f"{partner.url}/pb?tid=a%20b&x=1", signing=keys))
    got = partner.requests[-1]
    Webhook(secret).verify("/pb?tid=a%20b&x=1", dict(got.headers), json_parse=False)


def test_switching_scheme_starts_over_with_a_new_secret(store: Store,
                                                        partner: PartnerServer) -> None:
    now = datetime.now(UTC)
    add_partner(store, "p1", partner.url)
    old, _ = change_signing(store, "p1", "enable", now, GRACE)
    new, summary = change_signing(store, "p1", "enable", now, GRACE, scheme="standard")
    row = store.get_partner("p1") or {}
    assert old and new and new.startswith("whsec_") and "switched from hmac to standard" in summary
    assert row["signature_scheme"] == "standard" and row["hmac_secret_previous"] is None
    with pytest.raises(Exception, match="scheme"):
        change_signing(store, "p1", "rotate", now, GRACE, scheme="rsa")


def test_cli_signing_scheme_option(store: Store, settings: Settings,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    add_partner(store, "p1", "https://p.example")
    r = CliRunner().invoke(main, ["partners", "signing", "p1", "--enable", "--scheme",
                                  "standard"])
    assert r.exit_code == 0, r.output
    assert "signing enabled (standard)" in r.output and "whsec_" in r.output
    r = CliRunner().invoke(main, ["partners", "signing", "p1", "--enable", "--scheme", "x"])
    assert r.exit_code == 2
