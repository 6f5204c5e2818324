"""Self-test of the local partner server used by the other tests."""

from __future__ import annotations

import http.client
import socket

import pytest
from support.partner import PartnerServer, Response


@pytest.fixture
def partner():
    with PartnerServer() as p:
        yield p


def _get(p: PartnerServer, path: str, conn: http.client.HTTPConnection | None = None):
    c = conn or http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)
    c.request("GET", path, headers={"X-Postback-Id": "pb-1"})
    r = c.getresponse()
    return r.status, r.read(), dict(r.getheaders())


def test_records_requests_and_default_answer(partner):
    status, body, _ = _get(partner, "/pb?a=1&a=2&b=")
    assert (status, body) == (200, b"OK")
    assert partner.wait_for(1, timeout=1)
    [req] = partner.received()
    assert req.method == "GET"
    assert req.path == "/pb"
    assert req.query == {"a": ["1", "2"], "b": [""]}
    assert partner.postback_ids() == ["pb-1"]
    assert partner.count() == 1


def test_post_body_recorded(partner):
    c = http.client.HTTPConnection("127.0.0.1", partner.port, timeout=5)
    c.request("POST", "/x", body=b"a=1", headers={"Content-Type": "text/plain"})
    assert c.getresponse().status == 200
    assert partner.received()[0].body == b"a=1"


def test_set_response_route_and_script(partner):
    partner.set_response(status=503, body=b"down", headers={"Retry-After": "7"})
    partner.route("/ok", status=204, body=b"")
    partner.route("/ok/deeper", status=418, body=b"teapot")
    partner.set_script([500, {"status": 201, "body": b"made"}, Response(status=202)])
    results = [_get(partner, "/any")[0] for _ in range(3)]
    assert results == [500, 201, 202]
    status, body, headers = _get(partner, "/other")
    assert (status, body, headers["Retry-After"]) == (503, b"down", "7")
    assert _get(partner, "/ok/x")[0] == 204
    assert _get(partner, "/ok/deeper/y")[:2] == (418, b"teapot")


def test_keep_alive_same_client_port(partner):
    conn = http.client.HTTPConnection("127.0.0.1", partner.port, timeout=5)
    for _ in range(5):
        assert _get(partner, "/k", conn)[0] == 200
    assert len(partner.client_ports()) == 1


def test_close_without_response(partner):
    partner.close_connection_without_response()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        _get(partner, "/x")
    assert partner.count() == 1


def test_wait_for_times_out(partner):
    assert partner.wait_for(1, timeout=0.05) is False


def test_delay_is_cut_short_by_stop():
    p = PartnerServer().start()
    p.set_response(delay=30)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert p.wait_for(1, timeout=5)
    p.stop()
    assert s.recv(100) == b""  # connection dropped, not answered after 30 s
    s.close()
