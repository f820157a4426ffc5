"""OpenAI-style error bodies and the exception handlers that produce them.

Every error leaves the service as ``{"error": {"message", "type", "param", "code"}}`` so the
OpenAI SDKs raise their usual exception classes (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import InvalidRequestError, QueueFullError, WhisperServeError
from app.metrics import ERRORS

log = logging.getLogger(__name__)

#: Not a real HTTP status: nginx's "client closed request". Only metrics and logs see it.
CLIENT_CLOSED_REQUEST = 499


class AuthenticationError(WhisperServeError):
    # OpenAI answers a bad key with type invalid_request_error and code invalid_api_key.
    error_type = "invalid_request_error"
    status_code = 401
    code = "invalid_api_key"


class UploadTooLargeError(InvalidRequestError):
    status_code = 413
    code = "upload_too_large"


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status_code: int,
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # The code is finer than the OpenAI type (invalid_audio vs invalid_value), so count by it.
    ERRORS.labels(type=code or error_type).inc()
    return JSONResponse(
        error_body(message, error_type, param=param, code=code),
        status_code=status_code,
        headers=headers,
    )


def domain_error_response(exc: WhisperServeError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    if exc.status_code >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return error_response(
        exc.status_code,
        exc.message,
        exc.error_type,
        param=exc.param,
        code=exc.code,
        headers=headers or None,
    )


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WhisperServeError)
    return domain_error_response(exc)


def _param_from_loc(loc: tuple | list) -> str | None:
    # FastAPI locations look like ("body", "file") or ("path", "model_id"); OpenAI wants "file".
    names = [str(part) for part in loc if part not in ("body", "query", "path", "header", "form")]
    return ".".join(names) or None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _param_from_loc(first.get("loc", ()))
    message = first.get("msg", "Invalid request")
    if param:
        message = f"{message} ({param})"
    # OpenAI answers bad parameters with 400, not FastAPI's 422.
    return error_response(400, message, "invalid_request_error", param=param, code="invalid_value")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"Unknown path {request.method} {request.url.path}"
    return error_response(
        exc.status_code,
        message,
        error_type,
        code=_HTTP_CODES.get(exc.status_code),
        headers=getattr(exc, "headers", None),
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette runs this from its outermost middleware and then re-raises, so the traceback is
    # still logged by the server; the client only sees a generic message.
    log.exception("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "The server had an error while processing your request.", "server_error"
    )


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(WhisperServeError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
