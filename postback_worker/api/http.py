"""HTTP helpers shared by every route module: JSON responses, errors, bearer credentials."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

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


NUL = "must not contain NUL characters"


class RejectNul:
    """A path or query parameter with a NUL character answers 404 or 422 here, naming it.

    PostgreSQL text cannot hold NUL, so such a value can match nothing and would otherwise
    fail in the database driver (a 500). Checked once for every route; costs one substring
    search per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _nul_problem(scope["path"], scope.get("query_string", b""))
            if problem is not None:
                await problem(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _nul_problem(path: str, query: bytes) -> Response | None:
    if "\x00" in path:
        return error_response(404, "not found: the path contains a NUL character",
                              [FieldError("path", NUL)])
    if b"%00" not in query:
        return None
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="utf-8",
                      errors="replace")
    names = dict.fromkeys(k for k, v in pairs if "\x00" in k or "\x00" in v)
    if not names:
        return None
    return error_response(422, "invalid query parameters",
                          [FieldError(k.replace("\x00", "\\x00"), NUL) for k in names])


async def db_error(request: Request, exc: Exception) -> Response:
    log.error("database error: %s", exc)
    return unavailable("the database")
