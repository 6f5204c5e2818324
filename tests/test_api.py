"""The HTTP API, served by uvicorn on a local port, against real PostgreSQL and Redis."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests
from conftest import ADMIN, wait_until
from sqlalchemy import select
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.dev.services import free_port
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store import schema as t
from postback_worker.store.repo import Store
from postback_worker.worker.queues import TASK_INTAKE


@pytest.fixture()
def api(serve: Callable[[Settings], str], settings: Settings, store: Store,
        redis_client: redis.Redis) -> str:
    return serve(settings)


# An HTTP client that sends the bootstrap admin credential.
admin = requests.Session()
admin.headers.update(ADMIN)


def stored_events(store: Store) -> list[dict[str, object]]:
    """Accepted events: conversions committed in the journal, waiting for a worker."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(t.conversions).where(t.conversions.c.state == "received")
                            .order_by(t.conversions.c.id)).mappings().all()
    return [dict(r) for r in rows]


def woken_ids(client: redis.Redis) -> list[str]:
    """Conversion ids named by the wake-up messages in the Redis `conversions` queue (sent
    from the producer's waker thread just after the answer: waits for the first)."""
    wait_until(lambda: client.llen("conversions") > 0, timeout=10)
    ids: list[str] = []
    for raw in client.lrange("conversions", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == TASK_INTAKE
        ids.extend(json.loads(base64.b64decode(message["body"]))[0][0])
    return ids


def errors_by_field(response: requests.Response) -> dict[str, str]:
    return {e["field"]: e["message"] for e in response.json()["errors"]}


def test_offers_and_partners(api: str) -> None:
    r = admin.post(f"{api}/v1/offers", json={"id": "o1", "campaign_type": "b2b_saas"})
    assert r.status_code == 201 and r.json()["lifespan_days"] == 90
    r = admin.post(f"{api}/v1/offers", json={"id": "o2", "campaign_type": "financial",
                                                "lifespan_days": 100})
    assert r.json()["lifespan_days"] == 100
    r = admin.post(f"{api}/v1/offers", json={"id": "o 3", "campaign_type": "crypto",
                                                "lifespan_days": "long", "colour": "red"})
    assert r.status_code == 422
    fields = errors_by_field(r)
    assert set(fields) == {"id", "campaign_type", "lifespan_days", "colour"}
    assert "lead_gen, ecommerce, b2b_saas, financial" in fields["campaign_type"]
    assert [o["id"] for o in admin.get(f"{api}/v1/offers").json()["offers"]] == ["o1", "o2"]

    good = {"id": "p1", "postback_url": "https://p.example/pb?tid={transaction_id}",
            "fire_statuses": ["approved", "pending"], "success_check": "OK"}
    r = admin.post(f"{api}/v1/partners", json=good)
    assert r.status_code == 201
    assert r.json()["fire_statuses"] == "approved,pending" and r.json()["enabled"] is True
    bad = {"id": "p2", "postback_url": "htp://p.example/pb?tid=[transaction_id]&x={paytout}",
           "method": "PUT"}
    r = admin.post(f"{api}/v1/partners", json=bad)
    assert r.status_code == 422
    messages = [e["message"] for e in r.json()["errors"] if e["field"] == "postback_url"]
    assert any("scheme" in m for m in messages)
    assert any("{transaction_id}" in m for m in messages)
    assert any("{payout}" in m for m in messages)
    assert errors_by_field(r)["method"] == "must be GET or POST"
    assert [p["id"] for p in admin.get(f"{api}/v1/partners").json()["partners"]] == ["p1"]


def test_click_redirects_to_landing_page(api: str, store: Store) -> None:
    add_offer(store, "o1", landing_url="https://shop.example/land?click={transaction_id}&a=1")
    r = requests.get(f"{api}/click", params={"offer_id": "o1", "aff_id": "p1",
                                             "aff_sub": "s 1", "source": "mail"},
                     allow_redirects=False, headers={"User-Agent": "test-agent"})
    assert r.status_code == 302
    location = urlsplit(r.headers["location"])
    tx = parse_qs(location.query)["click"][0]
    with store.engine.connect() as conn:
        from sqlalchemy import select

        from postback_worker.store.schema import clicks

        row = conn.execute(select(clicks)).mappings().one()
    assert (row["transaction_id"], row["aff_id"], row["aff_sub"], row["source"],
            row["ip"], row["user_agent"]) == (tx, "p1", "s 1", "mail", "127.0.0.1", "test-agent")
    r = requests.get(f"{api}/click", params={"offer_id": "nope", "aff_id": "p1"})
    assert r.status_code == 404 and errors_by_field(r) == {"offer_id": "no such offer"}
    r = requests.get(f"{api}/click", params={"offer_id": "o1"})
    assert r.status_code == 422 and "aff_id" in errors_by_field(r)


def test_click_batch(api: str, store: Store) -> None:
    add_offer(store, "o1")
    old = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    r = admin.post(f"{api}/v1/clicks", json=[
        {"offer_id": "o1", "aff_id": "p1", "transaction_id": "mine-1"},
        {"offer_id": "o1", "aff_id": "p2", "clicked_at": old},
    ])
    assert r.status_code == 201
    tx = r.json()["transaction_ids"]
    assert tx[0] == "mine-1" and tx[1].startswith("tx_")
    r = admin.post(f"{api}/v1/clicks", json=[{"offer_id": "o1", "aff_id": "p1"},
                                                {"offer_id": "zzz", "aff_id": "p1"}])
    assert r.status_code == 422 and errors_by_field(r) == {"events[1].offer_id":
                                                           "no such offer 'zzz'"}


def test_tune_style_get_postback_stores_before_answering(api: str, store: Store,
                                                         redis_client: redis.Redis) -> None:
    r = admin.get(f"{api}/postback", params={"transaction_id": "tx1", "payout": "1.5",
                                             "goal_id": "g", "adv_sub": "order-9",
                                             "status": "approved", "cachebuster": "123"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 1
    (event,) = stored_events(store)
    assert event["id"] == body["ids"][0]
    assert (event["transaction_id"], event["payout"], event["goal_id"], event["adv_sub"]) == (
        "tx1", "1.5", "g", "order-9")
    assert woken_ids(redis_client) == body["ids"]  # Redis carries only the wake-up
    r = admin.get(f"{api}/postback", params={"payout": "ten"})
    assert r.status_code == 422
    assert set(errors_by_field(r)) == {"transaction_id", "payout"}
    assert len(stored_events(store)) == 1


def test_conversion_batch_is_all_or_nothing(api: str, redis_client: redis.Redis,
                                            settings: Settings, store: Store) -> None:
    good = [{"transaction_id": f"tx{i}", "payout": 2} for i in range(3)]
    r = admin.post(f"{api}/v1/conversions", json=good)
    assert r.status_code == 202 and r.json()["accepted"] == 3
    assert sorted(woken_ids(redis_client)) == sorted(r.json()["ids"])
    assert len(redis_client.lrange("conversions", 0, -1)) == 1  # one wake-up for the batch
    mixed = [{"transaction_id": "a"}, {"transaction_id": "b", "payout": "abc"},
             {"payout": 1, "ip": "999.1.1.1"}, {"transaction_id": {"x": 1}}]
    r = admin.post(f"{api}/v1/conversions", json={"events": mixed})
    assert r.status_code == 422
    assert set(errors_by_field(r)) == {"events[1].payout", "events[2].transaction_id",
                                       "events[2].ip", "events[3].transaction_id"}
    assert len(stored_events(store)) == 3  # nothing of the bad request was stored
    too_many = [{"transaction_id": "x"}] * (settings.ingest.max_batch_size + 1)
    r = admin.post(f"{api}/v1/conversions", json=too_many)
    assert r.status_code == 413 and "events" in errors_by_field(r)
    r = requests.post(f"{api}/v1/conversions", data=b"{not json",
                      headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 400 and "body" in errors_by_field(r)
    r = admin.post(f"{api}/v1/conversions",
                      data=b"x" * (settings.ingest.max_request_bytes + 1))
    assert r.status_code == 413
    assert len(stored_events(store)) == 3


@pytest.mark.parametrize("path", ["/v1/conversions", "/postback"])
def test_database_down_answers_503_and_accepts_nothing(
    serve: Callable[[Settings], str], settings: Settings, redis_client: redis.Redis,
    path: str
) -> None:
    dead = settings.with_overrides(
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    api = serve(dead)
    if path == "/postback":
        r = admin.get(f"{api}/postback", params={"transaction_id": "t"}, timeout=30)
    else:
        r = admin.post(f"{api}/v1/conversions", json=[{"transaction_id": "t"}], timeout=30)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"] == "the database is unavailable; nothing was accepted, retry later"
    assert redis_client.llen("conversions") == 0


@pytest.mark.parametrize("path", ["/v1/conversions", "/postback"])
def test_redis_down_still_accepts_durably(serve: Callable[[Settings], str],
                                          settings: Settings, store: Store, path: str) -> None:
    """Redis only wakes workers: with Redis gone the event is still committed and
    acknowledged (beat's sweep hands it to a worker once Redis is back)."""
    dead = settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    api = serve(dead)
    if path == "/postback":
        r = admin.get(f"{api}/postback", params={"transaction_id": "t"}, timeout=60)
    else:
        r = admin.post(f"{api}/v1/conversions", json=[{"transaction_id": "t"}], timeout=60)
    assert r.status_code in (200, 202), r.text
    assert [e["id"] for e in stored_events(store)] == r.json()["ids"]


def test_conversion_detail(api: str, store: Store, settings: Settings,
                          partner: PartnerServer) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    partner.set_script([503])
    r = admin.post(f"{api}/v1/conversions", json={"transaction_id": "tx1", "payout": "3"})
    cid = r.json()["ids"][0]
    # Stored before the answer: visible at once, waiting for a worker.
    waiting = admin.get(f"{api}/v1/conversions/{cid}")
    assert waiting.status_code == 200 and waiting.json()["conversion"]["state"] == "received"
    from postback_worker.domain.events import ConversionEvent, parse_conversion

    event: ConversionEvent = parse_conversion({"id": cid, "transaction_id": "tx1", "payout": "3"},
                                              now=datetime.now(UTC))
    with Sender(allow_networks=settings.delivery.allow_networks) as sender:
        Pipeline(settings, store, sender).process_conversions([event.to_message()])
    detail = admin.get(f"{api}/v1/conversions/{cid}").json()
    assert detail["conversion"]["state"] == "attributed"
    (pb,) = detail["postbacks"]
    assert pb["state"] == "retry_scheduled" and pb["partner_id"] == "p1"
    (attempt,) = pb["attempts_log"]
    assert (attempt["status_code"], attempt["failure_class"]) == (503, "partner_5xx")
    assert "lease_token" not in pb


def test_admin_token(serve: Callable[[Settings], str], settings: Settings, store: Store) -> None:
    api = serve(settings.with_overrides(admin_token="s3cret"))
    assert admin.get(f"{api}/v1/offers").status_code == 401
    ok = requests.get(f"{api}/v1/offers", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert requests.get(f"{api}/health").status_code == 200


def test_concurrent_single_events_share_commits_and_none_is_lost(
    api: str, redis_client: redis.Redis, store: Store
) -> None:
    """Group commit: 60 simultaneous GET /postback, every id stored, fewer commits (one
    wake-up message per commit)."""
    from concurrent.futures import ThreadPoolExecutor

    def send(i: int) -> requests.Response:
        return admin.get(f"{api}/postback", params={"transaction_id": f"tx{i}", "payout": i})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(send, range(60)))
    assert [a.status_code for a in answers] == [200] * 60
    ids = sorted(a.json()["ids"][0] for a in answers)
    stored = stored_events(store)
    assert sorted(e["id"] for e in stored) == ids  # type: ignore[type-var]
    assert sorted(e["transaction_id"] for e in stored) == sorted(  # type: ignore[type-var]
        f"tx{i}" for i in range(60))
    # Fewer commits than requests, and one wake-up at a time (test_durable_intake.py).
    assert set(woken_ids(redis_client)) <= set(ids)
    assert 1 <= redis_client.llen("conversions") < 60
