"""HTTP routes for dead letters, replay, re-attribution, partner health, support bundles.

Every route needs the admin scope. What each route reads is declared below as JSON Schema: the
handlers take their field names, bounds and defaults from these tables and the OpenAPI document
(api/openapi.py) is generated from them, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from postback_worker.api.core import Api
from postback_worker.api.http import NUL, HttpError, error_response, json_response
from postback_worker.domain.deadletters import FILTER_SCHEMA, TIME_HELP
from postback_worker.domain.events import FieldError, ValidationError
from postback_worker.ops.oncall import bundle, reattribute, replay
from postback_worker.ops.oncall import deadletters as dlq_ops
from postback_worker.ops.oncall.deadletters import Filter
from postback_worker.ops.oncall.partner_health import (
    health,
    pause,
    resume,
    set_limits,
)
from postback_worker.ops.oncall.replay import celery_enqueue, get_run

FILTER_FIELDS = tuple(FILTER_SCHEMA)
Handler = Callable[[Request], Awaitable[Response]]
Schema = dict[str, Any]

_TIME: Schema = {"type": "string", "description": TIME_HELP}
_DRY_RUN: Schema = {"type": "boolean", "default": False,
                    "description": "only report what would happen; change nothing"}
_WHO: Schema = {"type": "string", "minLength": 1, "maxLength": 150, "pattern": r"\S",
                "description": "who triggers it (recorded with the API key's name)"}
# GET /v1/dead-letters: paging (the filter's fields are query parameters too).
LIST_QUERY: dict[str, Schema] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50,
              "description": "rows per page"},
    "offset": {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0,
               "description": "rows to skip (newest first)"},
    "after": {"type": "string", "description": "start after this row: the next_after of the "
                                               "previous page (faster than offset deep down)"},
}
# POST /v1/dead-letters/replay and /purge: the filter's fields plus these.
REPLAY_FIELDS: dict[str, Schema] = {
    "dry_run": _DRY_RUN,
    "rate": {"anyOf": [{"type": "number", "minimum": 0, "exclusiveMinimum": True,
                        "maximum": 10000}, {"type": "string"}],
             "description": "postbacks per second, e.g. 10 or \"10/s\" (at most 10000; "
                            "default: POSTBACK_REPLAY_RATE)"},
    "limit": {"type": "integer", "minimum": 1, "maximum": 10**9,
              "description": "at most this many (oldest first)"},
    "triggered_by": _WHO,
}
PURGE_FIELDS: dict[str, Schema] = {
    "confirm": {"type": "boolean", "enum": [True],
                "description": "must be true: purging deletes dead letters for good"},
    "triggered_by": _WHO,
}
REATTRIBUTE_FIELDS: dict[str, Schema] = {
    "offer_id": {"type": "string", "minLength": 1,
                 "description": "the offer whose expired_click conversions to attribute again "
                                "(after its lifespan was extended)"},
    "since": {**_TIME, "description": f"conversions received since: {TIME_HELP}"},
    "until": {**_TIME, "description": f"conversions received until: {TIME_HELP}"},
    "dry_run": _DRY_RUN,
    "triggered_by": _WHO,
}
PAUSE_FIELDS: dict[str, Schema] = {
    "reason": {"type": "string", "nullable": True, "description": "shown with the pause"},
}
LIMITS_FIELDS: dict[str, Schema] = {
    "rate_limit": {"type": "number", "minimum": 0, "maximum": 10000, "nullable": True,
                   "description": "requests per second across all workers (0 or null: none)"},
    "max_concurrency": {"type": "integer", "minimum": 0, "maximum": 10000, "nullable": True,
                        "description": "requests at once across all workers (0 or null: none)"},
}
BUNDLE_QUERY: dict[str, Schema] = {
    "since": {**_TIME, "default": "24h"},
    "until": {**_TIME, "description": f"{TIME_HELP} (default: now)"},
}


class _OnCall:
    def __init__(self, api: Api) -> None:
        self.api = api
        self._enqueue: Any = None
        self._redis: Any = None

    # -- helpers --------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.api.clock().astimezone(UTC)

    def enqueue(self) -> Any:
        if self._enqueue is None:

            self._enqueue = celery_enqueue(self.api.settings)
        return self._enqueue

    def redis(self) -> Any:
        if self._redis is None:

            self._redis = self.api.settings.redis.client()
        return self._redis

    async def body(self, request: Request) -> dict[str, Any]:

        raw = await self.api._json(request) if await request.body() else {}
        if not isinstance(raw, dict):
            raise HttpError(422, "invalid request", [FieldError("body", "must be an object")])
        nul = [FieldError(k, NUL) for k, v in raw.items() if isinstance(v, str) and "\x00" in v]
        if nul:  # PostgreSQL text cannot hold one: the database would refuse it (a 500)
            raise HttpError(422, "invalid request", nul)
        return raw

    def filt(self, data: dict[str, Any], extra: set[str]) -> Filter:
        unknown = [k for k in data if k not in FILTER_FIELDS and k not in extra]
        picked = {k: v for k, v in data.items() if k in FILTER_FIELDS}
        errors = [FieldError(k, "unknown field") for k in unknown]
        try:
            filt = Filter.parse(picked, self.now())
        except ValidationError as exc:
            errors = exc.errors + errors
            filt = Filter()
        if errors:
            raise ValidationError(errors)
        return filt

    # -- dead letters ---------------------------------------------------------------------

    async def list(self, request: Request) -> Response:
        self.api.require(request, "admin")
        q = dict(request.query_params)
        errors: list[FieldError] = []
        paging = {}
        for name in ("limit", "offset"):
            spec = LIST_QUERY[name]
            high = spec["maximum"]
            try:
                paging[name] = int(q.pop(name, spec["default"]))
                if not spec["minimum"] <= paging[name] <= high:
                    raise ValueError
            except ValueError:
                errors.append(FieldError(name, f"must be a whole number up to {high}"))
        cursor = None
        after = q.pop("after", None)
        if after not in (None, ""):
            try:
                cursor = dlq_ops.Cursor.parse(str(after))
            except ValidationError as exc:
                errors.extend(exc.errors)
        try:
            filt = self.filt(q, set())
        except ValidationError as exc:
            errors = exc.errors + errors
        if errors:
            return _invalid("invalid dead-letter query", errors)
        rows, total = await run_in_threadpool(
            dlq_ops.list_dead_letters, self.api.store, filt, limit=paging["limit"],
            offset=paging["offset"], after=cursor)
        nxt = paging["offset"] + len(rows)
        return _json({"dead_letters": rows, "total": total, "limit": paging["limit"],
                      "offset": paging["offset"],
                      "next_offset": nxt if cursor is None and nxt < total else None,
                      "next_after": dlq_ops.next_after(rows, paging["limit"])})

    async def stats(self, request: Request) -> Response:
        self.api.require(request, "admin")
        try:
            filt = self.filt(dict(request.query_params), set())
        except ValidationError as exc:
            return _invalid("invalid dead-letter query", exc.errors)
        return _json(await run_in_threadpool(dlq_ops.stats, self.api.store, filt))

    async def show(self, request: Request) -> Response:
        self.api.require(request, "admin")
        pid = request.path_params["postback_id"]
        detail = await run_in_threadpool(dlq_ops.show, self.api.store, pid)
        if detail is None:
            return _error(404, f"no postback {pid!r}")
        return _json(detail)

    async def replay(self, request: Request) -> Response:
        key = getattr(self.api.require(request, "admin"), "name", None) or "admin"

        data = await self.body(request)
        extra = set(REPLAY_FIELDS)
        errors: list[FieldError] = []
        try:
            filt = self.filt(data, extra)
        except ValidationError as exc:
            errors += exc.errors
            filt = Filter()
        rate = self.api.settings.oncall.replay_rate
        if data.get("rate") is not None:
            try:
                rate = replay.parse_rate(str(data["rate"]))
            except ValueError as exc:
                errors.append(FieldError("rate", str(exc)))
        limit = data.get("limit")
        high = REPLAY_FIELDS["limit"]["maximum"]
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or not 1 <= limit <= high):
            errors.append(FieldError("limit", f"must be a whole number from 1 to {high}"))
        dry_run = data.get("dry_run", False)
        if not isinstance(dry_run, bool):
            errors.append(FieldError("dry_run", "must be true or false"))
        who = _who(data, errors, key)
        if errors:
            return _invalid("invalid replay request; nothing was replayed", errors)
        enqueue = None if dry_run else self.enqueue()
        run, plan = await run_in_threadpool(
            lambda: replay.start(self.api.store, self.api.settings, filt, who=who, rate=rate,
                                 now=self.now(), enqueue=enqueue, dry_run=dry_run, limit=limit))
        body: dict[str, Any] = {
            "run_id": run.id, "dry_run": dry_run, "selected": run.selected,
            "queued": run.queued, "rate": rate, "rerendered": run.rerendered,
            "skipped": [c.as_dict() for c in run.skipped],
            "message": _replay_message(run, rate),
        }
        if dry_run:
            body["postbacks"] = [c.as_dict() for c in plan.ready]
        return _json(body, 200 if dry_run else 202)

    async def run(self, request: Request) -> Response:
        self.api.require(request, "admin")

        run_id = request.path_params["run_id"]
        row = await run_in_threadpool(get_run, self.api.store, run_id)
        return _error(404, f"no run {run_id!r}") if row is None else _json(row)

    async def purge(self, request: Request) -> Response:
        key = getattr(self.api.require(request, "admin"), "name", None) or "admin"
        data = await self.body(request)
        errors: list[FieldError] = []
        try:
            filt = self.filt(data, set(PURGE_FIELDS))
        except ValidationError as exc:
            errors += exc.errors
            filt = Filter()
        if data.get("confirm") is not True:
            errors.append(FieldError("confirm", "must be true: purging deletes dead letters "
                                                "for good"))
        who = _who(data, errors, key)
        if errors:
            return _invalid("invalid purge request; nothing was purged", errors)
        n = await run_in_threadpool(dlq_ops.purge, self.api.store, filt, who, self.now())
        return _json({"purged": n})

    # -- re-attribution -------------------------------------------------------------------

    async def reattribute(self, request: Request) -> Response:
        key = getattr(self.api.require(request, "admin"), "name", None) or "admin"

        data = await self.body(request)
        errors = [FieldError(k, "unknown field") for k in data if k not in REATTRIBUTE_FIELDS]
        offer_id = data.get("offer_id")
        if not isinstance(offer_id, str) or not offer_id:
            errors.append(FieldError("offer_id", "required"))
        times: dict[str, datetime | None] = {"since": None, "until": None}
        for name in times:
            if data.get(name):
                try:
                    times[name] = dlq_ops.parse_time(str(data[name]), self.now())
                except ValueError as exc:
                    errors.append(FieldError(name, str(exc)))
        dry_run = data.get("dry_run", False)
        if not isinstance(dry_run, bool):
            errors.append(FieldError("dry_run", "must be true or false"))
        who = _who(data, errors, key)
        if errors:
            return _invalid("invalid re-attribution request; nothing changed", errors)
        enqueue = None if dry_run else self.enqueue()
        try:
            run_id, plan, taken = await run_in_threadpool(
                lambda: reattribute.start(self.api.store, str(offer_id), since=times["since"],
                                          until=times["until"], who=who, now=self.now(),
                                          enqueue=enqueue, dry_run=dry_run))
        except reattribute.UnknownOffer:
            return _invalid("invalid re-attribution request; nothing changed",
                            [FieldError("offer_id", f"no offer {offer_id!r}")])
        return _json({
            "run_id": run_id, "dry_run": dry_run, "offer_id": offer_id,
            "lifespan_days": plan.lifespan_days, "eligible": plan.eligible,
            "handed_back": taken, "still_expired": plan.still_expired,
            "unknown_click": plan.unknown_click,
        }, 200 if dry_run else 202)

    # -- partners -------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        self.api.require(request, "admin")

        def work() -> Any:
            try:
                client = self.redis()
                client.ping()
            except Exception:  # noqa: BLE001 - show the rest without circuit states
                client = None
            return health(self.api.store, self.api.settings, client, self.now())

        return _json({"partners": await run_in_threadpool(work)})

    async def pause(self, request: Request) -> Response:
        self.api.require(request, "admin")

        data = await self.body(request)
        errors = [FieldError(k, "unknown field") for k in data if k not in PAUSE_FIELDS]
        reason = data.get("reason")
        if reason is not None and not isinstance(reason, str):
            errors.append(FieldError("reason", "must be a string"))
        if errors:
            return _invalid("invalid pause request", errors)
        pid = request.path_params["partner_id"]
        await run_in_threadpool(pause, self.api.store, pid, reason, self.now())
        return _json({"partner_id": pid, "paused": True, "reason": reason})

    async def resume(self, request: Request) -> Response:
        self.api.require(request, "admin")

        pid = request.path_params["partner_id"]
        woke = await run_in_threadpool(resume, self.api.store, self.api.settings,
                                       self.redis(), pid, self.now())
        return _json({"partner_id": pid, "paused": False, "released": woke})

    async def limits(self, request: Request) -> Response:
        self.api.require(request, "admin")

        data = await self.body(request)
        errors = [FieldError(k, "unknown field") for k in data if k not in LIMITS_FIELDS]
        rate, cap = data.get("rate_limit"), data.get("max_concurrency")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                                 or not 0 <= rate <= 10000):
            errors.append(FieldError("rate_limit", "must be a number of requests per second "
                                                   "between 0 and 10000 (0 or null: none)"))
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)
                                or not 0 <= cap <= 10000):
            errors.append(FieldError("max_concurrency", "must be a whole number between 0 and "
                                                        "10000 (0 or null: none)"))
        if errors:
            return _invalid("invalid limits", errors)
        pid = request.path_params["partner_id"]
        await run_in_threadpool(lambda: set_limits(self.api.store, pid, rate_limit=rate,
                                                   max_concurrency=cap, now=self.now()))
        return _json({"partner_id": pid, "rate_limit": rate or None,
                      "max_concurrency": cap or None})

    async def bundle(self, request: Request) -> Response:
        self.api.require(request, "admin")

        pid = request.path_params["partner_id"]
        now = self.now()
        q = request.query_params
        errors: list[FieldError] = []
        bounds: dict[str, datetime] = {}
        for name, spec in BUNDLE_QUERY.items():
            value = q.get(name) or spec.get("default")
            try:
                bounds[name] = dlq_ops.parse_time(value, now) if value else now
            except ValueError as exc:
                errors.append(FieldError(name, str(exc)))
        if not errors and bounds["since"] > bounds["until"]:
            errors.append(FieldError("until", "must be after since"))
        if errors:
            return _invalid("invalid support-bundle query", errors)
        files = await run_in_threadpool(bundle.collect, self.api.store, self.api.settings,
                                        pid, bounds["since"], bounds["until"], now)
        name = f"support-bundle-{pid}-{now:%Y%m%dT%H%M%SZ}"
        return Response(bundle.targz(name, files), media_type="application/gzip", headers={
            "Content-Disposition": f'attachment; filename="{name}.tar.gz"'})


def _who(data: dict[str, Any], errors: list[FieldError], key: str) -> str:
    """Who triggered it: the name given, and always the API key used."""
    who = data.get("triggered_by")
    if who is None:
        return f"API key {key}"
    if not isinstance(who, str) or not who.strip() or len(who) > 150:
        errors.append(FieldError("triggered_by", "must be a name of 1 to 150 characters"))
        return f"API key {key}"
    return f"{who.strip()} (API key {key})"


def _replay_message(run: Any, rate: float) -> str:
    if run.selected == 0:
        return "nothing to replay"
    note = (f"; {run.rerendered} URL(s) rendered again with the partner's current template"
            if run.rerendered else "")
    if run.dry_run:
        return f"would replay {run.selected} dead letter(s) at {rate:g}/s{note}"
    return f"{run.queued} dead letter(s) queued on the 'replay' queue at {rate:g}/s{note}"


def _json(data: Any, status: int = 200) -> Response:

    return json_response(data, status)


def _error(status: int, message: str) -> Response:

    return error_response(status, message)


def _invalid(message: str, errors: list[FieldError]) -> Response:

    return error_response(422, message, errors)


def routes(api: Api) -> list[BaseRoute]:
    h = _OnCall(api)
    return [
        Route("/v1/dead-letters", h.list, methods=["GET"]),
        Route("/v1/dead-letters/stats", h.stats, methods=["GET"]),
        Route("/v1/dead-letters/replay", h.replay, methods=["POST"]),
        Route("/v1/dead-letters/purge", h.purge, methods=["POST"]),
        Route("/v1/dead-letters/{postback_id}", h.show, methods=["GET"]),
        Route("/v1/replay-runs/{run_id}", h.run, methods=["GET"]),
        Route("/v1/reattribute", h.reattribute, methods=["POST"]),
        Route("/v1/partners/health", h.health, methods=["GET"]),
        Route("/v1/partners/{partner_id}/pause", h.pause, methods=["POST"]),
        Route("/v1/partners/{partner_id}/resume", h.resume, methods=["POST"]),
        Route("/v1/partners/{partner_id}/limits", h.limits, methods=["POST"]),
        Route("/v1/partners/{partner_id}/support-bundle", h.bundle, methods=["GET"]),
    ]
