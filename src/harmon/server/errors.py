"""Errors answered as OpenAI-style JSON: ``{"error": {"message", "type", "param", "code"}}``.

:func:`add_error_handlers` gives an app the one mapping: :class:`ApiError` as it is, the library's
:class:`~harmon.errors.InputError` (a value the client can fix) as a 400, routing errors (404, 405) in the
same shape, and anything else as a 500 whose traceback goes to the log.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from ..errors import InputError

log = logging.getLogger("harmon.server")


class ApiError(Exception):
    """An HTTP error with a clear message; ``type`` follows OpenAI's (``invalid_request_error``, ...)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str = "invalid_value") -> "ApiError":
        """A 400 for a request value the client can change (``param`` names it)."""
        return cls(400, message, param=param, code=code)

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"event: error\ndata: {json.dumps(self.body())}\n\n".encode()

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def queue_full() -> ApiError:
    """The 429 answered at once when the model's queue holds as many jobs as it may."""
    return ApiError(429, "the server is busy: its request queue is full, retry later", "rate_limit_error",
                    code="queue_full", headers={"Retry-After": "1"})


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """A pydantic validation error list -> one 400 naming the first bad field."""
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return ApiError.invalid(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}",
                                code="invalid_json")
    return ApiError.invalid(f"{loc}: {message}" if loc else message, param=loc or None)


def from_input_error(err: InputError) -> ApiError:
    """The library's refusal of a value (its message names the value) as a 400."""
    return ApiError.invalid(str(err))


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the OpenAI-style JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> Response:
        return err.response()

    @app.exception_handler(InputError)
    async def _input_error(request: Request, err: InputError) -> Response:
        return from_input_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ApiError(err.status_code, str(err.detail), kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(err).__name__}", "server_error").response()
