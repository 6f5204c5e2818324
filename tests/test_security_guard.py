"""Outbound address guard: what it refuses, how a refusal is classed, and DNS rebinding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import LOOPBACK
from support.helpers import add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.delivery.guard import check_address
from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.domain.retry import ErrorKind, FailureClass, classify
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("64:ff9b::7f00:1", "loopback address"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a00:1", "private address"),  # NAT64 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "cloud metadata address"),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", None),  # NAT64 of a public address (IPv6-only networks)
        ("2002:7f00:1::1", "loopback address"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::", "cloud metadata address"),
        ("2002:808:808::1", None),
        ("fec0::1", "site-local address"),
        ("::7f00:1", "reserved address"),  # IPv4-compatible (deprecated) 127.0.0.1
        ("::ffff:0:7f00:1", "reserved address"),
        ("255.255.255.255", "reserved address"),
        ("198.18.0.1", "private address"),  # benchmarking range
        ("192.0.0.170", "private address"),
        ("2001:db8::1", "private address"),  # documentation range
        ("fe80::1%eth0", "link-local address"),  # with a zone id
    ],
)
def test_more_refused_addresses(ip: str, reason: str | None) -> None:
    assert check_address(ip) == reason


def test_nat64_and_6to4_follow_the_allowlist_of_the_ipv4_they_carry() -> None:
    assert check_address("64:ff9b::7f00:1", ["127.0.0.0/8"]) is None
    assert check_address("2002:7f00:1::1", ["127.0.0.0/8"]) is None


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1"])
def test_numeric_host_spellings_of_loopback_are_refused(host: str) -> None:
    """The system resolver turns these into 127.0.0.1; the guard checks what it resolved."""
    with Sender() as s:
        out = s.send(PostbackRequest("pb_1", f"http://{host}:9/pb", timeout=1))
    assert out.error is ErrorKind.BLOCKED_ADDRESS, out
    assert "127.0.0.1 (loopback address)" in out.error_message
    assert classify(out) is FailureClass.CONFIG


def test_rebinding_answer_is_never_asked_for_again(partner: PartnerServer) -> None:
    """First answer private, a later one loopback (allowed): only the first is ever used."""
    answers = [["10.0.0.1"], ["127.0.0.1"]]
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls) - 1, 1)]

    with Sender(allow_networks=LOOPBACK, resolver=resolver) as s:
        out = s.send(PostbackRequest("pb_1", f"http://rebind.example:{partner.port}/pb"))
    assert out.error is ErrorKind.BLOCKED_ADDRESS
    assert calls == ["rebind.example"]
    assert partner.count() == 0


def test_refused_address_is_a_config_dead_letter_with_a_clear_message(
        settings: Settings, store: Store, partner: PartnerServer,
        make_pipeline: Callable[..., Pipeline]) -> None:
    add_offer(store)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    event = conversion("tx1")
    strict = settings.with_overrides(allow_networks=())
    make_pipeline(strict).process_conversions(messages(event))
    (pb,) = store.postbacks_for(event.id)
    assert pb["state"] == "dead_lettered"
    assert pb["last_class"] == "config"
    (attempt,) = store.attempts_for([pb["id"]])
    assert attempt["failure_class"] == "config"
    assert "refused to connect to 127.0.0.1 (loopback address); allowlist it with " \
           "POSTBACK_ALLOW_NETWORKS if intended" in attempt["error"]
    assert partner.count() == 0


def test_redirect_is_not_followed_and_is_config(partner: PartnerServer) -> None:
    partner.set_response(302, b"", {"Location": f"{partner.url}/elsewhere"})
    with Sender(allow_networks=LOOPBACK) as s:
        out = s.send(PostbackRequest("pb_1", f"{partner.url}/pb"))
    assert out.status_code == 302
    assert classify(out) is FailureClass.CONFIG
    assert [r.path for r in partner.received()] == ["/pb"]
