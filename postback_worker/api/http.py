"""HTTP helpers shared by every route module: JSON responses, errors, bearer credentials."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from postback_worker.domain.events import FieldError
from postback_worker.errors import PostbackWorkerError, Unavailable

log = logging.getLogger(__name__)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError


JSON_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC | orjson.OPT_NON_STR_KEYS


def json_response(data: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    body = orjson.dumps(data, default=_default, option=JSON_OPTIONS)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, errors: list[FieldError] | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"error": message}
    if errors:
        body["errors"] = [e.to_dict() for e in errors]
    return json_response(body, status, headers)


def unavailable(what: str) -> Response:
    return error_response(503, f"{what} is unavailable; nothing was accepted, retry later",
                          headers={"Retry-After": "5"})


class HttpError(PostbackWorkerError):
    """An HTTP-only error with its own status (413, 400, ...)."""

    def __init__(self, status: int, message: str, errors: list[FieldError] | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message, errors=errors, headers=dict(headers) if headers else None)
        self.http_status = status


def bearer(request: Request) -> str:
    value = request.headers.get("authorization", "")
    scheme, _, credential = value.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


async def project_error(request: Request, exc: Exception) -> Response:
    """Every PostbackWorkerError, by its kind's status (errors.py has the table)."""
    assert isinstance(exc, PostbackWorkerError)
    headers = exc.headers
    if isinstance(exc, Unavailable) and not headers:
        headers = {"Retry-After": "5"}
    return error_response(exc.http_status, exc.message, exc.errors or None, headers)


async def db_error(request: Request, exc: Exception) -> Response:
    log.error("database error: %s", exc)
    return unavailable("the database")
