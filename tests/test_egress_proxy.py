"""Fixed egress through a real forward proxy (proxy.py, started here): CONNECT for http and
https, the address guard still applies to the target, and a failing proxy is class `proxy`:
retried, never counted against the partner's circuit breaker or failure rate."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support.helpers import Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.delivery.sender import PostbackRequest, Sender
from postback_worker.dev.services import free_port
from postback_worker.domain.retry import ErrorKind
from postback_worker.ops.visibility import alerts
from postback_worker.pipeline.guardrails import circuit_states
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

LOOPBACK = ("127.0.0.0/8",)


class ForwardProxy:
    """proxy.py in its own process; its log shows every CONNECT it served."""

    def __init__(self, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = log
        self.extra = extra
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ForwardProxy:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port",
                 str(self.port), "--num-workers", "1", "--num-acceptors", "1", *self.extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("proxy.py did not start: " + self.output()) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def connects(self, port: int) -> int:
        return self.output().count(f"CONNECT 127.0.0.1:{port} ")


@pytest.fixture()
def proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    p = ForwardProxy(tmp_path / "proxy.log").start()
    yield p
    p.stop()


def _wait_logged(proxy: ForwardProxy, port: int, n: int) -> None:
    deadline = time.monotonic() + 10
    while proxy.connects(port) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_http_postbacks_go_through_the_proxy(proxy: ForwardProxy, partner: PartnerServer) -> None:
    with Sender(allow_networks=LOOPBACK, egress_proxy=proxy.url) as sender:
        outs = sender.send_many([PostbackRequest(f"pb{i}", f"{partner.url}/pb?i={i}")
                                 for i in range(3)])
        assert [o.status_code for o in outs] == [200] * 3
        # A partner of its own choice goes direct.
        direct = sender.send(PostbackRequest("pb-d", f"{partner.url}/d", proxy="direct"))
        assert direct.status_code == 200
    _wait_logged(proxy, partner.port, 1)
    assert 1 <= proxy.connects(partner.port) <= 3  # kept alive through the tunnel
    assert sorted(r.target for r in partner.requests) == ["/d", "/pb?i=0", "/pb?i=1", "/pb?i=2"]


def test_https_through_the_tunnel_checks_the_partners_certificate(
        proxy: ForwardProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not available")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=partner.test",
                    "-addext", "subjectAltName=DNS:partner.test"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with (PartnerServer(ssl_context=ctx) as p,
          Sender(allow_networks=LOOPBACK, egress_proxy=proxy.url,
                 resolver=lambda h, port: ["127.0.0.1"]) as s):
        port = p.port
        ok = s.send(PostbackRequest("pb1", f"https://partner.test:{port}/pb?x=1"))
        bad = s.send(PostbackRequest("pb2", f"https://other.test:{port}/pb?x=1"))
        assert ok.status_code == 200, ok
        assert p.requests[0].header("Host") == f"partner.test:{port}"
        assert bad.error is ErrorKind.TLS, bad  # the certificate is still checked, by name
        assert p.count() == 1
    _wait_logged(proxy, port, 2)
    assert proxy.connects(port) == 2


def test_proxy_credentials_and_a_refusing_proxy(tmp_path: Path, partner: PartnerServer) -> None:
    p = ForwardProxy(tmp_path / "auth-proxy.log", "--basic-auth", "egress:s3cret").start()
    try:
        base = p.url.replace("http://", "")
        with Sender(allow_networks=LOOPBACK) as sender:
            ok = sender.send(PostbackRequest("pb1", f"{partner.url}/pb",
                                             proxy=f"http://egress:s3cret@{base}"))
            refused = sender.send(PostbackRequest("pb2", f"{partner.url}/pb",
                                                  proxy=f"http://egress:wrong@{base}"))
    finally:
        p.stop()
    assert ok.status_code == 200, ok
    assert refused.error is ErrorKind.PROXY, refused
    assert "refused the tunnel" in refused.error_message and "s3cret" not in str(refused)
    assert partner.count() == 1


def test_the_address_guard_applies_to_the_target_not_the_proxy(
        proxy: ForwardProxy, partner: PartnerServer) -> None:
    # The proxy is on loopback, which the guard would refuse as a target: only the target
    # is checked. A private or metadata target is refused before the proxy is asked.
    with Sender(egress_proxy=proxy.url) as sender:
        for url in (f"{partner.url}/pb", "http://169.254.169.254/latest", "http://10.1.2.3/"):
            out = sender.send(PostbackRequest("pb", url))
            assert out.error is ErrorKind.BLOCKED_ADDRESS, (url, out)
    assert "CONNECT" not in proxy.output()
    assert partner.count() == 0


def test_unreachable_partner_behind_the_proxy_is_the_partners_network_failure(
        proxy: ForwardProxy) -> None:
    port = free_port()  # nothing listens
    with Sender(allow_networks=LOOPBACK, egress_proxy=proxy.url) as sender:
        out = sender.send(PostbackRequest("pb", f"http://127.0.0.1:{port}/pb"))
    assert out.error is ErrorKind.REFUSED, out
    assert "could not reach" in out.error_message


@pytest.fixture()
def pipeline(settings: Settings, store: Store, clock: Clock,
             redis_client: redis.Redis) -> Iterator[Pipeline]:
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    s = settings.with_overrides(breaker_enabled=True, breaker_min_attempts=4,
                                egress_proxy=dead_proxy)
    sender = Sender.from_settings(s.delivery, concurrency=8)
    yield Pipeline(s, store, sender, clock=clock, rand=lambda: 0.5, worker_name="test",
                   redis=redis_client)
    sender.close()


def test_a_failing_proxy_is_retried_and_never_counted_against_the_partner(
        pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock,
        redis_client: redis.Redis) -> None:
    add_offer(store)
    add_partner(store, "p1", partner.url, max_attempts=10)
    events = [conversion(f"tx{i}") for i in range(6)]
    for e in events:
        add_click(store, e.transaction_id)
    pipeline.process_conversions(messages(*events))
    pbs = [store.postbacks_for(e.id)[0] for e in events]
    assert {(p["state"], p["last_class"]) for p in pbs} == {("retry_scheduled", "proxy")}
    assert all("the egress proxy failed: ProxyFailed: cannot connect to the egress" in p["reason"]
               for p in pbs)
    assert partner.count() == 0
    # Six failures, four needed to open the circuit: it stays closed (not the partner's fault).
    assert circuit_states(redis_client, ["p1"]) == {"p1": "closed"}
    settings = pipeline.settings.with_overrides(alert_min_volume=1)
    fired = alerts.evaluate(settings, store, redis_client, now=clock(), sinks=[])
    assert not [e for e in fired if e.kind == "failure_rate"]
    # Routed around the broken proxy (the partner's own setting: direct), the retries deliver.
    add_partner(store, "p1", partner.url, max_attempts=10, egress_proxy="direct")
    clock.advance(120)
    ids = pipeline.sweep()
    pipeline.deliver(ids)
    assert [store.postbacks_for(e.id)[0]["state"] for e in events] == ["delivered"] * 6
