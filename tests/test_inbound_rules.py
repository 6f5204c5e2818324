"""An offer's inbound rules end to end: click-to-conversion time, daily caps (count and payout,
per offer and per affiliate), the advertiser IP allowlist of GET /postback; each an attribution
outcome with its reason, counted in the delivery report and the dashboard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import redis
import requests
from conftest import ADMIN, Proc, wait_until
from support.helpers import NOW, Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

RANGE = {"since": "2026-11-25T00:00:00Z", "until": "2026-11-28T00:00:00Z"}


@pytest.fixture()
def pipeline(settings: Settings, store: Store, clock: Clock) -> Iterator[Pipeline]:
    sender = Sender(allow_networks=settings.delivery.allow_networks, concurrency=8)
    yield Pipeline(settings, store, sender, clock=clock, rand=lambda: 0.5, worker_name="test")
    sender.close()


def _state(store: Store, conversion_id: str) -> tuple[str, str]:
    row = store.get_conversion(conversion_id) or {}
    return row["state"], row["reason"]


def test_time_bounds_and_daily_caps(pipeline: Pipeline, store: Store, partner: PartnerServer,
                                    settings: Settings, serve: Callable[[Settings], str],
                                    redis_client: redis.Redis, clock: Clock) -> None:
    add_offer(store, "o1", min_click_seconds=60, max_click_seconds=7 * 86400, daily_cap=4,
              affiliate_daily_cap=2, daily_payout_cap=100)
    add_partner(store, "p1", partner.url)
    add_partner(store, "p2", partner.url)
    add_click(store, "fast", clicked_at=NOW - timedelta(seconds=2))
    add_click(store, "late", clicked_at=NOW - timedelta(days=8))
    for i in range(4):
        add_click(store, f"p1-{i}", aff_id="p1", clicked_at=NOW - timedelta(hours=1))
        add_click(store, f"p2-{i}", aff_id="p2", clicked_at=NOW - timedelta(hours=1))
    fast, late = conversion("fast", payout="1"), conversion("late", payout="1")
    first = [conversion(f"p1-{i}", payout="10") for i in range(3)]
    pipeline.process_conversions(messages(fast, late, *first))
    assert _state(store, fast.id) == (
        "too_soon", "conversion 2s after its click; the offer requires at least 60s")
    assert _state(store, late.id)[0] == "too_late"
    assert [_state(store, c.id)[0] for c in first] == ["attributed", "attributed", "capped"]
    assert _state(store, first[2].id)[1] == (
        "over affiliate p1's daily cap of 2 conversions (UTC day 2026-11-26); fires nothing")
    # A later batch counts what earlier batches used today: the offer's cap of 4.
    second = [conversion(f"p2-{i}", payout="10") for i in range(3)]
    pipeline.process_conversions(messages(*second))
    assert [_state(store, c.id)[0] for c in second] == ["attributed", "attributed", "capped"]
    assert "the offer's daily cap of 4" in _state(store, second[2].id)[1]
    assert partner.count() == 4 and not store.postbacks_for(first[2].id)
    # The next UTC day starts afresh.
    clock.advance(86400)
    add_click(store, "next-day", aff_id="p1", clicked_at=clock() - timedelta(hours=1))
    nxt = conversion("next-day", payout="10", now=clock())
    pipeline.process_conversions(messages(nxt))
    assert _state(store, nxt.id)[0] == "attributed"

    api = serve(settings)
    report = requests.get(f"{api}/v1/reports/delivery", params=RANGE, headers=ADMIN).json()
    (row,) = report["lost_conversions"]
    assert {k: row[k] for k in ("too_soon", "too_late", "capped", "ip_not_allowed",
                                "refused")} == {"too_soon": 1, "too_late": 1, "capped": 2,
                                                "ip_not_allowed": 0, "refused": 4}
    html = requests.get(f"{api}/dashboard", params=RANGE, headers=ADMIN).text
    assert "<th>too soon</th><th>too late</th><th>capped</th><th>IP not allowed</th>" in html
    assert '<td class="n">1</td><td class="n">1</td><td class="n">2</td><td class="n">0</td>' \
        in html


def test_offer_rules_are_validated(serve: Callable[[Settings], str], settings: Settings,
                                   store: Store, redis_client: redis.Redis) -> None:
    api = serve(settings)
    for extra, field in [({"allowed_ips": "10.0.0.0/8,not-a-net"}, "allowed_ips"),
                         ({"min_click_seconds": 60, "max_click_seconds": 10},
                          "max_click_seconds"),
                         ({"daily_cap": 0}, "daily_cap"),
                         ({"affiliate_daily_payout_cap": "x"}, "affiliate_daily_payout_cap")]:
        r = requests.post(f"{api}/v1/offers", json={"id": "o1", **extra}, headers=ADMIN)
        assert r.status_code == 422 and field in {e["field"] for e in r.json()["errors"]}, r.text


@pytest.mark.parametrize(("allowed", "expected"), [("203.0.113.0/24", "ip_not_allowed"),
                                                   ("203.0.113.0/24, 127.0.0.0/8",
                                                    "attributed")])
def test_advertiser_ip_allowlist_for_get_postback(
        serve: Callable[[Settings], str], settings: Settings, store: Store,
        partner: PartnerServer, celery_procs: Callable[..., Proc], allowed: str,
        expected: str) -> None:
    add_offer(store, "o1", allowed_ips=allowed)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    celery_procs("worker")
    api = serve(settings)
    token = requests.post(f"{api}/v1/offers/o1/security-token",
                          headers=ADMIN).json()["security_token"]
    r = requests.get(f"{api}/postback", params={"transaction_id": "tx1",
                                                 "security_token": token})
    assert r.status_code == 200, r.text
    (cid,) = r.json()["ids"]
    wait_until(lambda: (store.get_conversion(cid) or {}).get("state") not in (None, "received"),
               60, message="the worker to attribute the conversion")
    state, reason = _state(store, cid)
    assert state == expected
    if expected == "ip_not_allowed":
        assert reason == ("reported from 127.0.0.1, outside the offer's advertiser networks "
                          "(203.0.113.0/24)")
        assert partner.count() == 0
    assert (store.get_conversion(cid) or {})["source_ip"] == "127.0.0.1"
