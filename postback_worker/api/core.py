"""Core routes: clicks, conversions (TUNE-style GET and JSON batches), offers and partners.

Authentication: `Authorization: Bearer <API key>` (keys with scopes `ingest` or `admin`, see
ops/security/apikeys.py), or the bootstrap admin token (break-glass: every scope).
Public: /click (tracking links), /health, /healthz, the pages / and /docs and the document
/openapi.json (api/pages.py); the advertiser GET /postback takes the offer's `security_token`
instead of a key.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from postback_worker.api.batcher import Batcher
from postback_worker.api.http import HttpError, bearer, error_response, json_response, unavailable
from postback_worker.domain.events import (
    ConversionEvent,
    FieldError,
    ValidationError,
    parse_batch,
    parse_click,
)
from postback_worker.domain.macros import TemplateError, render
from postback_worker.errors import Unavailable
from postback_worker.ops.config import (
    check_offer_token,
    offer_token_problem,
    parse_offer,
    parse_partner,
    redact_offer,
    redact_partner,
    template_report,
)
from postback_worker.ops.conversions import update_event
from postback_worker.ops.lookup import conversion_detail
from postback_worker.ops.security.apikeys import KeyChecker, Principal
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store import schema
from postback_worker.store.journal import LoopJournal
from postback_worker.store.repo import Store

log = logging.getLogger(__name__)
# The bootstrap admin token's identity (break-glass: every scope).
BOOTSTRAP_ADMIN = Principal("bootstrap-admin", frozenset({"admin", "ingest"}))


class Api:
    """Request handlers bound to one store and one producer."""

    def __init__(self, settings: Settings, store: Store, producer: Producer,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.producer = producer
        self.clock = clock or (lambda: datetime.now(UTC))
        self.keys = KeyChecker(store, settings.security.api_key_cache_seconds,
                               clock=self.clock)
        # Requests share commits, made on the event loop (api/batcher.py, LoopJournal).
        self.journal = LoopJournal(producer.journal) if producer.journal is not None else None
        self.batcher = Batcher(self._commit, max_events=settings.ingest.enqueue_chunk_size)
        self._offer_tokens: dict[str, tuple[float, str | None]] = {}

    async def _offer_token_hash(self, offer_id: str) -> str | None:
        """An offer's security token hash, cached for config_cache_seconds."""
        cached = self._offer_tokens.get(offer_id)
        ttl = self.settings.delivery.config_cache_seconds
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return cached[1]
        offer = await run_in_threadpool(self.store.get_offer, offer_id[:64])
        stored = offer.get("security_token_hash") if offer else None
        if len(self._offer_tokens) > 10000:
            self._offer_tokens.clear()
        self._offer_tokens[offer_id] = (time.monotonic(), stored)
        return stored

    # -- helpers --------------------------------------------------------------------------

    async def _commit(self, events: Sequence[ConversionEvent]) -> None:
        """Store the events durably, then have a worker woken (from the producer's thread)."""
        if self.journal is None:  # a producer that publishes to Redis (durable=False)
            await run_in_threadpool(self.producer.enqueue, events)
            return
        await self.journal.record(events)
        self.producer.wake(events)

    async def _json(self, request: Request) -> Any:
        limit = self.settings.ingest.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise HttpError(413, f"request body larger than {limit} "
                                  "bytes; split the batch")
        body = await request.body()
        if len(body) > limit:
            raise HttpError(413, f"request body larger than {limit} "
                                  "bytes; split the batch")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, "request body is not valid JSON",
                             [FieldError("body", str(exc))]) from exc

    def require(self, request: Request, scope: str = "admin") -> Principal:
        """The caller, if it holds a credential with `scope`; otherwise a 401 or 403."""
        given = bearer(request)
        token = self.settings.security.admin_token
        if token and given and hmac.compare_digest(given.encode(), token.encode()):
            return BOOTSTRAP_ADMIN
        if not given:
            raise HttpError(401, "this endpoint needs 'Authorization: Bearer <API key>' "
                                 "(create one with: postback-worker keys create)",
                            headers={"WWW-Authenticate": "Bearer"})
        principal = self.keys.check(given)
        if principal is None:
            raise HttpError(401, "unknown or revoked API key",
                            headers={"WWW-Authenticate": "Bearer"})
        if not principal.allows(scope):
            raise HttpError(403, f"this API key lacks the {scope!r} scope")
        return principal

    def _items(self, payload: Any, key: str) -> Any:
        if isinstance(payload, dict) and key in payload and len(payload) == 1:
            return payload[key]
        return payload

    async def _enqueue(self, events: list[Any], status: int = 202) -> Response:
        """Answer only once the events are committed in the database (the intake journal)."""
        try:
            await self.batcher.submit(events)
        except Unavailable as exc:
            log.error("events not stored: %s", exc)
            return unavailable("the database")
        return json_response({"accepted": len(events), "ids": [e.id for e in events]}, status)

    # -- endpoints ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def click(self, request: Request) -> Response:
        params = dict(request.query_params)
        if request.client and "ip" not in params:
            params["ip"] = request.client.host
        ua = request.headers.get("user-agent")
        if ua and "user_agent" not in params:
            params["user_agent"] = ua[:1024]
        try:
            click = parse_click(params, now=self.clock(), allow_unknown=True,
                                max_field_length=self.settings.ingest.max_field_length)
        except ValidationError as exc:
            return error_response(422, "invalid click", exc.errors)
        offer = await run_in_threadpool(self.store.get_offer, click.offer_id)
        if offer is None:
            return error_response(404, "unknown offer", [FieldError("offer_id", "no such offer")])
        try:
            await run_in_threadpool(self.store.insert_clicks, [_click_row(click)])
        except OperationalError:
            return unavailable("the database")
        if not offer["landing_url"]:
            return json_response({"transaction_id": click.transaction_id})
        try:
            target = render(offer["landing_url"], {
                "transaction_id": click.transaction_id, "offer_id": click.offer_id,
                "affiliate_id": click.aff_id, "aff_sub": click.aff_sub, "source": click.source,
            })
        except TemplateError as exc:
            return error_response(500, f"offer landing_url cannot render: {exc}")
        return RedirectResponse(target, status_code=302)

    async def create_clicks(self, request: Request) -> Response:
        self.require(request, "ingest")
        payload = self._items(await self._json(request), "clicks")
        now = self.clock()
        try:
            clicks = parse_batch(payload, parse_click,
                                 max_items=self.settings.ingest.max_batch_size,
                                 now=now, max_field_length=self.settings.ingest.max_field_length)
        except ValidationError as exc:
            return error_response(422, "invalid clicks", exc.errors)
        offers = {o["id"] for o in await run_in_threadpool(self.store.list_offers)}
        bad = [FieldError(f"events[{i}].offer_id" if len(clicks) > 1 else "offer_id",
                          f"no such offer {c.offer_id!r}")
               for i, c in enumerate(clicks) if c.offer_id not in offers]
        if bad:
            return error_response(422, "invalid clicks", bad)
        try:
            await run_in_threadpool(self.store.insert_clicks, [_click_row(c) for c in clicks])
        except OperationalError:
            return unavailable("the database")
        return json_response({"accepted": len(clicks),
                              "transaction_ids": [c.transaction_id for c in clicks]}, 201)

    async def postback(self, request: Request) -> Response:
        """TUNE-style conversion URL: GET /postback?transaction_id=..&payout=..&security_token=..

        Advertisers authenticate with the offer's security token; backends may send a key.
        """
        params = dict(request.query_params)
        token = params.pop("security_token", None)
        advertiser = token is not None and not bearer(request)
        if token is None or not advertiser:
            self.require(request, "ingest")
        else:
            if params.get("offer_id"):
                stored = await self._offer_token_hash(params["offer_id"])
                problem = offer_token_problem(stored, token)
            else:
                problem = await run_in_threadpool(check_offer_token, self.store, params, token)
            if problem is not None:
                return error_response(403, problem, [FieldError("security_token", problem)])
        try:
            events = self.producer.validate([params], allow_unknown=True)
        except ValidationError as exc:
            return error_response(422, "invalid conversion", exc.errors)
        if advertiser and request.client is not None:
            # Checked against the offer's advertiser networks (allowed_ips) by attribution.
            events = [replace(e, source_ip=request.client.host) for e in events]
        try:
            await self.batcher.submit(events)
        except Unavailable as exc:
            log.error("event not stored: %s", exc)
            return unavailable("the database")
        return json_response({"accepted": 1, "ids": [events[0].id]})

    async def conversions(self, request: Request) -> Response:
        self.require(request, "ingest")
        payload = self._items(await self._json(request), "events")
        items = payload if isinstance(payload, list) else [payload]
        if len(items) > self.settings.ingest.max_batch_size:
            return error_response(413, "batch too large", [FieldError(
                "events", f"at most {self.settings.ingest.max_batch_size} events per request")])
        try:
            events = self.producer.validate(items)
        except ValidationError as exc:
            return error_response(422, "invalid conversions; none were accepted", exc.errors)
        return await self._enqueue(events)

    async def update_conversion(self, request: Request) -> Response:
        """POST /v1/conversions/{id}/events: a new status and/or amounts for a conversion."""
        self.require(request, "ingest")
        cid = request.path_params["conversion_id"]
        body = await self._json(request)
        if not isinstance(body, dict):
            return error_response(422, "invalid update", [FieldError("body", "must be an "
                                                                             "object")])
        try:
            item = await run_in_threadpool(update_event, self.store, cid, body)
            events = self.producer.validate([item])
        except ValidationError as exc:
            return error_response(422, "invalid update", exc.errors)
        return await self._enqueue(events)

    async def conversion(self, request: Request) -> Response:
        self.require(request, "admin")
        cid = request.path_params["conversion_id"]
        detail = await run_in_threadpool(conversion_detail, self.store, cid)
        if detail is None:
            return error_response(404, f"no conversion {cid!r}")
        return json_response(detail)

    async def _catalog(self, request: Request, kind: str, table: Any,
                       parse: Callable[[Any, datetime], dict[str, Any]],
                       redact: Callable[[dict[str, Any]], dict[str, Any]]) -> Response:
        self.require(request, "admin")
        if request.method == "GET":
            rows = await run_in_threadpool(self.store.list_rows, table)
            return json_response({kind + "s": [redact(r) for r in rows]})
        payload = await self._json(request)
        if not isinstance(payload, dict):
            return error_response(422, f"invalid {kind}",
                                  [FieldError("body", f"must be a JSON object (one {kind})")])
        try:
            row = parse(payload, self.clock())
        except ValidationError as exc:
            return error_response(422, f"invalid {kind}", exc.errors)
        await run_in_threadpool(self.store.upsert_row, table, row)
        stored = await run_in_threadpool(self.store.get_row, table, row["id"])
        saved = redact(stored or row)
        if kind == "partner":
            saved["warnings"] = [p.to_dict() for p in template_report(row["postback_url"])
                                 if p.severity == "warning"]
        return json_response(saved, 201)

    async def offers(self, request: Request) -> Response:
        return await self._catalog(request, "offer", schema.offers, parse_offer, redact_offer)

    async def partners(self, request: Request) -> Response:
        return await self._catalog(request, "partner", schema.partners, parse_partner,
                                   redact_partner)


def _click_row(c: Any) -> dict[str, Any]:
    return {
        "transaction_id": c.transaction_id, "offer_id": c.offer_id, "aff_id": c.aff_id,
        "aff_sub": c.aff_sub, "aff_sub2": c.aff_sub2, "aff_sub3": c.aff_sub3,
        "aff_sub4": c.aff_sub4, "aff_sub5": c.aff_sub5, "source": c.source, "ip": c.ip,
        "device_id": c.device_id, "user_agent": c.user_agent, "clicked_at": c.clicked_at,
    }

