"""The OpenAPI document: every error response, in OpenAI's error shape, and the bearer key.

FastAPI documents only what a route returns on success, plus a 422 that never occurs here
(app.api.errors answers validation errors with 400). Contract testers (schemathesis) compare
every response with this document, so each status a route can answer is listed with its body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.constants import OPENAI_ALIAS

ERROR_SCHEMA = "ErrorResponse"
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Invalid request: a bad parameter, or audio that cannot be decoded",
    401: "Missing or incorrect API key (when WHISPER_API_KEY is set)",
    404: "Unknown model or path",
    405: "Method not allowed",
    408: "The request headers or body arrived too slowly",
    413: "The upload or its audio is over the limit",
    415: "The file is not audio or video",
    500: "Internal error",
    503: "Busy (queue full, audio memory budget spent, too many connections) or shutting "
    "down; retry after Retry-After seconds",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
}
#: Statuses every route may answer: the connection cap (503) and errors we did not foresee.
_ANY_ROUTE = (500, 503)
#: Statuses of the /v1 routes beyond _ANY_ROUTE.
_ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "/v1/audio/transcriptions": (400, 401, 404, 408, 413, 415),
    "/v1/audio/translations": (400, 401, 404, 408, 413, 415),
    "/v1/models": (401,),
    "/v1/models/{model_id}": (401, 404),
}
#: Success bodies that are not JSON.
_TRANSCRIPT_CONTENT = {
    "application/json": {"schema": {"type": "object"}},
    "text/plain": {"schema": {"type": "string"}},
    "text/vtt": {"schema": {"type": "string"}},
    "text/event-stream": {"schema": {"type": "string"}},
}
_PROBE_503 = {
    "description": "Starting up or draining for shutdown",
    "headers": _RETRY_AFTER,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "string"}},
            }
        }
    },
}


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if status == 503:
        response["headers"] = _RETRY_AFTER
    return response


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas[ERROR_SCHEMA] = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas.update(schemas[ERROR_SCHEMA].pop("$defs", {}))
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}

    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/ready":
                responses["503"] = _PROBE_503
                continue
            for status in (*_ROUTE_ERRORS.get(path, ()), *_ANY_ROUTE):
                responses[str(status)] = _error_response(status)
            if path.startswith("/v1/"):
                operation["security"] = [{"bearer": []}] if app.state.settings.api_key else []
            if path.startswith("/v1/audio/"):
                responses["200"]["content"] = _TRANSCRIPT_CONTENT
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model_id":  # lets testers reach the 200
                    parameter["schema"]["examples"] = [OPENAI_ALIAS]
    return schema


class DocumentedApp(FastAPI):
    """The service's FastAPI app: /openapi.json serves `build_openapi`'s document (built once,
    on first request, when every route is in place)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = build_openapi(self)
        return self.openapi_schema
