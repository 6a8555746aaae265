"""Errors answered as OpenAI-style JSON: ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse


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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"event: error\ndata: {json.dumps(self.body())}\n\n".encode()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def queue_full() -> ApiError:
    return ApiError(429, "the server is busy: its request queue is full, retry later", "rate_limit_error",
                    code="queue_full", headers={"Retry-After": "1"})


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """A pydantic validation error list -> one 400 naming the first bad field."""
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}",
                        code="invalid_json")
    return ApiError(400, f"{loc}: {message}" if loc else message, param=loc or None, code="invalid_value")
