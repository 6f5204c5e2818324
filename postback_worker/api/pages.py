"""Public pages for people: the start page `/` and the interactive API docs `/docs`.

`/docs` is Swagger UI drawing `/openapi.json` (api/openapi.py, served from here). Its files
come from the `swagger-ui-bundle` package (Swagger UI, Apache License 2.0; the licence is in
that package's metadata) and are served by this API: the page loads nothing from any other
site.
"""

from __future__ import annotations

from html import escape
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from postback_worker.api.core import Api
from postback_worker.api.http import HttpError, json_response
from postback_worker.api.openapi import document
from postback_worker.ops.visibility.dashboard import STYLE

# Swagger UI's files that /docs uses, served under /docs/.
DOCS_FILES = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript",
              "favicon-32x32.png": "image/png"}
# Nothing but this site: a page that tried to load a script or style from elsewhere would fail.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")

DOCS_INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
    tryItOutEnabled: false, persistAuthorization: false
  });
});
"""

DOCS_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>postback-worker API docs</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
</head><body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script>
</body></html>
"""


def swagger_ui_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def _version() -> str:
    try:
        return version("postback-worker")
    except PackageNotFoundError:
        return "unknown"


def home_html(database: str) -> str:
    links = [
        ("/dashboard", "Dashboard",
         "delivery figures, worst partners, queues, alerts. Sign in with a link from "
         "<code>postback-worker dashboard link</code> (valid 10 minutes)."),
        ("/docs", "API docs", "every endpoint, interactive (from <code>/openapi.json</code>)."),
        ("/health", "Health", "liveness: answers <code>{\"status\": \"ok\"}</code>."),
        ("/metrics", "Metrics",
         "Prometheus figures (needs an admin key or <code>POSTBACK_METRICS_TOKEN</code>)."),
    ]
    items = "".join(f'<li><a href="{href}">{escape(title)}</a>: {text}</li>'
                    for href, title, text in links)
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>postback-worker</title><style>{STYLE}</style></head><body>"
        "<h1>postback-worker</h1>"
        f'<p class="muted" id="running">Running here: the HTTP API, version {escape(_version())}'
        f", on {escape(database)}. Celery workers, beat and Flower are separate processes.</p>"
        f'<div class="card"><ul id="links">{items}</ul></div>'
        '<p class="muted">No credential needed: <code>/</code>, <code>/docs</code>, '
        "<code>/openapi.json</code>, <code>/health</code>, <code>/click</code>; "
        "<code>/postback</code> takes the offer's security token. Every other endpoint needs "
        "<code>Authorization: Bearer &lt;API key&gt;</code> (<code>postback-worker keys "
        "create</code>).</p></body></html>")


class Pages:
    def __init__(self, api: Api) -> None:
        self.database = "SQLite" if api.settings.is_sqlite else "PostgreSQL"
        self.files = swagger_ui_dir()
        self.ingest = api.settings.ingest

    async def home(self, request: Request) -> Response:
        return HTMLResponse(home_html(self.database), headers={"Content-Security-Policy": CSP})

    async def openapi(self, request: Request) -> Response:
        return json_response(document(self.ingest))

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE, headers={"Content-Security-Policy": CSP})

    async def docs_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "init.js":
            return Response(DOCS_INIT, media_type="text/javascript")
        if name not in DOCS_FILES:
            raise HttpError(404, f"no file {name!r} under /docs/")
        return FileResponse(self.files / name, media_type=DOCS_FILES[name],
                            headers={"Cache-Control": "public, max-age=86400"})


def routes(api: Api) -> list[BaseRoute]:
    pages = Pages(api)
    return [
        Route("/", pages.home, methods=["GET"]),
        Route("/docs", pages.docs, methods=["GET"]),
        Route("/openapi.json", pages.openapi, methods=["GET"]),
        Route("/docs/{name}", pages.docs_file, methods=["GET"]),
    ]
