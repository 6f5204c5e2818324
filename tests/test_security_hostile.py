"""Hostile input: the API fuzzed from its own OpenAPI document (schemathesis), a property test
of the template renderer (hypothesis), and CR/LF, Unicode and SQL metacharacters in fields."""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import hypothesis
import pytest
import redis
import requests
import schemathesis
from conftest import ADMIN
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance
from sqlalchemy import select
from support.helpers import NOW, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.domain.macros import KNOWN_MACROS, render
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store
from postback_worker.store.schema import clicks


@pytest.fixture()
def api(serve: Callable[[Settings], str], settings: Settings, store: Store,
        redis_client: redis.Redis) -> str:
    return serve(settings.with_overrides(allow_networks=()))


@pytest.fixture()
def api_schema(api: str, store: Store) -> schemathesis.BaseSchema:
    add_offer(store, "o1")
    add_partner(store, "p1", "https://partner.example")
    return schemathesis.openapi.from_url(f"{api}/openapi.json")


def test_api_from_its_openapi_document(api_schema: schemathesis.BaseSchema) -> None:
    """No generated request (valid or not) makes the API fail or answer off its document.

    Driven through schemathesis' Python API (its pytest plugin does not support this pytest);
    a bounded number of examples per operation. Left out: "schema-valid data must be
    accepted", because the API also validates meaning (an unknown offer, a template that does
    not validate) and answers 422 for it, as documented; but a documented field or parameter
    is never refused as unknown. Nothing is excluded: the fixture has no dead letters, so
    replay and purge destroy nothing, and a generated partner id is unknown (404).
    """
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 40  # every documented one but /openapi.json itself
    for operation in operations:

        @hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            r = case.call_and_validate(headers=ADMIN, timeout=30,
                                       excluded_checks=[positive_data_acceptance])
            if r.status_code == 422:
                unknown = [e["field"] for e in r.json().get("errors", [])
                           if e["message"] in ("unknown field", "unknown parameter")]
                assert not unknown, f"documented, but refused as unknown: {unknown}"

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect them all
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())


# Odd input the fuzzer found (or could): each answers 4xx naming the field, never a 500.
ODD_INPUT = [
    # NUL characters (PostgreSQL text cannot hold one), in a path, a query, a JSON body
    ("GET", "/v1/dead-letters/%00", None, 404, "path"),
    ("POST", "/v1/partners/%00/pause", {}, 404, "path"),
    ("GET", "/v1/conversions/a%00b", None, 404, "path"),
    ("GET", "/v1/dead-letters?partner_id=%00", None, 422, "partner_id"),
    ("GET", "/v1/dead-letters?after=1:%00", None, 422, "after"),
    ("GET", "/v1/operator-events?partner=%00", None, 422, "partner"),
    ("GET", "/click?offer_id=o1&aff_id=p1&aff_sub=%00", None, 422, "aff_sub"),
    ("GET", "/postback?offer_id=o1&transaction_id=%00", None, 422, "transaction_id"),
    ("POST", "/v1/dead-letters/purge", {"confirm": True, "triggered_by": "a\x00"}, 422,
     "triggered_by"),
    ("POST", "/v1/partners/p1/pause", {"reason": "x\x00"}, 422, "reason"),
    # times and numbers out of range
    ("GET", "/v1/dead-letters?since=3000000d", None, 422, "since"),
    ("GET", "/v1/dead-letters?after=99999999999999999999999:x", None, 422, "after"),
    ("GET", "/v1/reports/delivery?since=0001-01-01T00:00:00%2B14:00", None, 422, "since"),
    ("GET", "/v1/partners/p1/support-bundle?until=99999999999d", None, 422, "until"),
    ("POST", "/v1/reattribute", {"offer_id": "o1", "since": "99999999999d"}, 422, "since"),
    ("POST", "/v1/dead-letters/replay", {"limit": 2**63, "dry_run": True}, 422, "limit"),
    # "²" is a digit that int() refuses
    ("GET", "/v1/reports/failed?limit=%C2%B2", None, 422, "limit"),
    ("GET", "/v1/alerts?limit=%C2%B2", None, 422, "limit"),
]


def test_odd_input_is_refused_naming_the_field(api: str) -> None:
    wrong = []
    for method, path, body, status, field in ODD_INPUT:
        r = requests.request(method, f"{api}{path}", json=body, headers=ADMIN, timeout=10)
        fields = ({e["field"] for e in r.json().get("errors", [])}
                  if r.headers.get("content-type") == "application/json" else set())
        if r.status_code != status or field not in fields:
            wrong.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
    assert not wrong, "\n".join(wrong)


# -- the renderer ----------------------------------------------------------------------------

TEMPLATE = ("https://partner.example/pb/{offer_id}?tid={transaction_id}&s={aff_sub}"
            "&p={payout}&fixed=1")
