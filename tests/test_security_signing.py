"""HMAC signing: the signature, rotation, and the partner-side example verifying real requests."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT
from support.helpers import NOW, add_click, add_offer, add_partner, conversion, messages

from postback_worker.delivery import signing
from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.ops.config import change_signing, redact_partner
from postback_worker.ops.security.testfire import run_test_fire
from postback_worker.pipeline.catalog import Partner
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

GRACE = timedelta(hours=72)


def _example() -> ModuleType:
    path = Path(ROOT) / "docs" / "examples" / "verify_signature.py"
    spec = importlib.util.spec_from_file_location("verify_signature", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()


class Receiver:
    """The documented partner-side example, serving on a local port; records what it saw."""

    def __init__(self, secrets: list[str], header: str = "X-Postback-Signature") -> None:
        base = EXAMPLE.make_handler(secrets, header)
        seen: list[dict[str, Any]] = []
        self.seen = seen

        class Handler(base):  # type: ignore[misc, valid-type]
            def _check(self, payload: str) -> None:
                seen.append({"path": self.path, "headers": dict(self.headers.items())})
                super()._check(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(secrets: list[str], header: str = "X-Postback-Signature") -> Receiver:
        made.append(Receiver(secrets, header))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_signature_is_hmac_sha256_of_id_timestamp_payload() -> None:
    expected = hmac.new(b"s3cret", b"pb_1.1795725000./pb?tid=a%20b", hashlib.sha256).hexdigest()
    assert signing.signature("s3cret", "pb_1", 1795725000, "/pb?tid=a%20b") == expected
    assert EXAMPLE.expected_signature("s3cret", "pb_1", "1795725000", "/pb?tid=a%20b") == expected


@pytest.mark.parametrize(
    ("offset_hours", "count"),
    [(0, 2), (71, 2), (72, 1), (100, 1)],
)
def test_both_signatures_during_the_grace_period(offset_hours: int, count: int) -> None:
    keys = signing.SigningKeys("new", previous="old", previous_until=NOW + GRACE)
    headers = signing.request_headers(keys, "pb_1", "/pb?x=1",
                                      NOW + timedelta(hours=offset_hours))
    values = headers["X-Postback-Signature"].split(",")
    assert len(values) == count and all(v.startswith("v1=") for v in values)
    assert headers["X-Postback-Timestamp"] == str(int((NOW + timedelta(hours=offset_hours))
                                                      .timestamp()))


@pytest.mark.parametrize(
    ("secrets", "header", "now_offset", "ok"),
    [
        (["new"], None, 0, True),
        (["old"], None, 0, True),  # rotation: the partner still has the old secret
        (["other"], None, 0, False),
        (["new"], "v1=deadbeef", 0, False),
        (["new"], None, 301, False),  # stale timestamp: replay refused
        (["new"], None, -301, False),
    ],
)
def test_example_verifier(secrets: list[str], header: str | None, now_offset: int,
                          ok: bool) -> None:
    keys = signing.SigningKeys("new", previous="old", previous_until=NOW + GRACE)
    h = signing.request_headers(keys, "pb_1", "/pb?x=1&y=%26", NOW)
    value = header or h["X-Postback-Signature"]
    assert EXAMPLE.verify(secrets, "pb_1", h["X-Postback-Timestamp"], value, "/pb?x=1&y=%26",
                          now=NOW.timestamp() + now_offset) is ok
    assert signing.verify(secrets, "pb_1", h["X-Postback-Timestamp"], "/pb?x=1&y=%26", value,
                          NOW + timedelta(seconds=now_offset)) is ok


@pytest.mark.parametrize(
    ("url", "method", "body", "payload"),
    [
        ("http://127.0.0.1:{port}/pb?a=1&b=%26", "GET", None, "/pb?a=1&b=%26"),
        ("http://127.0.0.1:{port}/pb?a=1&b=2", "POST", None, "a=1&b=2"),  # query as form
        ("http://127.0.0.1:{port}/pb?k=1", "POST", '{"tid": "x"}', '{"tid": "x"}'),
    ],
)
def test_the_sender_signs_what_it_sends(partner: Any, url: str, method: str, body: str | None,
                                        payload: str) -> None:
    """The sender signs the request itself: the target as sent, or the body as sent."""
    keys = signing.SigningKeys("k")
    with Sender(allow_networks=("127.0.0.0/8",)) as sender:
        outcome = sender.send(PostbackRequest(
            "pb_1", url.format(port=partner.port), method, body=body, signing=keys,
            signed_at=NOW, headers={"X-Postback-Signature": "forged", "X-Api-Key": "k1"}))
    assert outcome.status_code == 200
    got = partner.requests[-1]
    assert (got.body.decode() if got.body else got.target) == payload
    assert got.header("X-Postback-Signature") == "v1=" + signing.signature(
        "k", "pb_1", int(NOW.timestamp()), payload)
    assert got.header("X-Api-Key") == "k1"


def test_unsigned_request_gets_no_signature_headers(partner: Any) -> None:
    with Sender(allow_networks=("127.0.0.0/8",)) as sender:
        sender.send(PostbackRequest("pb", f"http://127.0.0.1:{partner.port}/pb"))
    assert partner.requests[-1].header("X-Postback-Timestamp") is None
    assert repr(signing.SigningKeys("topsecret")).count("topsecret") == 0


def test_pipeline_postbacks_verify_with_the_documented_example(
        settings: Settings, store: Store, receiver_factory: Any) -> None:
    """Real clock here: the example checks timestamps against its own clock."""
    now = datetime.now(UTC)
    add_offer(store)
    add_click(store, "tx1")
    add_click(store, "tx2")
    add_partner(store, "p1", "http://127.0.0.1:1", success_check="success=true")
    secret, _ = change_signing(store, "p1", "enable", now, GRACE)
    assert secret
    receiver = receiver_factory([secret])
    add_partner(store, "p1", receiver.url, success_check="success=true")
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        pipeline = Pipeline(settings, store, sender)
        first = conversion("tx1", payout="1.50")
        pipeline.process_conversions(messages(first))
        assert store.postbacks_for(first.id)[0]["state"] == "delivered", receiver.seen

        # Rotate: the partner still only knows the old secret; both signatures are sent.
        new_secret, summary = change_signing(store, "p1", "rotate", now, GRACE)
        assert new_secret and new_secret != secret and "old one also signs until" in summary
        second = conversion("tx2", payout="2.50")
        pipeline.process_conversions(messages(second))
        assert store.postbacks_for(second.id)[0]["state"] == "delivered"
    sigs = [r["headers"]["X-Postback-Signature"] for r in receiver.seen]
    assert [len(s.split(",")) for s in sigs] == [1, 2]
    assert receiver.seen[0]["headers"]["X-Postback-Id"] == store.postbacks_for(first.id)[0]["id"]


def test_wrong_secret_is_refused_by_the_partner(settings: Settings, store: Store,
                                                receiver_factory: Any) -> None:
    receiver = receiver_factory(["not-the-secret"])
    add_partner(store, "p1", receiver.url, success_check="success=true")
    now = datetime.now(UTC)
    change_signing(store, "p1", "enable", now, GRACE)
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        report = run_test_fire(store, store.get_partner("p1") or {}, now, sender=sender,
                               fire=True)
    assert (report.status_code, report.failure_class) == (401, "auth")
    assert report.signed


def test_custom_header_and_disable(store: Store) -> None:
    add_partner(store, "p1", "https://p.example")
    secret, _ = change_signing(store, "p1", "enable", NOW, GRACE, header="X-Sig")
    row = store.get_partner("p1") or {}
    partner = Partner.from_row(row)
    assert partner.signing is not None
    headers = signing.request_headers(partner.signing, "pb_1", "/pb?tid=1", NOW)
    assert set(headers) == {"X-Postback-Timestamp", "X-Sig"}
    assert secret not in repr(partner)
    shown = redact_partner(row)
    assert shown["signing"] is True and secret not in str(shown)
    again, summary = change_signing(store, "p1", "enable", NOW, GRACE)
    assert again is None and "already enabled" in summary
    change_signing(store, "p1", "disable", NOW, GRACE)
    assert Partner.from_row(store.get_partner("p1") or {}).signing is None
