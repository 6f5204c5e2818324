"""The naive ingestion endpoint for bench/ingest.py: one Celery message per event, stdlib json."""

from __future__ import annotations

import json
import os
import uuid

from celery import Celery
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create() -> Starlette:
    broker = os.environ["REDIS_URL"]
    token = os.environ.get("POSTBACK_ADMIN_TOKEN", "")
    celery = Celery("naive_ingest", broker=broker)

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization", "") == f"Bearer {token}"

    def enqueue(event: dict[str, object]) -> str:
        event.setdefault("id", uuid.uuid4().hex)
        celery.send_task("naive.process_conversion", args=[event], queue="naive_ingest")
        return str(event["id"])

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def conversions(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, 401)
        events = json.loads(await request.body())
        if not isinstance(events, list) or not all(
            isinstance(e, dict) and e.get("transaction_id") for e in events
        ):
            return JSONResponse({"error": "invalid"}, 422)
        ids = [enqueue(e) for e in events]
        return JSONResponse({"accepted": len(ids), "ids": ids}, 202)

    async def postback(request: Request) -> Response:
        event = dict(request.query_params)
        if not event.get("transaction_id"):
            return JSONResponse({"error": "transaction_id missing"}, 422)
        return JSONResponse({"accepted": 1, "ids": [enqueue(event)]})

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/conversions", conversions, methods=["POST"]),
        Route("/postback", postback),
    ])
