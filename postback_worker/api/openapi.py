"""The API's OpenAPI 3 document, served at /openapi.json (and fuzzed by the test suite)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
_TEXT = {"type": "string", "maxLength": 255}
_REQUIRED_TEXT = {"type": "string", "minLength": 1, "maxLength": 255}
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
_CLICK = {
    "type": "object", "additionalProperties": False, "required": ["offer_id", "aff_id"],
    "properties": {"offer_id": _ID, "aff_id": _ID, "aff_sub": _TEXT, "aff_sub2": _TEXT,
                   "aff_sub3": _TEXT, "aff_sub4": _TEXT, "aff_sub5": _TEXT, "source": _TEXT,
                   "ip": {"type": "string", "format": "ipv4"}, "device_id": _TEXT},
}
_CONVERSION = {
    "type": "object", "additionalProperties": False, "required": ["transaction_id"],
    "properties": {"transaction_id": _REQUIRED_TEXT, "offer_id": _ID, "payout": _MONEY,
                   "sale_amount": _MONEY, "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                   "status": {"type": "string", "enum": ["approved", "pending", "rejected"]},
                   "goal_id": _ID, "adv_sub": _TEXT},
}
_PARTNER = {
    "type": "object", "required": ["id", "postback_url"], "additionalProperties": False,
    "properties": {"id": _ID, "name": {"type": "string", "maxLength": 200},
                   "postback_url": {"type": "string", "minLength": 1, "maxLength": 4000},
                   "method": {"type": "string", "enum": ["GET", "POST"]},
                   "timeout": {"type": "number", "minimum": 0.1, "maximum": 120},
                   "fire_statuses": {"type": "string", "maxLength": 200},
                   "scope": {"type": "string", "enum": ["own", "global"]},
                   "enabled": {"type": "boolean"},
                   "body_format": {"type": "string", "enum": ["form", "json"]},
                   "body_template": {"type": "string", "minLength": 1, "maxLength": 20000},
                   "headers": {"type": "object", "maxProperties": 20,
                               "additionalProperties": {"type": "string", "maxLength": 4000}},
                   "egress_proxy": {"type": "string", "maxLength": 500}},
}
_OFFER = {
    "type": "object", "required": ["id"], "additionalProperties": False,
    "properties": {"id": _ID, "name": {"type": "string", "maxLength": 200},
                   "campaign_type": {"type": "string",
                                     "enum": ["lead_gen", "ecommerce", "b2b_saas", "financial"]},
                   "lifespan_days": {"type": "integer", "minimum": 1, "maximum": 3650},
                   "landing_url": {"type": "string", "maxLength": 2000},
                   "allow_multiple": {"type": "boolean"},
                   "allowed_ips": {"type": "string", "maxLength": 2000},
                   "min_click_seconds": {"type": "integer", "minimum": 0},
                   "max_click_seconds": {"type": "integer", "minimum": 0},
                   "daily_cap": {"type": "integer", "minimum": 1},
                   "affiliate_daily_cap": {"type": "integer", "minimum": 1},
                   "daily_payout_cap": {"type": "number", "minimum": 0.01},
                   "affiliate_daily_payout_cap": {"type": "number", "minimum": 0.01}},
}


def document() -> dict[str, Any]:
    """The OpenAPI document of the endpoints in ingest/api.py and ingest/security.py."""
    admin: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {
        "/health": {"get": {"security": [], "responses": _responses("200")}},
        "/healthz": {"get": {"security": [], "responses": _responses("200")}},
        "/click": {"get": {
            "security": [], "summary": "tracking link: store a click, redirect to the offer",
            "parameters": [_query("offer_id", _ID, True), _query("aff_id", _ID, True),
                           _query("aff_sub", _TEXT), _query("source", _TEXT)],
            "responses": {**_responses("200", "404", "422", "503"),
                          "302": {"description": "redirect to the landing URL"}}}},
        "/postback": {"get": {
            "summary": "TUNE-style advertiser conversion URL",
            "security": [{"bearer": []}, {"securityToken": []}],
            "parameters": [_query("transaction_id", _REQUIRED_TEXT, True), _query("offer_id", _ID),
                           _query("payout", _MONEY), _query("sale_amount", _MONEY),
                           _query("goal_id", _ID), _query("adv_sub", _TEXT),
                           _query("status", {"type": "string",
                                             "enum": ["approved", "pending", "rejected"]})],
            "responses": _responses("200", *_AUTH, "422", "503")}},
        "/v1/clicks": {"post": {
            "security": [{"bearer": []}], "requestBody": {"required": True, **_json(
                {"oneOf": [_CLICK, {"type": "array", "items": _CLICK, "minItems": 1,
                                    "maxItems": 100}]})},
            "responses": _responses("201", "400", *_AUTH, "413", "422", "503")}},
        "/v1/conversions": {"post": {
            "security": [{"bearer": []}], "requestBody": {"required": True, **_json(
                {"oneOf": [_CONVERSION,
                           {"type": "array", "items": _CONVERSION, "minItems": 1,
                            "maxItems": 100}]})},
            "responses": _responses("202", "400", *_AUTH, "413", "422", "503")}},
        "/v1/conversions/{conversion_id}": {"get": {
            "security": admin, "parameters": [_path("conversion_id")],
            "responses": _responses("200", *_AUTH, "404")}},
        "/v1/offers": {
            "get": {"security": admin, "responses": _responses("200", *_AUTH)},
            "post": {"security": admin, "requestBody": {"required": True, **_json(_OFFER)},
                     "responses": _responses("201", "400", *_AUTH, "413", "422")}},
        "/v1/partners": {
            "get": {"security": admin, "responses": _responses("200", *_AUTH)},
            "post": {"security": admin, "requestBody": {"required": True, **_json(_PARTNER)},
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
