"""Template hosts: IPv6 literals in brackets are hosts, not characters to encode."""

from __future__ import annotations

import pytest

from postback_worker.domain.validator import host_of, validate

T = "?tid={transaction_id}"


def errors(template: str) -> list[tuple[str, str, str]]:
    return [(p.code, p.message, p.fix) for p in validate(template) if p.severity == "error"]


@pytest.mark.parametrize("template", [
    "http://[::1]:8080/pb" + T,
    "https://[2001:db8::1]/pb" + T,
    "https://[2001:db8::1]:8443/pb" + T,
    "https://user:pw@[2001:db8:0:0:0:0:0:7]/pb" + T,
    "https://[::ffff:192.0.2.1]/pb" + T,
])
def test_ipv6_literal_hosts_are_accepted(template: str) -> None:
    assert errors(template) == []


@pytest.mark.parametrize(("template", "code", "message", "fix"), [
    ("https://[zz]/pb" + T, "host",
     "[zz] is not an IPv6 address; a host in brackets must be one, e.g. [2001:db8::1]", ""),
    ("https://[192.0.2.1]/pb" + T, "host",
     "[192.0.2.1] is not an IPv6 address; write an IPv4 address without brackets: 192.0.2.1",
     "192.0.2.1"),
    ("https://[::1/pb" + T, "host",
     "unclosed '[' in the host '[::1'; an IPv6 address is written in brackets, e.g. "
     "https://[2001:db8::1]/pb", "[::1]"),
    ("https://[]/pb" + T, "host", "missing host", "https://partner.example/..."),
])
def test_bad_bracketed_hosts_get_one_exact_reason(template: str, code: str, message: str,
                                                  fix: str) -> None:
    assert errors(template) == [(code, message, fix)]


@pytest.mark.parametrize(("template", "expected"), [
    ("https://[2001:db8::1]:8443/pb" + T, ("2001:db8::1", 8)),
    ("http://[::1]/x" + T, ("::1", 7)),
    ("https://t.example/pb" + T, ("t.example", 8)),
])
def test_host_of(template: str, expected: tuple[str, int]) -> None:
    assert host_of(template) == expected


def test_brackets_outside_the_host_still_need_encoding() -> None:
    assert [c for c, _, _ in errors("https://[::1]/pb?tid={transaction_id}&a=[b]")] == [
        "encoding", "encoding"]
