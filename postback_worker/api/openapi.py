"""The API's OpenAPI 3 document, served at /openapi.json (and fuzzed by the test suite).

Every route but the pages for people (/, /docs, /dashboard, a partner's page) is here; a test
compares this document with the app's routes both ways.
"""

from __future__ import annotations

from typing import Any

from postback_worker.api import oncall, visibility
from postback_worker.domain.deadletters import FILTER_SCHEMA
from postback_worker.domain.events import click_spec, conversion_spec, object_schema
from postback_worker.domain.lifecycle import Trigger
from postback_worker.ops.config import OFFER_SCHEMA, PARTNER_SCHEMA
from postback_worker.ops.conversions import UPDATE_SCHEMA
from postback_worker.settings import IngestSettings

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
_TEXT = {"type": "string", "maxLength": 255}
_MONEY = {"type": "string", "pattern": r"^[0-9]{1,12}(\.[0-9]{1,6})?$"}
_EVENT = {"type": "string", "enum": [t.value for t in Trigger],
          "description": "the conversion event whose template to use (default: approved)"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: str, *codes: str, ok_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": "success", **_json(ok_schema or {})}}
    texts = {"400": "malformed request", "401": "no or bad credential",
             "403": "credential lacks the scope", "404": "not found",
             "409": "conflicts with the current state (e.g. no signing key is set)",
             "413": "too large",
             "422": "invalid fields (each named)", "503": "a backing service is unavailable"}
    for code in codes:
        out[code] = {"description": texts[code], **_json(_ERROR)}
    return out


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _queries(specs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Optional query parameters from a handler's table (name -> JSON Schema)."""
    return [_query(name, schema) for name, schema in specs.items()]


def _body(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    """A JSON object request body with exactly these fields (the handlers reject others)."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": properties}
    if required:
        schema["required"] = list(required)
    return {"required": bool(required), **_json(schema)}


def _content(*media_types: str) -> dict[str, Any]:
    return {"content": {m: {"schema": {}} for m in media_types}}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


_AUTH = ("401", "403")


def _one_or_many(item: dict[str, Any], max_items: int) -> dict[str, Any]:
    return {"oneOf": [item, {"type": "array", "items": item, "minItems": 1,
                             "maxItems": max_items}]}


def document(ingest: IngestSettings | None = None) -> dict[str, Any]:
    """The OpenAPI document of every API endpoint (not the pages for people).

    Request bodies and query parameters come from the same field specs and tables the
    handlers use (domain/events.py, ops/config.py, api/oncall.py, api/visibility.py), so the
    document cannot drift from the code.
    """
    ingest = ingest or IngestSettings()
    admin: list[dict[str, list[str]]] = [{"bearer": []}]
    n, batch = ingest.max_field_length, ingest.max_batch_size
    click = object_schema(click_spec(n))
    conversion = object_schema(conversion_spec(n))
    query = conversion["properties"]
    paths: dict[str, Any] = {
        "/health": {"get": {"security": [], "responses": _responses("200")}},
        "/healthz": {"get": {"security": [], "responses": _responses("200")}},
        "/click": {"get": {
            "security": [], "summary": "tracking link: store a click, redirect to the offer",
            "parameters": [_query(name, {"type": "string"}, name in click["required"])
                           for name in click["properties"]],
            "responses": {**_responses("200", "404", "422", "503"),
                          "302": {"description": "redirect to the landing URL"}}}},
        "/postback": {"get": {
            "summary": "TUNE-style advertiser conversion URL",
            "security": [{"bearer": []}, {"securityToken": []}],
            "parameters": [_query(name, {"type": "string", "description":
                                         query[name].get("description", "")},
                                  name in conversion["required"])
                           for name in query if name != "id"]
                          + [_query("security_token", {"type": "string"})],
            "responses": _responses("200", *_AUTH, "422", "503")}},
        "/v1/clicks": {"post": {
            "security": [{"bearer": []}], "requestBody": {"required": True, **_json(
                _one_or_many(click, batch))},
            "responses": _responses("201", "400", *_AUTH, "413", "422", "503")}},
        "/v1/conversions": {"post": {
            "security": [{"bearer": []}], "requestBody": {"required": True, **_json(
                _one_or_many(conversion, batch))},
            "responses": _responses("202", "400", *_AUTH, "413", "422", "503")}},
        "/v1/conversions/{conversion_id}": {"get": {
            "security": admin, "parameters": [_path("conversion_id")],
            "responses": _responses("200", *_AUTH, "404")}},
        "/v1/conversions/{conversion_id}/events": {"post": {
            "security": [{"bearer": []}], "parameters": [_path("conversion_id")],
            "summary": "update a conversion: a new status and/or amounts",
            "requestBody": {"required": True, **_json(UPDATE_SCHEMA)},
            "responses": _responses("202", "400", *_AUTH, "404", "413", "422", "503")}},
        "/v1/offers": {
            "get": {"security": admin, "responses": _responses("200", *_AUTH)},
            "post": {"security": admin, "requestBody": {"required": True, **_json(OFFER_SCHEMA)},
                     "responses": _responses("201", "400", *_AUTH, "413", "422")}},
        "/v1/partners": {
            "get": {"security": admin, "responses": _responses("200", *_AUTH)},
            "post": {"security": admin, "requestBody": {"required": True, **_json(PARTNER_SCHEMA)},
                     "responses": _responses("201", "400", *_AUTH, "413", "422")}},
        "/v1/templates/validate": {"post": {
            "security": admin, "requestBody": {"required": True, **_json({
                "type": "object", "required": ["url"], "additionalProperties": False,
                "properties": {"url": {"type": "string", "minLength": 1, "maxLength": 4000},
                               "dns": {"type": "boolean"},
                               "body_format": {"type": "string", "enum": ["form", "json"]},
                               "body_template": {"type": "string", "maxLength": 4000}}})},
            "responses": _responses("200", "400", *_AUTH, "413", "422")}},
        "/v1/partners/{partner_id}/validate": {"get": {
            "security": admin, "parameters": [_path("partner_id"),
                                              _query("dns", {"type": "boolean"}),
                                              _query("event", _EVENT)],
            "responses": _responses("200", *_AUTH, "404", "422")}},
        "/v1/partners/{partner_id}/test": {"post": {
            "security": admin, "parameters": [_path("partner_id")],
            "requestBody": {"required": False, **_json({
                "type": "object", "additionalProperties": False, "properties": {
                    "transaction_id": _TEXT, "payout": _MONEY, "fire": {"type": "boolean"},
                    "event": _EVENT}})},
            "responses": _responses("200", "400", *_AUTH, "404", "413", "422")}},
        "/v1/partners/{partner_id}/signing": {"post": {
            "security": admin, "parameters": [_path("partner_id")],
            "requestBody": {"required": True, **_json({
                "type": "object", "required": ["action"], "additionalProperties": False,
                "properties": {
                    "action": {"type": "string", "enum": ["enable", "rotate", "disable"]},
                    "header": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,100}$"},
                    "scheme": {"type": "string", "enum": ["hmac", "standard"]}}})},
            "responses": _responses("200", "400", *_AUTH, "404", "413", "422")}},
        "/v1/partners/{partner_id}/page-link": {"post": {
            "security": admin, "parameters": [
                _path("partner_id"),
                _query("days", {"type": "number", "exclusiveMinimum": True, "minimum": 0,
                                "maximum": 90})],
            "responses": _responses("200", *_AUTH, "404", "409", "422")}},
        "/v1/offers/{offer_id}/security-token": {"post": {
            "security": admin, "parameters": [_path("offer_id")],
            "responses": _responses("200", *_AUTH, "404")}},
        "/v1/audit": {"get": {"security": admin, "responses": _responses("200", *_AUTH)}},
        "/v1/keys": {
            "get": {"security": admin, "responses": _responses("200", *_AUTH)},
            "post": {"security": admin, "requestBody": {"required": True, **_json({
                "type": "object", "required": ["name", "scopes"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 200},
                    "scopes": {"type": "array", "minItems": 1,
                               "items": {"type": "string", "enum": ["ingest", "admin"]}}}})},
                "responses": _responses("201", "400", *_AUTH, "413", "422")}},
        "/v1/keys/{key_id}": {"delete": {
            "security": admin, "parameters": [_path("key_id")],
            "responses": _responses("200", *_AUTH, "404")}},
        "/openapi.json": {"get": {"security": [], "summary": "this document",
                                  "responses": _responses("200")}},
        **_oncall_paths(admin),
        **_visibility_paths(admin),
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "postback-worker", "version": "1"},
        "security": admin,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "metricsToken": {"type": "http", "scheme": "bearer",
                                 "description": "POSTBACK_METRICS_TOKEN (GET /metrics only)"},
                "dashboardSession": {"type": "apiKey", "in": "cookie",
                                     "name": visibility.da.COOKIE,
                                     "description": "the session a dashboard sign-in link "
                                                    "sets (read-only reports and alerts)"},
                "securityToken": {"type": "apiKey", "in": "query", "name": "security_token"},
            },
            "schemas": {"Error": {
                "type": "object", "required": ["error"],
                "properties": {"error": {"type": "string"}, "errors": {
                    "type": "array", "items": {
                        "type": "object", "required": ["field", "message"],
                        "properties": {"field": {"type": "string"},
                                       "message": {"type": "string"}}}}}}},
        },
    }


def _oncall_paths(admin: list[dict[str, list[str]]]) -> dict[str, Any]:
    """Dead letters, replay, re-attribution, partner health (api/oncall.py's tables)."""
    filters = _queries(FILTER_SCHEMA)
    body = ("400", *_AUTH, "413", "422")
    dry = {"200": {"description": "dry run: what would happen", **_json({})}}
    return {
        "/v1/dead-letters": {"get": {
            "security": admin, "summary": "dead letters, newest first (URLs masked)",
            "parameters": filters + _queries(oncall.LIST_QUERY),
            "responses": _responses("200", *_AUTH, "422")}},
        "/v1/dead-letters/stats": {"get": {
            "security": admin, "summary": "dead letters by failure class, partner, last status",
            "parameters": filters, "responses": _responses("200", *_AUTH, "422")}},
        "/v1/dead-letters/replay": {"post": {
            "security": admin,
            "summary": "replay matching dead letters on the 'replay' queue at a bounded rate",
            "requestBody": _body({**FILTER_SCHEMA, **oncall.REPLAY_FIELDS}),
            "responses": {**_responses("202", *body), **dry}}},
        "/v1/dead-letters/purge": {"post": {
            "security": admin, "summary": "delete matching dead letters for good",
            "requestBody": _body({**FILTER_SCHEMA, **oncall.PURGE_FIELDS}, "confirm"),
            "responses": _responses("200", *body)}},
        "/v1/dead-letters/{postback_id}": {"get": {
            "security": admin,
            "summary": "a postback, its dead letter and every attempt (secrets masked)",
            "parameters": [_path("postback_id")],
            "responses": _responses("200", *_AUTH, "404")}},
        "/v1/replay-runs/{run_id}": {"get": {
            "security": admin, "summary": "a replay or re-attribution run and its tally",
            "parameters": [_path("run_id")], "responses": _responses("200", *_AUTH, "404")}},
        "/v1/reattribute": {"post": {
            "security": admin,
            "summary": "attribute an offer's expired_click conversions again",
            "requestBody": _body(oncall.REATTRIBUTE_FIELDS, "offer_id"),
            "responses": {**_responses("202", *body), **dry}}},
        "/v1/partners/health": {"get": {
            "security": admin, "summary": "every partner: pause, circuit, limits, recent figures",
            "responses": _responses("200", *_AUTH)}},
        "/v1/partners/{partner_id}/pause": {"post": {
            "security": admin, "summary": "pause a partner's deliveries",
            "parameters": [_path("partner_id")], "requestBody": _body(oncall.PAUSE_FIELDS),
            "responses": _responses("200", "400", *_AUTH, "404", "413", "422")}},
        "/v1/partners/{partner_id}/resume": {"post": {
            "security": admin, "summary": "resume a partner and release what waited",
            "parameters": [_path("partner_id")],
            "responses": _responses("200", *_AUTH, "404")}},
        "/v1/partners/{partner_id}/limits": {"post": {
            "security": admin, "summary": "set a partner's rate and concurrency limits",
            "parameters": [_path("partner_id")], "requestBody": _body(oncall.LIMITS_FIELDS),
            "responses": _responses("200", "400", *_AUTH, "404", "413", "422")}},
        "/v1/partners/{partner_id}/support-bundle": {"get": {
            "security": admin, "summary": "a .tar.gz to hand to the partner (secrets redacted)",
            "parameters": [_path("partner_id"), *_queries(oncall.BUNDLE_QUERY)],
            "responses": {**_responses("200", *_AUTH, "404", "422"),
                          "200": {"description": "success", **_content("application/gzip")}}}},
    }


def _visibility_paths(admin: list[dict[str, list[str]]]) -> dict[str, Any]:
    """Metrics, reports, alerts, operator events (api/visibility.py's tables)."""
    viewer = [*admin, {"dashboardSession": []}]
    return {
        "/metrics": {"get": {
            "security": [*admin, {"metricsToken": []}], "summary": "Prometheus metrics",
            "responses": {**_responses("200", *_AUTH),
                          "200": {"description": "success", **_content("text/plain")}}}},
        "/v1/reports/delivery": {"get": {
            "security": viewer, "summary": "delivery figures by partner, offer and class",
            "parameters": _queries(visibility.DELIVERY_QUERY),
            "responses": {**_responses("200", *_AUTH, "422"), "200": {
                "description": "success", **_content("application/json", "text/csv")}}}},
        "/v1/reports/failed": {"get": {
            "security": viewer, "summary": "failed postbacks (dead letters and retrying)",
            "parameters": _queries(visibility.FAILED_QUERY),
            "responses": {**_responses("200", *_AUTH, "422"), "200": {
                "description": "success",
                **_content("application/json", "text/csv", "text/html")}}}},
        "/v1/alerts": {"get": {
            "security": viewer, "summary": "alert history, newest first",
            "parameters": _queries(visibility.ALERTS_QUERY),
            "responses": _responses("200", *_AUTH, "422")}},
        "/v1/operator-events": {"get": {
            "security": viewer, "summary": "operator events and their webhook deliveries",
            "parameters": _queries(visibility.EVENTS_QUERY),
            "responses": _responses("200", *_AUTH, "422")}},
        "/v1/dashboard/link": {"post": {
            "security": admin, "summary": "a dashboard sign-in link (valid 10 minutes)",
            "parameters": _queries(visibility.LINK_QUERY),
            "responses": _responses("200", *_AUTH, "409")}},
    }
