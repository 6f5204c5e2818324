"""The dashboard page in headless Chromium (Debian's `chromium`): charts and numbers present,
a screenshot saved under the test's temporary directory; sign-in links and drill-down."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
import requests
from conftest import ADMIN
from support.browser import chromium, find_chromium
from support.helpers import NOW
from support.partner import PartnerServer
from support.visibility_seed import Clock, Scenario, Served, seed

from postback_worker.ops.visibility.alerts import evaluate
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

RANGE = {"since": (NOW - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "until": (NOW + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")}


@pytest.fixture()
def scenario(settings: Settings, store: Store, partner: PartnerServer, pipeline: Pipeline,
             clock: Clock, redis_client: redis.Redis) -> Scenario:
    sc = seed(store, partner, pipeline, clock)
    redis_client.hset("pbw:circuit:p-down", "state", "open")
    redis_client.rpush("retries", "a", "b")
    evaluate(settings.with_overrides(alert_min_volume=2), store, redis_client, now=clock())
    return sc


def sign_in_link(api: str, next_path: str) -> str:
    r = requests.post(f"{api}/v1/dashboard/link", params={"next": next_path}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return str(r.json()["url"])


def test_dashboard_in_headless_chromium(settings: Settings, store: Store, scenario: Scenario,
                                        tmp_path: Path) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium); .ci/run "
                    "installs it when it can")
    with Served(settings) as api:
        path = "/dashboard?" + urlencode(RANGE)
        dom = chromium(binary, tmp_path, "--dump-dom", sign_in_link(api, path))
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        shot = tmp_path / "dash.png"
        run = chromium(binary, tmp_path, f"--screenshot={shot}", sign_in_link(api, path))
        assert run.returncode == 0, run.stderr[-2000:]
    assert "<h1>Postback delivery</h1>" in html, html[:2000]
    # Numbers: the same figures the delivery report holds for this history.
    kpi = dict(re.findall(r'id="kpi-([a-z0-9-]+)"><div class="v">([^<]*)</div>', html))
    assert kpi["postbacks"] == "13" and kpi["delivered"] == "6" and kpi["failed"] == "6"
    assert kpi["pending"] == "1" and kpi["success-rate"] == "50.0%" and kpi["lost"] == "3"
    # The tiles add up: postbacks = delivered + failed + pending + skipped.
    assert kpi["skipped"] == "0"
    assert sum(int(kpi[k]) for k in ("delivered", "failed", "pending", "skipped")) == 13
    assert "(13 = 6 + 6 + 1 + 0)" in html
    assert int(kpi["alerts"]) >= 3
    # Charts: drawn server-side as SVG with data in them.
    for chart in ("chart-success-rate", "chart-failures", "chart-worst-partners",
                  "chart-queues"):
        assert f'<svg id="{chart}"' in html
    success = html.split('<svg id="chart-success-rate"', 1)[1].split("</svg>", 1)[0]
    assert "<polyline" in success and 'class="point"' in success
    failures = html.split('<svg id="chart-failures"', 1)[1].split("</svg>", 1)[0]
    assert failures.count('class="bar"') >= 3 and "partner_5xx (13)" in failures
    assert "blocked (2)" in failures and "config (1)" in failures
    queues = html.split('<svg id="chart-queues"', 1)[1].split("</svg>", 1)[0]
    assert "retries: 2" in queues
    # Worst partners first, each with a link to its failed postbacks; circuit state shown.
    order = re.findall(r'<tr class="partner" data-partner="([^"]+)"', html)
    assert order == ["p-down", "p-blocked", "p-gone", "p-ok"]
    # Bars and table show the same figure, labelled: the failure rate.
    worst = html.split('<svg id="chart-worst-partners"', 1)[1].split("</svg>", 1)[0]
    assert "Failure rate by partner, worst first" in worst
    bar_texts = re.findall(r"<title>([^<:]+): ([^<]+)</title>", worst)
    table = html.split('<table id="worst-partners">', 1)[1].split("</table>", 1)[0]
    assert "<th>failure rate</th>" in table and "<th>success</th>" not in table
    cells = {pid: rate for pid, rate in re.findall(
        r'data-partner="([^"]+)"><td>[^<]*</td>(?:<td class="n">[^<]*</td>){3}'
        r'<td class="n">([^<]*)</td>', table)}
    assert bar_texts == [(pid, f"{cells[pid]} failed") for pid in order]
    assert bar_texts[0] == ("p-down", "100.0% failed") and bar_texts[-1] == ("p-ok", "0.0% failed")
    assert 'class="state-open">open<' in html
    links = re.findall(r'class="failed-link" href="([^"]+)"', html)
    assert len(links) == 4 and "partner=p-down" in links[0]
    assert "Partner p-down: 100.0% of 13 postback attempts failed" in html
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sign_in_link_session_cookie_and_drill_down(settings: Settings, store: Store,
                                                    scenario: Scenario) -> None:
    with Served(settings) as api:
        r = requests.get(f"{api}/dashboard", params=RANGE)
        assert r.status_code == 401 and "postback-worker dashboard link" in r.text
        browser = requests.Session()
        link = sign_in_link(api, "/dashboard?" + urlencode(RANGE))
        r = browser.get(link, allow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard?" + urlencode(RANGE)
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = browser.get(f"{api}{r.headers['location']}")
        assert page.status_code == 200 and 'id="chart-success-rate"' in page.text
        href = re.findall(r'class="failed-link" href="([^"]+)"', page.text)[0]
        drill = browser.get(f"{api}{href.replace('&amp;', '&')}")
        assert drill.status_code == 200 and "3 failed postbacks" in drill.text
        assert drill.text.count("HTTP 503 from partner") == 3
        # The all-partners list has the partner and URL columns the CSV has.
        everyone = browser.get(f"{api}/v1/reports/failed", params={**RANGE, "format": "html"})
        assert everyone.status_code == 200 and "6 failed postbacks" in everyone.text
        heads = re.findall(r"<th>([^<]+)</th>", everyone.text)
        assert heads[1] == "partner" and heads[-1] == "URL (secrets masked)"
        rows = re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td>.*?<td>([^<]*)</td></tr>",
                          everyone.text)
        assert {pid for pid, _ in rows} == {"p-down", "p-blocked", "p-gone"}
        assert all(url.startswith("http://127.0.0.1:") for _, url in rows)
        csv_href = href.replace("format=html", "format=csv").replace("&amp;", "&")
        assert len(browser.get(f"{api}{csv_href}").text.strip().splitlines()) == 1 + 3
        # The cookie opens only the read-only pages, never admin writes or /metrics.
        assert browser.get(f"{api}/metrics").status_code == 401
        assert browser.get(f"{api}/v1/partners").status_code == 401
        # Bad, expired or foreign links are refused; `next` cannot leave the site.
        assert requests.get(f"{api}/dashboard/session", params={"t": "1.x"}).status_code == 401
        r = browser.get(link.replace("next=%2Fdashboard", "next=%2F%2Fevil.example"),
                        allow_redirects=False)
        assert r.headers["location"] == "/dashboard"
        data = browser.get(f"{api}/dashboard", params={**RANGE, "format": "json"}).json()
        assert data["report"]["summary"]["delivered"] == 6


def test_dashboard_link_cli(settings: Settings) -> None:
    from click.testing import CliRunner

    from postback_worker.cli import main

    out = CliRunner().invoke(main, ["dashboard", "link", "--base-url", "http://h:1",
                                    "--since", "7d"], env=settings.to_env())
    assert out.exit_code == 0, out.output
    assert out.output.startswith("http://h:1/dashboard/session?t=")
    assert "next=%2Fdashboard%3Fsince%3D7d" in out.output
    out = CliRunner().invoke(main, ["dashboard", "link", "--since", "soon"],
                             env=settings.to_env())
    assert out.exit_code == 2 and "error: --since: 'soon' is not a date" in out.stderr
    env = {**settings.to_env(), "POSTBACK_ADMIN_TOKEN": "", "POSTBACK_DASHBOARD_SECRET": ""}
    out = CliRunner().invoke(main, ["dashboard", "link"], env=env)
    assert out.exit_code == 2 and "set POSTBACK_DASHBOARD_SECRET" in out.stderr


def test_backlog_age_per_partner_on_the_dashboard_and_in_partners_health(
    settings: Settings, store: Store, scenario: Scenario, clock: Clock,
    redis_client: redis.Redis,
) -> None:
    from sqlalchemy import select

    from postback_worker.ops.oncall.partner_health import health
    from postback_worker.ops.visibility import dashboard as dash
    from postback_worker.ops.visibility.reports import Scope
    from postback_worker.ops.visibility.timerange import TimeRange
    from postback_worker.store import schema

    with store.engine.connect() as conn:
        created = conn.execute(select(schema.postbacks.c.created_at).where(
            schema.postbacks.c.state == "retry_scheduled")).scalar_one()
    clock.advance(3 * 3600 + 125)  # p-down's late postback still waits for its retry
    age = (clock() - created).total_seconds()
    data = dash.gather(store, redis_client, Scope(TimeRange(NOW - timedelta(hours=1), clock())),
                       clock())
    assert data["backlog_age"] == {"p-down": {"postbacks": 1, "age_seconds": age}}
    html = dash.render_html(data)
    table = html.split('<table id="backlog-age">', 1)[1].split("</table>", 1)[0]
    assert re.findall(r'<tr data-partner="([^"]+)"><td>[^<]+</td><td class="n">(\d+)</td>'
                      r'<td class="n">([^<]+)</td>', table) == [("p-down", "1", "3 h 2 min")]
    rows = {r["partner_id"]: r for r in health(store, settings, redis_client, clock())}
    assert rows["p-down"]["backlog_age_seconds"] == age
    assert rows["p-ok"]["backlog_age_seconds"] is None
