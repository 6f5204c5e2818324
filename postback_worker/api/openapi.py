"""The API's OpenAPI 3 document, served at /openapi.json (and fuzzed by the test suite)."""

from __future__ import annotations

from typing import Any

from postback_worker.domain.events import click_spec, conversion_spec, object_schema
from postback_worker.ops.config import OFFER_SCHEMA, PARTNER_SCHEMA
from postback_worker.settings import IngestSettings

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
_TEXT = {"type": "string", "maxLength": 255}
_MONEY = {"type": "string", "pattern": r"^[0-9]{1,12}(\.[0-9]{1,6})?$"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: str, *codes: str, ok_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": "success", **_json(ok_schema or {})}}
    texts = {"400": "malformed request", "401": "no or bad credential",
             "403": "credential lacks the scope", "404": "not found", "413": "too large",
             "422": "invalid fields (each named)", "503": "a backing service is unavailable"}
    for code in codes:
        out[code] = {"description": texts[code], **_json(_ERROR)}
    return out


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


_AUTH = ("401", "403")


def _one_or_many(item: dict[str, Any], max_items: int) -> dict[str, Any]:
    return {"oneOf": [item, {"type": "array", "items": item, "minItems": 1,
                             "maxItems": max_items}]}


def document(ingest: IngestSettings | None = None) -> dict[str, Any]:
    """The OpenAPI document of the endpoints in api/core.py and api/security.py.

    Request bodies come from the same field specs the validators use (domain/events.py,
    ops/config.py), so the document cannot drift from the code.
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
                                              _query("dns", {"type": "boolean"})],
            "responses": _responses("200", *_AUTH, "404", "422")}},
        "/v1/partners/{partner_id}/test": {"post": {
            "security": admin, "parameters": [_path("partner_id")],
            "requestBody": {"required": False, **_json({
                "type": "object", "additionalProperties": False, "properties": {
                    "transaction_id": _TEXT, "payout": _MONEY, "fire": {"type": "boolean"}}})},
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
            "responses": _responses("200", *_AUTH, "404", "422")}},
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
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "postback-worker", "version": "1"},
        "security": admin,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
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
