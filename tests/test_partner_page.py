"""A partner's own page: a signed, expiring link that shows one partner only its own postbacks
(secrets masked), failure classes, template, egress IPs and a test button; nothing of other
partners is reachable from it. Checked with requests and in headless Chromium."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests
from conftest import ADMIN, wait_until
from support.browser import chromium, find_chromium
from support.helpers import add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.delivery.sender import Sender
from postback_worker.ops.visibility.partner_page import page_link
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

KEY = "k-partner-one-secret"


@pytest.fixture()
def two_partners(settings: Settings, store: Store) -> Iterator[tuple[PartnerServer,
                                                                     PartnerServer]]:
    with PartnerServer() as one, PartnerServer() as two:
        add_offer(store)
        add_partner(store, "p1", one.url, path="/pb", headers={"X-Api-Key": KEY},
                    postback_url=one.url + "/pb?tid={transaction_id}&token=url-secret-1")
        add_partner(store, "p2", two.url, path="/other")
        two.set_response(status=503)
        for i in range(3):
            add_click(store, f"a{i}", aff_id="p1")
            add_click(store, f"b{i}", aff_id="p2")
        with Sender(allow_networks=settings.delivery.allow_networks) as sender:
            pipeline = Pipeline(settings, store, sender, worker_name="test")
            pipeline.process_conversions(messages(*[conversion(f"a{i}") for i in range(3)],
                                                  *[conversion(f"b{i}") for i in range(3)]))
        yield one, two


def _ids(store: Store, partner_id: str) -> list[str]:
    from postback_worker.store import partner_view

    return [p["id"] for p in partner_view.recent_postbacks(store, partner_id, 100)]


def test_the_page_shows_one_partner_only_and_refuses_everything_else(
        serve: Callable[[Settings], str], settings: Settings, store: Store,
        redis_client: redis.Redis, two_partners: tuple[PartnerServer, PartnerServer]) -> None:
    one, two = two_partners
    api = serve(settings.with_overrides(egress_ips=("203.0.113.10", "203.0.113.11")))
    r = requests.post(f"{api}/v1/partners/p1/page-link", headers=ADMIN, params={"days": 7})
    assert r.status_code == 200 and r.json()["expires_in"] == 7 * 86400
    link = r.json()["url"]
    token = link.split("t=", 1)[1]
    page = requests.get(link)
    assert page.status_code == 200
    html = page.text
    mine, theirs = _ids(store, "p1"), _ids(store, "p2")
    assert len(mine) == 3 and all(pid in html for pid in mine)
    assert not any(pid in html for pid in theirs) and "/other" not in html
    assert "203.0.113.10, 203.0.113.11" in html and "X-Api-Key: ***" in html
    assert KEY not in html and "url-secret-1" not in html and "token=***" in html
    assert re.search(r"<td>delivered</td><td>3</td>", html)

    # Everything else stays shut: other partners, tampering, expiry, admin routes.
    for other in (f"{api}/partner-page/p2?t={token}", f"{api}/partner-page/p1?t={token}x",
                  f"{api}/partner-page/p1", f"{api}/partner-page/p1?t=1.abc"):
        assert requests.get(other).status_code == 403, other
    expired = page_link(settings, api, "p1", datetime.now(UTC) - timedelta(days=8), days=7)
    assert requests.get(expired).status_code == 403
    r = requests.post(f"{api}/partner-page/p2/test", data={"t": token})
    assert r.status_code == 403
    for admin_path in ("/v1/partners", "/v1/reports/failed", "/dashboard",
                       "/v1/partners/p2/support-bundle"):
        got = requests.get(f"{api}{admin_path}", params={"t": token},
                           headers={"Authorization": f"Bearer {token}"})
        assert got.status_code == 401, admin_path
    assert requests.post(f"{api}/v1/partners/p2/page-link",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 401
    two_before = two.count()

    # The test button fires a test postback to this partner only.
    before = one.count()
    r = requests.post(f"{api}/partner-page/p1/test", data={"t": token})
    assert r.status_code == 200 and 'id="test-result"' in r.text
    assert one.count() == before + 1 and two.count() == two_before
    assert one.requests[-1].header("X-Api-Key") == KEY
    assert "delivered" in r.text.split('id="test-result"', 1)[1]
    assert requests.post(f"{api}/partner-page/p1/test", data={"t": token}).status_code == 429


def test_partner_page_in_headless_chromium(
        serve: Callable[[Settings], str], settings: Settings, store: Store,
        redis_client: redis.Redis, two_partners: tuple[PartnerServer, PartnerServer],
        tmp_path: Path) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium)")
    api = serve(settings)
    link = requests.post(f"{api}/v1/partners/p1/page-link", headers=ADMIN).json()["url"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return chromium(binary, tmp_path, *args)

    dom = run("--dump-dom", link)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<h1 id="partner">Postbacks for p1</h1>' in html, html[:2000]
    assert len(re.findall(r'<tr class="postback">', html)) == 3
    assert '<button type="submit" id="send-test">Send a test postback</button>' in html
    assert not any(pid in html for pid in _ids(store, "p2")) and KEY not in html
    shot = tmp_path / "partner.png"
    wait_until(lambda: run(f"--screenshot={shot}", link).returncode == 0, 120,
               message="a screenshot")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
