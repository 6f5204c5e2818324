"""The API's composition root: builds the Starlette app from settings and every route module."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.routing import Route

from postback_worker.api import oncall, pages, security, visibility
from postback_worker.api.core import Api
from postback_worker.api.http import db_error, project_error
from postback_worker.errors import PostbackWorkerError
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.repo import Store


def create_app(settings: Settings | None = None, *, store: Store | None = None,
               producer: Producer | None = None) -> Starlette:
    """The ASGI app; `uvicorn postback_worker.api.app:app` serves it from the environment."""
    settings = settings or Settings.from_env()
    store = store or Store.from_url(settings.database.url)
    producer = producer or Producer(settings, store=store)
    api = Api(settings, store, producer)
    routes = [
        Route("/health", api.health),
        Route("/healthz", api.health),
        Route("/openapi.json", api.openapi),
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
    app = Starlette(routes=routes, exception_handlers={
        PostbackWorkerError: project_error, OperationalError: db_error,
    })
    app.state.api = api
    return app


def app_from_env() -> Starlette:
    return create_app()
