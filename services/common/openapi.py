"""Each service's OpenAPI document, made to say what the running service accepts.

FastAPI builds the document from the routes and the protocol models. Three
things only the running service knows are set here, when the document is
first asked for (after start-up, so the model's limits are known):
1) Auth: without an API key configured no operation needs one, so the bearer
   scheme and every 401 answer leave the document; with a key, every
   operation but /health lists both.
2) Limits from the settings and the loaded model, as JSON-schema keywords on
   the protocol's fields (a `maximum`, a `maxItems`, the largest token id):
   `limits()` returns {schema name: {field: {keyword: value}}}, merged into
   the field's schema. What a schema cannot say (prompt + max_tokens within
   the model's length, prompts x n within max_rollouts) stays a 413/422.
3) Every 503 answer documents its Retry-After header.
A fuzzer that reads the document (tests/*/test_fuzz.py) then sends what the
service really accepts, and anything else must be a 4xx.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

Limits = dict[str, dict[str, dict[str, Any]]]
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "required": True, "schema": {"type": "integer"}}
}


def publish(app: FastAPI, *, api_key: str | None, limits: Callable[[], Limits | None] | None = None) -> None:
    """Replaces `app.openapi` with a builder that applies the three rules above (and caches the result)."""

    fastapi_document = app.openapi
    done: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        if done:
            return done
        doc = copy.deepcopy(fastapi_document())
        if api_key:
            _document_401(doc)
        else:
            _drop_auth(doc)
        _document_retry_after(doc)
        _document_400(doc)
        known = limits() if limits else {}
        if known is None:  # the model is not loaded yet: serve this one, build again next time
            return doc
        _apply_limits(doc, known)
        done.update(doc)
        return done

    app.openapi = build  # type: ignore[method-assign]


def _operations(doc: dict[str, Any]):
    for item in doc.get("paths", {}).values():
        yield from (op for op in item.values() if isinstance(op, dict))


def _drop_auth(doc: dict[str, Any]) -> None:
    doc.get("components", {}).pop("securitySchemes", None)
    for op in _operations(doc):
        op.pop("security", None)
        op.get("responses", {}).pop("401", None)


def _document_400(doc: dict[str, Any]) -> None:
    """A body that is not JSON at all (bytes that do not decode) is refused with 400 before validation."""
    for op in _operations(doc):
        if "requestBody" in op:
            op.setdefault("responses", {}).setdefault("400", {"description": "the body is not readable JSON"})


def _document_401(doc: dict[str, Any]) -> None:
    answer: dict[str, Any] = {"description": "missing or wrong API key"}
    if "ErrorBody" in doc.get("components", {}).get("schemas", {}):
        answer["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for op in _operations(doc):
        if op.get("security"):
            op.setdefault("responses", {}).setdefault("401", answer)


def _document_retry_after(doc: dict[str, Any]) -> None:
    for op in _operations(doc):
        if "503" in op.get("responses", {}):
            op["responses"]["503"]["headers"] = RETRY_AFTER


def _apply_limits(doc: dict[str, Any], limits: Limits) -> None:
    schemas = doc.get("components", {}).get("schemas", {})
    for name, fields in limits.items():
        for field, keywords in fields.items():
            prop = schemas.get(name, {}).get("properties", {}).get(field)
            if prop is None:
                continue
            # An optional field is anyOf [its type, null]: the keywords go on its type.
            _merge(next((s for s in prop.get("anyOf", []) if s.get("type") != "null"), prop), keywords)


def _merge(schema: dict[str, Any], keywords: dict[str, Any]) -> None:
    for key, value in keywords.items():
        if isinstance(value, dict) and isinstance(schema.get(key), dict):
            _merge(schema[key], value)
        else:
            schema[key] = value
