"""Every failure as `{"error": {"type", "message"}}` with its status code, never a traceback."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import errors as E
from .a1111 import NotSupportedError
from .auth import AuthError

log = logging.getLogger("impasto.serve")

RETRY_AFTER_SECONDS = 1  # a full queue drains at step speed: retry soon

# First match wins: subclasses before their bases.
STATUS = (
    (NotSupportedError, 422, "not_supported"),
    (E.RequestError, 422, "invalid_request_error"),
    (E.AdapterNameError, 422, "adapter_not_found"),
    (E.AdapterError, 422, "adapter_error"),
    (E.EngineBusyError, 429, "rate_limit_exceeded"),
    (E.EngineClosedError, 503, "unavailable"),
    (E.RequestTimeoutError, 504, "timeout"),
    (E.RequestCancelledError, 409, "cancelled"),
    (E.NumericalError, 500, "numerical_error"),
    (E.ImpastoError, 500, "server_error"),
)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body is larger than {limit} bytes")


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def impasto_error(error: BaseException) -> JSONResponse:
    """The response for an engine error: its status and its own message."""
    for cls, status, type_ in STATUS:
        if isinstance(error, cls):
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else None
            return error_response(status, type_, str(error), headers)
    raise TypeError(error)


def auth_error(exc: AuthError) -> JSONResponse:
    """401 (with the Bearer challenge) or 403."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, "authentication_error" if exc.status == 401 else "permission_error",
                          str(exc), headers)


def install(app) -> None:
    """Register the handlers that turn each kind of failure into the error body."""

    @app.exception_handler(E.ImpastoError)
    async def _impasto(request, exc):
        return impasto_error(exc)

    @app.exception_handler(AuthError)
    async def _auth(request, exc):
        return auth_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request_error", "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        kind = {404: "not_found", 405: "method_not_allowed", 409: "conflict", 413: "request_too_large"}
        return error_response(exc.status_code, kind.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, exc):
        return error_response(413, "request_too_large", str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(500, "server_error", f"internal error: {type(exc).__name__}: {exc}")
