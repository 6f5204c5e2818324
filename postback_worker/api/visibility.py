"""HTTP routes for metrics, reports, alerts and the dashboard.

Auth: everything needs the `admin` scope (`Authorization: Bearer ...`), or, for the read-only
pages a browser opens (dashboard, reports, alerts), the signed session cookie a dashboard link
sets (see ops/dashboard_auth.py). GET /metrics also accepts `Authorization: Bearer
<metrics_token>` when that setting is set, so Prometheus needs no admin credential.

The query parameters each endpoint reads are declared below as JSON Schema: the handlers take
their names, choices, bounds and defaults from these tables and the OpenAPI document
(api/openapi.py) is generated from them.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from postback_worker.api.core import Api
from postback_worker.api.http import HttpError, error_response, json_response
from postback_worker.domain import operator_events as oe
from postback_worker.domain.events import FieldError
from postback_worker.ops.visibility import dashboard as dash
from postback_worker.ops.visibility import dashboard_auth as da
from postback_worker.ops.visibility import metrics, reports
from postback_worker.ops.visibility.alerts import list_alerts
from postback_worker.ops.visibility.operator_events import LIST_STATES, check_filters, list_events
from postback_worker.ops.visibility.timerange import RangeError, parse_range

MAX_JSON_ROWS = 10_000
ALERT_STATES = ("open", "resolved", "all")
Schema = dict[str, Any]

_WHEN = "a date (2026-11-25), a time (2026-11-25T10:00Z) or a duration ago (30m, 24h, 7d)"
_PARTNER: Schema = {"type": "string", "description": "only this partner"}
RANGE_QUERY: dict[str, Schema] = {
    "since": {"type": "string", "description": f"start (inclusive): {_WHEN}; default: 24 "
                                               "hours before until"},
    "until": {"type": "string", "description": f"end (exclusive): {_WHEN}, or now; "
                                               "default: now"},
    "partner": _PARTNER,
    "offer": {"type": "string", "description": "only this offer"},
}
DELIVERY_QUERY: dict[str, Schema] = {
    **RANGE_QUERY, "format": {"type": "string", "enum": ["json", "csv"], "default": "json"}}
FAILED_QUERY: dict[str, Schema] = {
    **RANGE_QUERY,
    "format": {"type": "string", "enum": ["csv", "json", "html"], "default": "json"},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_JSON_ROWS,
              "default": MAX_JSON_ROWS,
              "description": "rows at most (json, html); format=csv streams every row"},
}
_LIMIT: Schema = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
ALERTS_QUERY: dict[str, Schema] = {
    "state": {"type": "string", "enum": list(ALERT_STATES), "default": "all"},
    "partner": _PARTNER, "limit": _LIMIT}
EVENTS_QUERY: dict[str, Schema] = {
    "type": {"type": "string", "enum": list(oe.TYPES)},
    "partner": _PARTNER,
    "state": {"type": "string", "enum": list(LIST_STATES),
              "description": "its deliveries' state, or unplanned"},
    "limit": _LIMIT,
}
LINK_QUERY: dict[str, Schema] = {
    "next": {"type": "string", "description": "a local path to open after signing in, e.g. "
                                              "/dashboard?since=7d (default: /dashboard)"}}
# What the report and dashboard handlers accept (each reads its own; the rest are ignored).
_SCOPE_PARAMS = {*FAILED_QUERY, "state"}


class Visibility:
    """Handlers bound to the API's settings and store, with lazily built Redis clients."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.settings = api.settings
        self._clients: dict[str, Any] = {}
        self._pid = -1

    def _client(self, url: str) -> Any:
        if self._pid != os.getpid():
            self._clients, self._pid = {}, os.getpid()
        if url not in self._clients:
            self._clients[url] = self.settings.redis.client(url=url, timeout=3)
        return self._clients[url]

    @property
    def redis(self) -> Any:
        """Where circuit states live (settings.redis.url)."""
        return self._client(self.settings.redis.url)

    @property
    def broker(self) -> Any:
        """Where the Celery queues live (the broker)."""
        return self._client(self.settings.redis.effective_broker_url)

    # -- auth -----------------------------------------------------------------------------

    def viewer(self, request: Request) -> None:
        """Admin credential, or a valid dashboard session cookie."""
        cookie = request.cookies.get(da.COOKIE)
        if ("authorization" not in request.headers and cookie
                and da.check_token(self.settings, "session", cookie, self.api.clock())):
            return
        self.api.require(request, "admin")

    def scraper(self, request: Request) -> None:
        token = self.settings.metrics.token
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token and given and hmac.compare_digest(given.encode(), token.encode()):
            return
        self.api.require(request, "admin")

    # -- helpers --------------------------------------------------------------------------

    def _scope(self, request: Request) -> reports.Scope | Response:
        q = request.query_params
        errors = [FieldError(k, "unknown parameter") for k in q if k not in _SCOPE_PARAMS]
        if errors:
            return self._bad(errors)
        try:
            rng = parse_range(q.get("since"), q.get("until"), self.api.clock())
        except RangeError as exc:
            return self._bad(exc.errors)
        return reports.Scope(rng, q.get("partner") or None, q.get("offer") or None)

    def _bad(self, errors: list[FieldError]) -> Response:

        return error_response(422, "invalid query parameters", errors)

    def _format(self, request: Request, allowed: tuple[str, ...], default: str) -> str | None:
        fmt = request.query_params.get("format", default)
        return fmt if fmt in allowed else None

    def _bad_format(self, allowed: tuple[str, ...]) -> Response:
        return self._bad([FieldError("format", "must be one of: " + ", ".join(allowed))])

    def _limit(self, request: Request, spec: Schema) -> int | None:
        """The `limit` parameter within `spec`'s bounds (its default if absent), or None."""
        text = request.query_params.get("limit", str(spec["default"]))
        try:
            n = int(text) if text.isdigit() else None  # "²" is a digit int() refuses
        except ValueError:
            n = None
        return n if n is not None and spec["minimum"] <= n <= spec["maximum"] else None

    # -- endpoints ------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        self.scraper(request)
        body = await run_in_threadpool(metrics.render, self.settings, self.api.store,
                                       self.redis, self.api.clock, self.broker)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    async def delivery(self, request: Request) -> Response:

        self.viewer(request)
        scope = self._scope(request)
        if isinstance(scope, Response):
            return scope
        fmt_spec = DELIVERY_QUERY["format"]
        fmt = self._format(request, tuple(fmt_spec["enum"]), fmt_spec["default"])
        if fmt is None:
            return self._bad_format(tuple(fmt_spec["enum"]))
        report = await run_in_threadpool(reports.delivery_report, self.api.store, scope)
        if fmt == "csv":
            body = "".join(reports.csv_lines(reports.report_rows(report),
                                             reports.REPORT_CSV_COLUMNS))
            return Response(body, media_type="text/csv; charset=utf-8", headers={
                "Content-Disposition": 'attachment; filename="delivery-report.csv"'})
        return json_response(report)

    async def failed(self, request: Request) -> Response:

        self.viewer(request)
        scope = self._scope(request)
        if isinstance(scope, Response):
            return scope
        allowed = tuple(FAILED_QUERY["format"]["enum"])
        fmt = self._format(request, allowed, FAILED_QUERY["format"]["default"])
        if fmt is None:
            return self._bad_format(allowed)
        if fmt == "csv":
            stream = reports.failed_postbacks(self.api.store, scope)
            return StreamingResponse(
                reports.csv_lines(stream, reports.FAILED_COLUMNS),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": 'attachment; filename="failed-postbacks.csv"'})
        limit = self._limit(request, FAILED_QUERY["limit"])
        if limit is None:
            return self._bad([FieldError("limit", f"must be 1..{MAX_JSON_ROWS}; use "
                                                  "format=csv for everything")])

        def fetch() -> list[dict[str, Any]]:
            return list(reports.failed_postbacks(self.api.store, scope, limit + 1))

        rows = await run_in_threadpool(fetch)
        truncated = len(rows) > limit
        rows = rows[:limit]
        if fmt == "html":
            who = f"partner {scope.partner_id}" if scope.partner_id else "all partners"
            return HTMLResponse(dash.failed_html(rows, f"Failed postbacks: {who}"))
        return json_response({"since": scope.range.since, "until": scope.range.until,
                              "count": len(rows), "truncated": truncated,
                              "failed_postbacks": rows})

    async def alerts(self, request: Request) -> Response:

        self.viewer(request)
        q = request.query_params
        state = q.get("state", ALERTS_QUERY["state"]["default"])
        errors = []
        if state not in ALERT_STATES:
            errors.append(FieldError("state", "must be one of: " + ", ".join(ALERT_STATES)))
        limit = self._limit(request, ALERTS_QUERY["limit"])
        if limit is None:
            errors.append(FieldError("limit", "must be 1..1000"))
        if errors or limit is None:
            return self._bad(errors)
        rows = await run_in_threadpool(
            lambda: list_alerts(self.api.store, state=state, partner_id=q.get("partner") or None,
                                limit=limit))
        return json_response({"alerts": rows})

    async def operator_events(self, request: Request) -> Response:
        self.viewer(request)
        q = request.query_params
        errors = [FieldError(k, "unknown parameter") for k in q if k not in EVENTS_QUERY]
        errors += [FieldError(f, m) for f, m in check_filters(q.get("type"), q.get("state"))]
        limit = self._limit(request, EVENTS_QUERY["limit"])
        if limit is None:
            errors.append(FieldError("limit", "must be 1..1000"))
        if errors or limit is None:
            return self._bad(errors)
        rows = await run_in_threadpool(lambda: list_events(
            self.api.store, type_=q.get("type") or None, partner_id=q.get("partner") or None,
            state=q.get("state") or None, limit=limit))
        return json_response({"events": rows})

    async def dashboard(self, request: Request) -> Response:

        try:
            self.viewer(request)
        except HttpError as exc:
            return HTMLResponse(_login_page(str(exc)), status_code=exc.http_status)
        scope = self._scope(request)
        if isinstance(scope, Response):
            return scope
        fmt = self._format(request, ("html", "json"), "html")
        if fmt is None:
            return self._bad_format(("html", "json"))
        data = await run_in_threadpool(dash.gather, self.api.store, self.redis, scope,
                                       self.api.clock(), self.broker)
        if fmt == "json":
            return json_response(data)
        return HTMLResponse(dash.render_html(data))

    async def link(self, request: Request) -> Response:

        self.api.require(request, "admin")
        base = str(request.base_url)
        try:
            url = da.dashboard_link(self.settings, base, self.api.clock(),
                                    request.query_params.get("next"))
        except da.NoSigningKey as exc:
            return error_response(409, str(exc))
        return json_response({"url": url, "expires_in": da.LINK_SECONDS})

    async def session(self, request: Request) -> Response:
        token = request.query_params.get("t", "")
        now = self.api.clock()
        if not da.check_token(self.settings, "link", token, now):
            return HTMLResponse(_login_page("this dashboard link is invalid or has expired"),
                                status_code=401)
        resp = RedirectResponse(da.safe_next(request.query_params.get("next")),
                                status_code=303)
        resp.set_cookie(da.COOKIE, da.make_token(self.settings, "session", now,
                                                 da.SESSION_SECONDS),
                        max_age=da.SESSION_SECONDS, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
        return resp


def _login_page(problem: str) -> str:
    from html import escape

    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Dashboard: "
            "sign in</title></head><body><h1>Postback delivery dashboard</h1>"
            f"<p>{escape(problem)}.</p><p>Get a sign-in link (valid 10 minutes) with "
            "<code>postback-worker dashboard link --base-url URL</code>, or POST "
            "/v1/dashboard/link with an admin key.</p></body></html>")


def routes(api: Api) -> list[BaseRoute]:
    v = Visibility(api)
    return [
        Route("/metrics", v.metrics, methods=["GET"]),
        Route("/v1/reports/delivery", v.delivery, methods=["GET"]),
        Route("/v1/reports/failed", v.failed, methods=["GET"]),
        Route("/v1/alerts", v.alerts, methods=["GET"]),
        Route("/v1/operator-events", v.operator_events, methods=["GET"]),
        Route("/dashboard", v.dashboard, methods=["GET"]),
        Route("/dashboard/session", v.session, methods=["GET"]),
        Route("/v1/dashboard/link", v.link, methods=["POST"]),
    ]