VALUES = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["&x=1", "a=b&c=d", "#frag", "?q=1", "%26", "%", "\r\nSet-Cookie: a=b", "' OR 1=1 --",
     "../../etc", "{transaction_id}", "\x00", "\u202e\u200b", "a+b c", "\ud800"])


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(tid=VALUES, sub=VALUES, payout=VALUES, offer=VALUES)
def test_rendered_url_always_parses_and_values_round_trip(tid: str, sub: str, payout: str,
                                                           offer: str) -> None:
    url = render(TEMPLATE, {"transaction_id": tid, "aff_sub": sub, "payout": payout,
                            "offer_id": offer})
    assert url.isascii() and url.isprintable() and " " not in url
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.fragment) == ("https", "partner.example", "")
    assert parts.path.startswith("/pb/") and "/" not in parts.path[4:]
    query = parse_qsl(parts.query, keep_blank_values=True)
    assert [k for k, _ in query] == ["tid", "s", "p", "fixed"]  # no value adds a parameter

    def clean(v: str) -> str:
        return v.encode("utf-8", "replace").decode("utf-8", "replace")

    assert dict(query) == {"tid": clean(tid), "s": clean(sub), "p": clean(payout), "fixed": "1"}
    assert unquote(parts.path[4:]) == clean(offer)


@hypothesis.settings(max_examples=100, deadline=None, derandomize=True)
@hypothesis.given(name=st.sampled_from(sorted(KNOWN_MACROS)), value=VALUES)
def test_every_macro_is_encoded(name: str, value: str) -> None:
    url = render(f"https://p.example/?a=1&v={{{name}}}&z=2", {name: value})
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    assert [k for k, _ in query] == ["a", "v", "z"]


# -- hostile fields through the real API and pipeline ----------------------------------------

HOSTILE = ["a\r\nX-Injected: 1", "'; DROP TABLE clicks; --", "\u202eevil\u200b", "tab\there",
           "x" * 255, "100%", "é漢字🙂", "a&b=c#d"]


def test_hostile_click_fields_are_stored_and_encoded(
        api: str, store: Store, settings: Settings, partner: PartnerServer,
        caplog: pytest.LogCaptureFixture) -> None:
    add_offer(store)
    add_partner(store, "p1", partner.url)
    admin = requests.Session()
    admin.headers.update(ADMIN)
    r = admin.post(f"{api}/v1/clicks", json=[{"offer_id": "o1", "aff_id": "p1", "aff_sub": v}
                                             for v in HOSTILE])
    assert r.status_code == 201, r.text
    tids = r.json()["transaction_ids"]
    r = admin.post(f"{api}/v1/conversions", json=[{"transaction_id": t, "adv_sub": v}
                                                  for t, v in zip(tids, HOSTILE, strict=True)])
    assert r.status_code == 202, r.text
    with store.engine.connect() as conn:  # the SQL metacharacters were stored as data
        stored = sorted(conn.execute(select(clicks.c.aff_sub)).scalars())
    assert stored == sorted(HOSTILE)
    msgs = messages(*[conversion(t, adv_sub=v) for t, v in zip(tids, HOSTILE, strict=True)])
    caplog.set_level(logging.DEBUG)
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        Pipeline(settings, store, sender, clock=lambda: NOW).process_conversions(msgs)
    subs = sorted(r.query["sub"][0] for r in partner.received())
    assert subs == sorted(HOSTILE)
    for req in partner.received():
        assert set(req.query) == {"tid", "payout", "sub", "pb", "cv"}
        assert not any(k.lower() == "x-injected" for k in req.headers)
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "\r" not in record.getMessage()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"transaction_id": "a\r\nb"}, 202, None),
        ({"transaction_id": "x" * 256}, 422, "transaction_id"),
        ({"transaction_id": ["list"]}, 422, "transaction_id"),
        ({"transaction_id": "t", "payout": "1e400"}, 422, "payout"),
        ({"transaction_id": "t", "payout": True}, 422, "payout"),
    ],
)
def test_conversion_field_limits(api: str, body: dict[str, object], status: int,
                                 field: str | None) -> None:
    r = requests.post(f"{api}/v1/conversions", json=body, headers=ADMIN, timeout=10)
    assert r.status_code == status, r.text
    if field:
        assert field in {e["field"] for e in r.json()["errors"]}


def test_body_and_batch_limits(serve: Callable[[Settings], str], settings: Settings,
                               store: Store, redis_client: redis.Redis) -> None:
    api = serve(settings.with_overrides(max_request_bytes=2000, max_batch_size=3))
    r = requests.post(f"{api}/v1/conversions", data=b"[" + b" " * 3000 + b"]",
                      headers={**ADMIN, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413 and "split the batch" in r.json()["error"]
    r = requests.post(f"{api}/v1/conversions", json=[{"transaction_id": f"t{i}"}
                                                     for i in range(4)], headers=ADMIN,
                      timeout=10)
    assert r.status_code == 413 and r.json()["errors"][0]["field"] == "events"
    r = requests.post(f"{api}/v1/partners", data=b"\xff\xfe", headers=ADMIN, timeout=10)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "body"
    r = requests.post(f"{api}/v1/partners", json=[1, 2], headers=ADMIN, timeout=10)
    assert r.status_code == 422


def test_header_injection_in_credentials_is_just_a_bad_key(api: str) -> None:
    r = requests.get(f"{api}/v1/offers", headers={"Authorization": "Bearer pbw_x\u00e9"},
                     timeout=5)
    assert r.status_code == 401
