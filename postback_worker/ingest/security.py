"""HTTP routes for template validation, test-fire, audit, API keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from postback_worker.ingest.api import Api


def routes(api: Api) -> list[BaseRoute]:
    return []
