"""API security over real HTTP (uvicorn): keys and scopes, the advertiser security token,
secrets never shown, template refusal, validate / test-fire / signing / audit / keys routes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
import requests
from conftest import ADMIN
from support.helpers import NOW, add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.ops.security.apikeys import create_key
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


@pytest.fixture()
def api(serve: Callable[[Settings], str], settings: Settings, store: Store,
        redis_client: redis.Redis) -> str:
    return serve(settings.with_overrides(api_key_cache_seconds=0.0))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


CONVERSION = {"transaction_id": "tx1", "payout": "1.5"}
CLICK = {"offer_id": "o1", "aff_id": "p1"}


@pytest.mark.parametrize(
    ("method", "path", "body", "scope_needed"),
    [
        ("POST", "/v1/conversions", CONVERSION, "ingest"),
        ("POST", "/v1/clicks", CLICK, "ingest"),
        ("GET", "/postback?transaction_id=tx1", None, "ingest"),
        ("GET", "/v1/offers", None, "admin"),
        ("GET", "/v1/partners", None, "admin"),
        ("GET", "/v1/conversions/cv_nope", None, "admin"),
        ("GET", "/v1/audit", None, "admin"),
        ("GET", "/v1/keys", None, "admin"),
        ("POST", "/v1/templates/validate", {"url": "https://p.example/?t={transaction_id}"},
         "admin"),
    ],
)
def test_scopes(api: str, store: Store, method: str, path: str, body: object,
                scope_needed: str) -> None:
    add_offer(store)
    _, ingest = create_key(store, "backend", ["ingest"], NOW)
    _, admin = create_key(store, "ops", ["admin"], NOW)

    def call(headers: dict[str, str]) -> requests.Response:
        return requests.request(method, api + path, json=body, headers=headers, timeout=10)

    r = call({})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer <API key>" in r.json()["error"]
    assert call(bearer("pbw_key_nope_x")).status_code == 401
    assert call({"Authorization": "Basic dXNlcjpwdw=="}).status_code == 401
    r = call(bearer(ingest))
    if scope_needed == "admin":
        assert r.status_code == 403 and r.json()["error"] == "this API key lacks the 'admin' scope"
    else:
        assert r.status_code < 400, r.text
    assert call(bearer(admin)).status_code < 400 or path.startswith("/v1/conversions/cv")
    assert call(ADMIN).status_code < 400 or path.startswith("/v1/conversions/cv")


def test_public_endpoints(api: str, store: Store) -> None:
    add_offer(store)
    assert requests.get(f"{api}/health", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{api}/healthz", timeout=5).json() == {"status": "ok"}
    r = requests.get(f"{api}/click", params={"offer_id": "o1", "aff_id": "p1"},
                     allow_redirects=False, timeout=5)
    assert r.status_code == 200 and r.json()["transaction_id"]
    doc = requests.get(f"{api}/openapi.json", timeout=5).json()
    assert doc["openapi"].startswith("3.") and "/v1/partners/{partner_id}/test" in doc["paths"]


def test_revoked_key_stops_working_and_last_use_is_recorded(api: str, store: Store) -> None:
    admin = requests.Session()
    admin.headers.update(ADMIN)
    r = admin.post(f"{api}/v1/keys", json={"name": "backend", "scopes": ["ingest"]})
    assert r.status_code == 201
    key_id, key = r.json()["id"], r.json()["key"]
    assert requests.post(f"{api}/v1/conversions", json=CONVERSION, headers=bearer(key),
                         timeout=10).status_code == 202
    (listed,) = admin.get(f"{api}/v1/keys").json()["keys"]
    assert listed["id"] == key_id and "key_hash" not in listed and key not in str(listed)
    assert listed["last_used_at"] is not None
    assert admin.delete(f"{api}/v1/keys/{key_id}").json() == {"id": key_id, "revoked": True}
    assert admin.delete(f"{api}/v1/keys/{key_id}").status_code == 404
    r = requests.post(f"{api}/v1/conversions", json=CONVERSION, headers=bearer(key), timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unknown or revoked API key"
    r = admin.post(f"{api}/v1/keys", json={"name": "x", "scopes": ["root"]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "scopes"


def test_advertiser_postback_takes_the_offer_security_token(api: str, store: Store,
                                                            redis_client: redis.Redis) -> None:
    add_offer(store, "o1")
    add_offer(store, "o2")
    add_click(store, "tx1", offer_id="o1")
    admin = requests.Session()
    admin.headers.update(ADMIN)
    token = admin.post(f"{api}/v1/offers/o1/security-token").json()["security_token"]
    url = f"{api}/postback"
    ok = requests.get(url, params={"transaction_id": "tx1", "security_token": token}, timeout=5)
    assert ok.status_code == 200, ok.text
    ok = requests.get(url, params={"offer_id": "o1", "transaction_id": "tx-unknown",
                                   "security_token": token}, timeout=5)
    assert ok.status_code == 200
    for params, message in [
        ({"transaction_id": "tx1", "security_token": "wrong"},
         "security_token does not match the offer"),
        ({"offer_id": "o2", "transaction_id": "tx9", "security_token": token},
         "this offer accepts no advertiser postbacks yet: create its security token"),
        ({"transaction_id": "tx-unknown", "security_token": token},
         "cannot check the security_token: pass offer_id or a known transaction_id"),
    ]:
        r = requests.get(url, params=params, timeout=5)
        assert (r.status_code, r.json()["error"]) == (403, message)
    offers = admin.get(f"{api}/v1/offers").json()["offers"]
    assert {o["id"]: o["security_token"] for o in offers} == {"o1": True, "o2": False}
    assert token not in str(offers) and "security_token_hash" not in str(offers)
    assert admin.post(f"{api}/v1/offers/nope/security-token").status_code == 404


def test_partner_secrets_are_never_shown(api: str, store: Store) -> None:
    admin = requests.Session()
    admin.headers.update(ADMIN)
    r = admin.post(f"{api}/v1/partners", json={
        "id": "p1", "postback_url": "http://p.example/pb?tid={transaction_id}&token=abc123"})
    assert r.status_code == 201
    assert [w["code"] for w in r.json()["warnings"]] == ["http"]
    r = admin.post(f"{api}/v1/partners/p1/signing", json={"action": "enable"})
    secret = r.json()["secret"]
    r = admin.post(f"{api}/v1/partners/p1/signing", json={"action": "rotate"})
    rotated = r.json()["secret"]
    listing = admin.get(f"{api}/v1/partners").text
    for hidden in (secret, rotated, "abc123"):
        assert hidden not in listing
    (p,) = admin.get(f"{api}/v1/partners").json()["partners"]
    assert p["signing"] is True and p["signing_rotation_until"] is not None
    r = admin.post(f"{api}/v1/partners/p1/signing", json={"action": "explode"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "action"
    r = admin.post(f"{api}/v1/partners/p1/signing", json={"action": "enable",
                                                           "header": "Bad\r\nHeader"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "header"
    assert admin.post(f"{api}/v1/partners/zz/signing",
                      json={"action": "enable"}).status_code == 404


def test_invalid_template_is_refused_with_every_problem(api: str, store: Store) -> None:
    admin = requests.Session()
    admin.headers.update(ADMIN)
    r = admin.post(f"{api}/v1/partners", json={
        "id": "p1", "postback_url": "https://p.example/pb?cid=#s2#&p=%payout%&x={sub3}&amp;y=1"})
    assert r.status_code == 422
    messages = [e["message"] for e in r.json()["errors"] if e["field"] == "postback_url"]
    assert messages == [
        "position 25: #s2# is another tracker's macro syntax; use {aff_sub2} (fix: {aff_sub2})",
        "position 32: %payout% is another tracker's macro syntax; use {payout} (fix: {payout})",
        "position 43: unknown macro {sub3}; did you mean {aff_sub3}? (fix: {aff_sub3})",
        "position 49: &amp; is an HTML entity copied from a web page; a URL needs & instead "
        "(fix: &)",
    ]
    assert admin.get(f"{api}/v1/partners").json()["partners"] == []


def test_validate_routes(api: str, store: Store) -> None:
    admin = requests.Session()
    admin.headers.update(ADMIN)
    add_partner(store, "p1", "https://no-such-host.invalid")
    r = admin.get(f"{api}/v1/partners/p1/validate", params={"dns": "true"})
    body = r.json()
    assert body["valid"] is True and body["errors"] == 0
    assert [p["code"] for p in body["problems"]] == ["dns"]
    assert "does not resolve" in body["problems"][0]["message"]
    assert admin.get(f"{api}/v1/partners/p1/validate").json()["problems"] == []
    r = admin.post(f"{api}/v1/templates/validate", json={"url": "ftp://x/[transaction_id]"})
    assert r.json()["valid"] is False
    assert [p["code"] for p in r.json()["problems"]] == ["scheme", "lookalike", "no_transaction_id"]
    r = admin.post(f"{api}/v1/templates/validate", json={"url": 5, "extra": 1})
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {"url", "extra"}
    assert admin.get(f"{api}/v1/partners/zz/validate").status_code == 404


def test_test_fire_route(api: str, store: Store, partner: PartnerServer) -> None:
    admin = requests.Session()
    admin.headers.update(ADMIN)
    add_partner(store, "p1", partner.url)
    r = admin.post(f"{api}/v1/partners/p1/test", json={"transaction_id": "tx-9", "payout": 3})
    body = r.json()
    assert body["fired"] is False and "tid=tx-9&payout=3&" in body["url"]
    assert partner.count() == 0
    partner.set_response(503, b"maintenance until 10:00")
    body = admin.post(f"{api}/v1/partners/p1/test", json={"fire": True}).json()
    assert (body["fired"], body["status_code"], body["failure_class"]) == (True, 503,
                                                                           "partner_5xx")
    assert body["response_excerpt"] == "maintenance until 10:00"
    assert body["cause"] == "partner timeouts or downtime"
    assert body["advice"].startswith("The partner's server failed (5xx).")
    assert partner.count() == 1
    r = admin.post(f"{api}/v1/partners/p1/test", json={"fire": "yes"})
    assert r.status_code == 422 and r.json()["errors"][0] == {
        "field": "fire", "message": "must be true or false"}
