"""The API's composition root: builds the Starlette app from settings and every route module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.routing import Route

from postback_worker import tracing
from postback_worker.api import oncall, pages, security, visibility
from postback_worker.api.core import Api
from postback_worker.api.http import RejectNul, db_error, project_error
from postback_worker.errors import PostbackWorkerError
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


def create_app(settings: Settings | None = None, *, store: Store | None = None,
               producer: Producer | None = None) -> Starlette:
    """The ASGI app; `uvicorn postback_worker.api.app:app` serves it from the environment."""
    settings = settings or Settings.from_env()
    traced = tracing.configure("postback-worker-api")  # before the producer names the service
    store = store or Store.from_url(settings.database.url)
    own_producer = producer is None
    producer = producer or Producer(settings, store=store)
    api = Api(settings, store, producer)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:  # close what this app opened (the producer sends its last wake-up)
            if api.journal is not None:
                api.journal.close()
            if own_producer:
                await asyncio.to_thread(producer.close)

    routes = [
        Route("/health", api.health),
        Route("/healthz", api.health),
        Route("/click", api.click),
        Route("/postback", api.postback),
        Route("/v1/clicks", api.create_clicks, methods=["POST"]),
        Route("/v1/conversions", api.conversions, methods=["POST"]),
        Route("/v1/conversions/{conversion_id}", api.conversion),
        Route("/v1/conversions/{conversion_id}/events", api.update_conversion,
              methods=["POST"]),
        Route("/v1/offers", api.offers, methods=["GET", "POST"]),
        Route("/v1/partners", api.partners, methods=["GET", "POST"]),
    ]
    for module in (pages, oncall, visibility, security):
        routes.extend(module.routes(api))
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        PostbackWorkerError: project_error, OperationalError: db_error,
    })
    app.state.api = api
    app.add_middleware(RejectNul)
    if traced:
        # A server span per request (continuing the caller's traceparent header).
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        app.add_middleware(OpenTelemetryMiddleware, exclude_spans=["receive", "send"])
    return app


def app_from_env() -> Starlette:
    return create_app()
