"""The error body on the wire: `{"error_code": ..., "detail": ...}` for every error answer."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from core.errors import ErrorCode, ServiceError

# Every database connection is in use (a burst): a retryable 503, never a 500.
POOL_EXHAUSTED = ServiceError(
    ErrorCode.STORAGE_UNAVAILABLE,
    "the database has no free connection right now; try again shortly",
    headers={"Retry-After": "5"},
)

__all__ = [
    "POOL_EXHAUSTED",
    "ERROR_RESPONSES",
    "ErrorBody",
    "ErrorCode",
    "ServiceError",
    "install_error_handlers",
    "send_error",
]


class ErrorBody(BaseModel):
    """Every error answer: a stable machine-readable code and a sentence for people."""

    error_code: str
    detail: str
    errors: list[dict[str, Any]] | None = None  # request validation: one entry per problem


_DESCRIPTIONS = {
    401: "missing, malformed, unknown or revoked API key",
    403: "the key lacks a scope, or a tenant limit would be exceeded",
    404: "no such object for this tenant",
    409: "the object is not in a state that allows this",
    413: "request body too large",
    415: "the upload is not an archive this service reads",
    422: "invalid request: the detail names the field and what is accepted",
    429: "too many requests or too many queued jobs; see Retry-After",
    503: "a backing service (broker, storage) is unreachable",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in _DESCRIPTIONS.items()
}


async def send_error(
    send: Send, exc: ServiceError, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """The error body from plain ASGI middleware (auth, body limits), which answers before
    FastAPI's exception handlers are reached."""
    body = json.dumps(exc.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()],
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}")
        body = {
            "error_code": ErrorCode.VALIDATION_ERROR.value,
            "detail": "; ".join(problems) or "invalid request",
            "errors": [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                for e in exc.errors()
            ],
        }
        return JSONResponse(body, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, sqlalchemy.exc.TimeoutError):
            return JSONResponse(
                POOL_EXHAUSTED.body(), status_code=503, headers=POOL_EXHAUSTED.headers
            )
        # Starlette logs the exception with its traceback; the client gets the one body.
        return JSONResponse(
            {
                "error_code": ErrorCode.INTERNAL_ERROR.value,
                "detail": "internal error; it has been logged. Try again, or report it with "
                "the time of the request if it persists",
            },
            status_code=500,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.VALIDATION_ERROR
        if exc.status_code >= 500:
            code = ErrorCode.INTERNAL_ERROR
        return JSONResponse(
            {"error_code": code.value, "detail": str(exc.detail)}, status_code=exc.status_code
        )
