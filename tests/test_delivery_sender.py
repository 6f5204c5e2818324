"""Sender against a real local partner server (no HTTP mocks)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest
from support.partner import PartnerServer

from postback_worker.delivery import PostbackRequest, Sender, check_address, resolve_and_check
from postback_worker.domain.retry import ErrorKind

LOOPBACK = ("127.0.0.0/8", "::1/128")


@pytest.fixture
def partner():
    with PartnerServer() as p:
        yield p


@pytest.fixture
def sender():
    with Sender(allow_networks=LOOPBACK, concurrency=32) as s:
        yield s


def req(url: str, pid: str = "pb-1", **kw) -> PostbackRequest:
    return PostbackRequest(postback_id=pid, url=url, **kw)


@pytest.mark.parametrize(
    ("status", "body", "headers", "excerpt", "retry_after"),
    [
        (200, b"OK success=true", {}, "OK success=true", None),
        (204, b"", {}, "", None),
        (302, b"moved", {"Location": "http://127.0.0.1:9/elsewhere"}, "moved", None),
        (503, b"maintenance", {"Retry-After": "120"}, "maintenance", "120"),
        (
            429,
            b"slow down",
            {"Retry-After": "Wed, 21 Oct 2037 07:28:00 GMT"},
            "slow down",
            "Wed, 21 Oct 2037 07:28:00 GMT",
        ),
        (404, b"\xff\xfenot utf8", {}, "\ufffd\ufffdnot utf8", None),
    ],
)
def test_status_passed_through(partner, sender, status, body, headers, excerpt, retry_after):
    partner.set_response(status=status, body=body, headers=headers)
    out = sender.send(req(partner.url + "/pb?x=1"))
    assert out.error is None, out.error_message
    assert out.status_code == status
    assert out.body_excerpt == excerpt
    assert out.retry_after == retry_after
    assert out.duration_ms > 0
    assert partner.count() == 1  # a 302 is not followed


def test_body_excerpt_is_capped_and_connection_reused(partner):
    partner.set_response(body=b"a" * 5000)
    with Sender(allow_networks=LOOPBACK, excerpt_bytes=10) as s:
        outs = [s.send(req(partner.url + "/big")) for _ in range(3)]
    assert [o.body_excerpt for o in outs] == ["a" * 10] * 3
    assert len(partner.client_ports()) == 1  # the rest was drained, connection kept


def test_huge_body_drops_connection(partner):
    partner.set_response(body=b"b" * 200_000)
    with Sender(allow_networks=LOOPBACK, excerpt_bytes=4) as s:
        outs = [s.send(req(partner.url + "/huge")) for _ in range(2)]
    assert [(o.status_code, o.body_excerpt) for o in outs] == [(200, "bbbb")] * 2
    assert len(partner.client_ports()) == 2


def test_headers_sent(partner, sender):
    out = sender.send(req(partner.url + "/h?a=1", pid="pb-42", headers={"X-Sig": "abc"}))
    assert out.status_code == 200
    [r] = partner.received()
    assert r.header("X-Postback-Id") == "pb-42"
    assert r.header("User-Agent") == "postback-worker/0.1"
    assert r.header("X-Sig") == "abc"
    assert r.header("Host") == f"127.0.0.1:{partner.port}"
    assert r.query == {"a": ["1"]}
    assert partner.postback_ids() == ["pb-42"]


def test_post_sends_query_as_form_body(partner, sender):
    out = sender.send(req(partner.url + "/conv?tid=abc%20d&payout=1.5", method="POST"))
    assert out.status_code == 200
    [r] = partner.received()
    assert (r.method, r.path, r.query) == ("POST", "/conv", {})
    assert r.body == b"tid=abc%20d&payout=1.5"
    assert r.header("Content-Type") == "application/x-www-form-urlencoded"


def test_timeout(partner, sender):
    partner.set_response(delay=3)
    out = sender.send(req(partner.url + "/slow?token=s3cret", timeout=0.3))
    assert out.error is ErrorKind.TIMEOUT, out
    assert out.status_code is None
    assert 250 < out.duration_ms < 2500
    assert "s3cret" not in out.error_message


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_refused(sender):
    out = sender.send(req(f"http://127.0.0.1:{_closed_port()}/pb?token=s3cret"))
    assert out.error is ErrorKind.REFUSED, out
    assert "s3cret" not in out.error_message
    assert "\n" not in out.error_message


def test_reset_when_server_closes_without_answer(partner, sender):
    partner.close_connection_without_response()
    out = sender.send(req(partner.url + "/drop"))
    assert out.error is ErrorKind.RESET, out


def test_dns_failure(sender):
    out = sender.send(req("http://nonexistent.invalid/pb?x=1"))
    assert out.error is ErrorKind.DNS, out


def test_tls_failure_against_plain_http(partner, sender):
    out = sender.send(req(f"https://127.0.0.1:{partner.port}/pb"))
    assert out.error is ErrorKind.TLS, out


@pytest.mark.parametrize(
    "url", ["127.0.0.1/no-scheme", "ftp://example.com/x", "http:///nohost", "http://[::1/x"]
)
def test_invalid_url(sender, url):
    out = sender.send(req(url))
    assert out.error is ErrorKind.INVALID_URL, out


def test_loopback_blocked_without_allowlist(partner):
    with Sender() as s:
        out = s.send(req(partner.url + "/pb"))
    assert out.error is ErrorKind.BLOCKED_ADDRESS
    assert out.error_message == (
        "refused to connect to 127.0.0.1 (loopback address); "
        "allowlist it with POSTBACK_ALLOW_NETWORKS if intended"
    )
    assert partner.count() == 0


def test_ip_literal_check_is_the_same_every_time(partner):
    """An IP-literal host's check is remembered per sender: still refused (each time, with
    the same message) without an allowlist, still delivered with one, never resolved."""
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError(f"an IP literal is not resolved ({host})")

    url = partner.url + "/pb"
    with Sender(resolver=resolver) as s:
        outs = s.send_many([req(url, f"pb-{i}") for i in range(3)]) + [s.send(req(url))]
    assert {(o.error, o.error_message) for o in outs} == {(
        ErrorKind.BLOCKED_ADDRESS,
        "refused to connect to 127.0.0.1 (loopback address); "
        "allowlist it with POSTBACK_ALLOW_NETWORKS if intended")}
    with Sender(allow_networks=LOOPBACK, resolver=resolver) as s:
        outs = [s.send(req(url, f"pb-{i}")) for i in range(3)]
    assert [o.status_code for o in outs] == [200, 200, 200]
    assert partner.count() == 3


def test_connects_to_checked_ip_with_original_host_header(partner):
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return ["127.0.0.1"]

    with Sender(allow_networks=LOOPBACK, resolver=resolver) as s:
        out = s.send(req(f"http://partner.example:{partner.port}/pb"))
    assert out.status_code == 200, out
    assert calls == [("partner.example", partner.port)]
    assert partner.received()[0].header("Host") == f"partner.example:{partner.port}"


@pytest.mark.parametrize(
    ("answers", "blocked_ip"),
    [
        (["10.0.0.1"], "10.0.0.1"),
        (["169.254.169.254"], "169.254.169.254"),
        (["::ffff:192.168.1.1"], "::ffff:192.168.1.1"),
    ],
)
def test_resolved_private_address_blocked(answers, blocked_ip):
    with Sender(resolver=lambda h, p: answers) as s:
        out = s.send(req("http://partner.example/pb"))
    assert out.error is ErrorKind.BLOCKED_ADDRESS
    assert f"refused to connect to {blocked_ip} " in out.error_message


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("10.0.0.1", "private address"),
        ("172.16.5.4", "private address"),
        ("192.168.0.10", "private address"),
        ("127.0.0.1", "loopback address"),
        ("169.254.169.254", "cloud metadata address"),
        ("169.254.1.1", "link-local address"),
        ("0.0.0.0", "unspecified address"),
        ("224.0.0.1", "multicast address"),
        ("240.0.0.1", "reserved address"),
        ("100.64.0.1", "shared (carrier-grade NAT) address"),
        ("::1", "loopback address"),
        ("::", "unspecified address"),
        ("fe80::1", "link-local address"),
        ("fc00::1", "private address"),
        ("fd00:ec2::254", "cloud metadata address"),
        ("ff02::1", "multicast address"),
        ("::ffff:127.0.0.1", "loopback address"),
        ("::ffff:10.1.2.3", "private address"),
        ("::ffff:169.254.169.254", "cloud metadata address"),
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("not-an-ip", "not an IP address"),
    ],
)
def test_check_address(ip, reason):
    assert check_address(ip, ()) == reason


@pytest.mark.parametrize(
    ("ip", "allow", "allowed"),
    [
        ("127.0.0.1", ["127.0.0.0/8"], True),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
        ("::1", ["127.0.0.0/8"], False),
        ("::1", ["::1/128"], True),
        ("10.1.2.3", ["10.1.0.0/16"], True),
        ("10.2.0.1", ["10.1.0.0/16"], False),
    ],
)
def test_check_address_allowlist(ip, allow, allowed):
    assert (check_address(ip, allow) is None) is allowed


def test_resolve_and_check_keeps_only_allowed_addresses():
    addrs, reason = resolve_and_check("h.example", 80, (), lambda h, p: ["10.0.0.1", "8.8.8.8"])
    assert (addrs, reason) == (["8.8.8.8"], None)
    addrs, reason = resolve_and_check("h.example", 80, (), lambda h, p: ["10.0.0.1"])
    assert addrs == ["10.0.0.1"] and reason is not None and "10.0.0.1 (private" in reason


def test_bad_allowlist_rejected_at_construction():
    with pytest.raises(ValueError, match="POSTBACK_ALLOW_NETWORKS"):
        Sender(allow_networks=["10.0.0.0/33"])


def test_keep_alive_reuses_connections(partner, sender):
    outs = [sender.send(req(partner.url + f"/ka?i={i}", pid=f"pb-{i}")) for i in range(50)]
    assert {o.status_code for o in outs} == {200}
    assert partner.count() == 50
    assert len(partner.client_ports()) <= 2


def test_send_many_is_concurrent_and_ordered(partner, sender):
    partner.set_response(delay=0.2)
    partner.route("/fail", status=500, delay=0.2)
    reqs = [
        req(partner.url + ("/fail" if i % 10 == 0 else "/ok") + f"?i={i}", pid=f"pb-{i}")
        for i in range(100)
    ]
    started = time.monotonic()
    outs = sender.send_many(reqs)
    assert time.monotonic() - started < 5
    assert [o.status_code for o in outs] == [500 if i % 10 == 0 else 200 for i in range(100)]
    assert sorted(partner.postback_ids()) == sorted(f"pb-{i}" for i in range(100))


def test_send_many_single_and_empty(partner, sender):
    assert sender.send_many([]) == []
    [out] = sender.send_many([req(partner.url + "/one")])
    assert out.status_code == 200


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_usable_after_fork(partner, sender):
    assert sender.send(req(partner.url + "/parent")).status_code == 200
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must build its own pools, never share the parent's sockets
        try:
            out = sender.send(req(partner.url + "/child"))
            os.write(write_fd, str(out.status_code).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    _, _ = os.waitpid(pid, 0)
    assert os.read(read_fd, 10) == b"200"
    os.close(read_fd)
    assert sender.send(req(partner.url + "/parent-again")).status_code == 200
    assert len(partner.client_ports()) == 2


@pytest.fixture(scope="module")
def partner_cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for partner.test (needs the openssl binary)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not available")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=partner.test",
         "-addext", "subjectAltName=DNS:partner.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize(("name", "ok"), [("partner.test", True), ("other.test", False)])
def test_tls_pinned_ip_keeps_sni_and_hostname_check(partner_cert, monkeypatch, name, ok):
    cert, key = partner_cert
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trusted by the default context
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with (
        PartnerServer(ssl_context=ctx) as p,
        Sender(allow_networks=LOOPBACK, resolver=lambda h, port: ["127.0.0.1"]) as s,
    ):
        out = s.send(req(f"https://{name}:{p.port}/pb?x=1"))
        if ok:
            assert out.status_code == 200, out
            assert p.received()[0].header("Host") == f"partner.test:{p.port}"
        else:  # the certificate is checked against the URL's host, not the pinned IP
            assert out.error is ErrorKind.TLS, out
            assert "other.test" in out.error_message, out
            assert p.count() == 0
