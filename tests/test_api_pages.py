"""The pages for people: `/` (what runs, where to go) and `/docs` (Swagger UI from local files),
the latter rendered in headless Chromium with every other site unreachable."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate
from starlette.routing import Route
from support.browser import chromium, find_chromium

from postback_worker.api.app import create_app
from postback_worker.api.openapi import document
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


@pytest.fixture()
def api(serve: Callable[[Settings], str], settings: Settings, store: Store) -> str:
    return serve(settings)


def test_start_page_links_what_a_newcomer_needs(api: str) -> None:
    r = requests.get(f"{api}/", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    running = re.search(r'<p class="muted" id="running">([^<]+)</p>', r.text)
    assert running and "the HTTP API, version" in running[1] and "PostgreSQL" in running[1]
    links = dict(re.findall(r'<a href="([^"]+)">([^<]+)</a>', r.text))
    assert links == {"/dashboard": "Dashboard", "/docs": "API docs", "/health": "Health",
                     "/metrics": "Metrics"}
    assert "postback-worker dashboard link" in r.text
    for href in links:  # every link answers (the protected ones ask for a credential)
        status = requests.get(f"{api}{href}", timeout=5).status_code
        assert status == (401 if href in ("/dashboard", "/metrics") else 200), href


def test_docs_page_and_its_files_are_served_here(api: str) -> None:
    r = requests.get(f"{api}/docs", timeout=5)
    assert r.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert sources and all(s.startswith("docs/") for s in sources), sources
    for src in sources:
        f = requests.get(f"{api}/{src}", timeout=5)
        assert f.status_code == 200 and len(f.content) > 100, src
    assert "SwaggerUIBundle" in requests.get(f"{api}/docs/swagger-ui-bundle.js").text[:200_000]
    assert 'url: "openapi.json"' in requests.get(f"{api}/docs/init.js").text
    missing = requests.get(f"{api}/docs/index.html", timeout=5)
    assert missing.status_code == 404 and "no file 'index.html'" in missing.json()["error"]


# Pages for people (HTML, and Swagger UI's own files): not API operations, so not documented.
PAGES = {"/", "/docs", "/docs/{name}", "/dashboard", "/dashboard/session",
         "/partner-page/{partner_id}", "/partner-page/{partner_id}/test"}


def test_openapi_documents_every_api_route_and_only_those(api: str, settings: Settings) -> None:
    app = create_app(settings)
    paths = {r.path for r in app.routes if isinstance(r, Route)}
    assert paths >= PAGES, f"pages that no longer exist: {PAGES - paths}"
    routes = {(r.path, method.lower()) for r in app.routes
              if isinstance(r, Route) and r.path not in PAGES
              for method in r.methods or () if method != "HEAD"}
    document = requests.get(f"{api}/openapi.json", timeout=5).json()
    documented = {(path, method) for path, item in document["paths"].items()
                  for method in item}
    assert not routes - documented, f"routes missing from /openapi.json: {routes - documented}"
    assert not documented - routes, f"documented, but not routes: {documented - routes}"
    assert len(routes) >= 41


def test_docs_render_in_headless_chromium_without_other_sites(api: str, tmp_path: Path) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium); .ci/run "
                    "installs it when it can")
    # Every host name but the API's address fails to resolve: a CDN could not load.
    offline = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               "--virtual-time-budget=20000")
    dom = chromium(binary, tmp_path, *offline, "--dump-dom", f"{api}/docs")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # Swagger UI drew the document: title, the Authorize button, one block per operation.
    assert re.search(r'<h2 class="title">postback-worker', html), html[:3000]
    assert "Authorize" in html
    paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', html))
    document = requests.get(f"{api}/openapi.json", timeout=5).json()
    assert paths == set(document["paths"])
    shot = tmp_path / "docs.png"
    run = chromium(binary, tmp_path, *offline, f"--screenshot={shot}", f"{api}/docs")
    assert run.returncode == 0 and shot.stat().st_size > 20_000


def test_openapi_document_is_valid_for_the_version_it_declares() -> None:
    """/docs renders it with Swagger UI 4 (OpenAPI 3.0): 3.1-only constructs such as
    {"type": "null"} make a strict 3.0 validator, and client generators, refuse it."""
    doc = document()
    assert doc["openapi"].startswith("3.0.")
    validate(doc)
