"""What the handlers take from the app (FastAPI dependencies): its engine, settings and worker, the API
key check, a request body read within the size limit and parsed, and submitting a job to the worker."""
from __future__ import annotations

import secrets
from typing import Annotated, Any, Awaitable, Callable, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from .engine import Engine
from .errors import ApiError, queue_full
from .inputs import ServerSettings, parse_body
from .worker import Batchable, Job, ModelWorker, QueueFullError

B = TypeVar("B", bound=BaseModel)


def get_engine(request: Request) -> Engine:
    """The app's :class:`Engine` (the model and its pipelines)."""
    return request.app.state.engine


def get_settings(request: Request) -> ServerSettings:
    """The app's :class:`ServerSettings` (defaults, limits, API key)."""
    return request.app.state.settings


def get_worker(request: Request) -> ModelWorker:
    """The app's :class:`ModelWorker` (the one thread that runs the model)."""
    return request.app.state.worker


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
WorkerDep = Annotated[ModelWorker, Depends(get_worker)]


def authorize(request: Request, settings: SettingsDep) -> None:
    """Refuse with 401 unless the server has no API key or the request sends ``Authorization: Bearer KEY``."""
    if not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes, more than the {limit} allowed",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is more than the {limit} bytes allowed", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(model: type[B]) -> Callable[..., Awaitable[B]]:
    """A dependency giving the request's JSON body as ``model``: read within the server's body limit (413
    beyond it), a 400 naming the first bad field."""

    async def parsed(request: Request, settings: SettingsDep) -> B:
        return parse_body(model, await read_body(request, settings.max_body_bytes))

    return parsed


def submit(worker: ModelWorker, fn: Callable[[Job], Any], batch: Batchable | None = None) -> Job:
    """Queue ``fn`` on the model worker (drawn with others of ``batch``'s key when given), or answer 429 at
    once when its queue is full."""
    try:
        return worker.submit(fn, batch=batch)
    except QueueFullError:
        raise queue_full() from None
