"""HTTP routes for template validation, test-fire, signing keys, security tokens, audit, API keys,
and a partner's own page (a signed link; see ops/visibility/partner_page.py).

Every route here needs the `admin` scope.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from postback_worker.api.core import Api
from postback_worker.api.http import HttpError, error_response, json_response
from postback_worker.delivery.sender import Sender
from postback_worker.domain.events import FieldError, ValidationError
from postback_worker.domain.masking import mask_url
from postback_worker.ops.config import (
    body_report,
    change_signing,
    set_offer_token,
    template_report,
)
from postback_worker.ops.security import apikeys
from postback_worker.ops.security.audit import run_audit
from postback_worker.ops.security.testfire import run_test_fire
from postback_worker.ops.visibility import partner_page
from postback_worker.ops.visibility.dashboard_auth import NoSigningKey


def _object(payload: Any, allowed: dict[str, type | tuple[type, ...]],
            required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object with only `allowed` fields of the given types; ValidationError otherwise."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ValidationError([FieldError("body", "must be a JSON object")])
    errors = [FieldError(k, "unknown field") for k in payload if k not in allowed]
    errors += [FieldError(k, "required") for k in required if payload.get(k) in (None, "")]
    for name, kinds in allowed.items():
        value = payload.get(name)
        if value is None:
            continue
        bad_bool = isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple)
                                                            else (kinds,))
        if bad_bool or not isinstance(value, kinds):
            wanted = {str: "a string", bool: "true or false", list: "a list"}
            kind = kinds[0] if isinstance(kinds, tuple) else kinds
            errors.append(FieldError(name, f"must be {wanted.get(kind, kind.__name__)}"))
        elif isinstance(value, str) and len(value) > 4000:
            errors.append(FieldError(name, "must be at most 4000 characters"))
    if errors:
        raise ValidationError(errors)
    return payload


class SecurityRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api
        self._sender: Sender | None = None
        self._page_fired: dict[str, float] = {}

    def sender(self) -> Sender:
        if self._sender is None:
            s = self.api.settings
            self._sender = Sender.from_settings(s.delivery, concurrency=1)
        return self._sender

    async def _body(self, request: Request) -> Any:
        body = await request.body()
        return await self.api._json(request) if body.strip() else None

    async def _partner(self, request: Request) -> dict[str, Any]:
        pid = request.path_params["partner_id"]
        row = await run_in_threadpool(self.api.store.get_partner, pid)
        if row is None:
            raise HttpError(404, f"no partner {pid!r}")
        return row

    async def validate_url(self, request: Request) -> Response:
        self.api.require(request, "admin")
        try:
            data = _object(await self._body(request), {
                "url": str, "dns": bool, "body_template": str, "body_format": str}, ("url",))
        except ValidationError as exc:
            return error_response(422, "invalid request", exc.errors)
        return await self._report(data["url"], bool(data.get("dns")), None,
                                  data.get("body_format"), data.get("body_template"))

    async def validate_partner(self, request: Request) -> Response:
        self.api.require(request, "admin")
        dns = request.query_params.get("dns", "false").lower()
        if dns not in {"true", "false", "1", "0"}:
            return error_response(422, "invalid request", [FieldError("dns", "must be true or "
                                                                             "false")])
        row = await self._partner(request)
        return await self._report(row["postback_url"], dns in {"true", "1"}, row["id"],
                                  row.get("body_format"), row.get("body_template"))

    async def _report(self, url: str, dns: bool, partner_id: str | None,
                      body_format: str | None, body_template: str | None) -> Response:
        problems = await run_in_threadpool(lambda: template_report(url, dns=dns))
        body_problems = body_report(body_format, body_template)
        every = [*problems, *body_problems]
        errors = sum(p.severity == "error" for p in every)
        return json_response({"partner_id": partner_id, "url": mask_url(url),
                              "valid": errors == 0, "errors": errors,
                              "warnings": len(every) - errors,
                              "problems": [p.to_dict() for p in problems],
                              "body_problems": [p.to_dict() for p in body_problems]})

    async def test(self, request: Request) -> Response:
        self.api.require(request, "admin")
        try:
            data = _object(await self._body(request), {
                "transaction_id": str, "payout": (str, int, float), "fire": bool})
        except ValidationError as exc:
            return error_response(422, "invalid request", exc.errors)
        row = await self._partner(request)
        payout = data.get("payout")
        report = await run_in_threadpool(
            lambda: run_test_fire(self.api.store, row, self.api.clock(),
                                  sender=self.sender() if data.get("fire") else None,
                                  fire=bool(data.get("fire")),
                                  transaction_id=data.get("transaction_id"),
                                  payout=None if payout is None else str(payout),
                                  clock=self.api.clock))
        return json_response(report.to_dict())

    async def signing(self, request: Request) -> Response:
        self.api.require(request, "admin")
        try:
            data = _object(await self._body(request),
                           {"action": str, "header": str, "scheme": str}, ("action",))
            grace = timedelta(hours=self.api.settings.security.signing_grace_hours)
            secret, summary = await run_in_threadpool(
                change_signing, self.api.store, request.path_params["partner_id"],
                data["action"], self.api.clock(), grace, data.get("header"),
                data.get("scheme"))
        except ValidationError as exc:
            return error_response(422, "invalid request", exc.errors)
        body: dict[str, Any] = {"message": summary}
        if secret:
            body["secret"] = secret
            body["note"] = "shown once: give it to the partner now (see docs/signing.md)"
        return json_response(body)

    async def security_token(self, request: Request) -> Response:
        self.api.require(request, "admin")
        oid = request.path_params["offer_id"]
        token = await run_in_threadpool(set_offer_token, self.api.store, oid, self.api.clock())
        if token is None:
            return error_response(404, f"no offer {oid!r}")
        return json_response({"offer_id": oid, "security_token": token,
                              "note": "shown once; the previous token no longer works"})

    async def audit(self, request: Request) -> Response:
        self.api.require(request, "admin")
        report = await run_in_threadpool(run_audit, self.api.store, self.api.settings,
                                         self.api.clock())
        return json_response(report.to_dict())

    async def keys(self, request: Request) -> Response:
        self.api.require(request, "admin")
        store = self.api.store
        if request.method == "GET":
            return json_response({"keys": await run_in_threadpool(apikeys.list_keys, store)})
        try:
            data = _object(await self._body(request), {"name": str, "scopes": list},
                           ("name", "scopes"))
            if not all(isinstance(s, str) for s in data["scopes"]):
                raise ValidationError([FieldError("scopes", "must be a list of strings")])
            key_id, key = await run_in_threadpool(apikeys.create_key, store, data["name"],
                                                  data["scopes"], self.api.clock())
        except ValidationError as exc:
            return error_response(422, "invalid key", exc.errors)
        except apikeys.ApiKeyError as exc:
            return error_response(422, "invalid key", [FieldError("scopes", str(exc))])
        return json_response({"id": key_id, "key": key,
                              "note": "shown once; only its hash is stored"}, 201)

    async def revoke(self, request: Request) -> Response:
        self.api.require(request, "admin")
        key_id = request.path_params["key_id"]
        done = await run_in_threadpool(apikeys.revoke_key, self.api.store, key_id,
                                       self.api.clock())
        if not done:
            return error_response(404, f"no active key {key_id!r}")
        return json_response({"id": key_id, "revoked": True})


    # -- a partner's own page (signed link, no API credential) ----------------------------

    async def page_link(self, request: Request) -> Response:
        self.api.require(request, "admin")
        row = await self._partner(request)
        days_text = request.query_params.get("days", str(partner_page.LINK_DAYS))
        try:
            days = float(days_text)
            if not 0 < days <= partner_page.MAX_LINK_DAYS:
                raise ValueError
        except ValueError:
            return error_response(422, "invalid request", [FieldError(
                "days", f"must be a number of days above 0, at most "
                        f"{partner_page.MAX_LINK_DAYS}")])
        try:
            url = partner_page.page_link(self.api.settings, str(request.base_url), row["id"],
                                         self.api.clock(), days)
        except NoSigningKey as exc:
            return error_response(409, str(exc))
        return json_response({"url": url, "expires_in": int(days * 86400)})

    async def _page_partner(self, request: Request, token: str) -> dict[str, Any] | None:
        pid = request.path_params["partner_id"]
        if not partner_page.allowed(self.api.settings, pid, token, self.api.clock()):
            return None
        return await run_in_threadpool(self.api.store.get_partner, pid)

    async def page(self, request: Request) -> Response:
        token = request.query_params.get("t", "")
        row = await self._page_partner(request, token)
        if row is None:
            return HTMLResponse(partner_page.refused_page(), status_code=403)
        data = await run_in_threadpool(partner_page.gather, self.api.store, self.api.settings,
                                       row, self.api.clock())
        return HTMLResponse(partner_page.render_html(data, token))

    async def page_test(self, request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("t") or [""])[0]
        row = await self._page_partner(request, token)
        if row is None:
            return HTMLResponse(partner_page.refused_page(), status_code=403)
        last = self._page_fired.get(row["id"], float("-inf"))
        if time.monotonic() - last < PAGE_TEST_INTERVAL:
            return HTMLResponse(f"<p>One test postback every {PAGE_TEST_INTERVAL:g} seconds; "
                                "go back and try again shortly.</p>", status_code=429)
        self._page_fired[row["id"]] = time.monotonic()
        report = await run_in_threadpool(
            lambda: run_test_fire(self.api.store, row, self.api.clock(), sender=self.sender(),
                                  fire=True, clock=self.api.clock))
        data = await run_in_threadpool(partner_page.gather, self.api.store, self.api.settings,
                                       row, self.api.clock())
        return HTMLResponse(partner_page.render_html(data, token, report.to_dict()))


# Seconds between test postbacks sent from a partner's page.
PAGE_TEST_INTERVAL = 5.0


def routes(api: Api) -> list[BaseRoute]:
    r = SecurityRoutes(api)
    return [
        Route("/v1/partners/{partner_id}/page-link", r.page_link, methods=["POST"]),
        Route("/partner-page/{partner_id}", r.page, methods=["GET"]),
        Route("/partner-page/{partner_id}/test", r.page_test, methods=["POST"]),
        Route("/v1/templates/validate", r.validate_url, methods=["POST"]),
        Route("/v1/partners/{partner_id}/validate", r.validate_partner, methods=["GET"]),
        Route("/v1/partners/{partner_id}/test", r.test, methods=["POST"]),
        Route("/v1/partners/{partner_id}/signing", r.signing, methods=["POST"]),
        Route("/v1/offers/{offer_id}/security-token", r.security_token, methods=["POST"]),
        Route("/v1/audit", r.audit, methods=["GET"]),
        Route("/v1/keys", r.keys, methods=["GET", "POST"]),
        Route("/v1/keys/{key_id}", r.revoke, methods=["DELETE"]),
    ]
