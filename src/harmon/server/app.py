"""The HTTP server: the web page and an OpenAI-style JSON API, both served by one model worker.

Routes (``/v1/*`` need ``Authorization: Bearer KEY`` when the server has an API key):

* ``GET /`` the web page; ``GET /health`` liveness and queue state;
* ``GET /v1/models``; ``POST /v1/images/generations``; ``POST /v1/chat/completions``
  (``"stream": true`` answers with server-sent events in both);
* ``POST /v1/images/edits``: inpaint, outpaint or vary an image (JSON, the image as a data: URL).
"""
from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .engine import Engine
from .errors import ApiError, queue_full
from .inputs import (ChatRequest, EditRequest, ImageRequest, ServerSettings, chat_params, edit_params,
                     generation_params, parse_body)
from .page import render_page
from .worker import Job, ModelWorker, QueueFullError

log = logging.getLogger("harmon.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


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


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The server application around a loaded model; its worker thread starts and stops with the app."""
    settings = settings or ServerSettings()
    worker = ModelWorker(settings.queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="harmon", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.worker, app.state.settings = engine, worker, settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> Response:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ApiError(err.status_code, str(err.detail), kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(err).__name__}", "server_error").response()

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def submit(fn: Callable[[Job], Any]) -> Job:
        try:
            return worker.submit(fn)
        except QueueFullError:
            raise queue_full() from None

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(engine.name, settings, engine.stride))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "busy": worker.busy, "queued": worker.waiting,
                "queue_size": worker.queue_size, "completed": worker.completed}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "harmon"}]}

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Response:
        authorize(request)
        req = parse_body(ImageRequest, await read_body(request, settings.max_body_bytes))
        params = generation_params(req, settings, engine.stride)
        job = submit(lambda job: engine.generate(params, job))
        created = int(time.time())
        size = f"{params.width}x{params.height}"

        def item(k: int, out: dict[str, Any]) -> dict[str, Any]:
            return {"b64_json": base64.b64encode(out["png"]).decode(), "seed": out["seed"], "image_index": k,
                    "size": size, "output_format": "png", "metadata": out["metadata"]}

        if not req.stream:
            results = await job.result()
            return JSONResponse({"created": created, "model": engine.name, "output_format": "png", "size": size,
                                 "data": [item(k, out) for k, out in enumerate(results)]})

        async def events() -> AsyncIterator[bytes]:
            yield _sse({"type": "image_generation.queued", "queued": worker.waiting}, "image_generation.queued")
            try:
                async for kind, payload in job.stream():
                    if kind == "progress":
                        yield _sse({"type": "image_generation.progress", **payload}, "image_generation.progress")
                    elif kind == "done":
                        for k, out in enumerate(payload):
                            yield _sse({"type": "image_generation.completed", "created_at": created, **item(k, out)},
                                       "image_generation.completed")
            except ApiError as err:
                yield err.sse()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        authorize(request)
        req = parse_body(EditRequest, await read_body(request, settings.max_body_bytes))
        params = await run_in_threadpool(edit_params, req, settings, engine.stride)
        job = submit(lambda job: engine.edit(params, job))
        created = int(time.time())
        out = await job.result()
        size = f"{out['metadata']['width']}x{out['metadata']['height']}"
        return JSONResponse({"created": created, "model": engine.name, "output_format": "png", "size": size,
                             "data": [{"b64_json": base64.b64encode(out["png"]).decode(), "seed": out["seed"],
                                       "image_index": 0, "size": size, "output_format": "png",
                                       "metadata": out["metadata"]}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request)
        req = parse_body(ChatRequest, await read_body(request, settings.max_body_bytes))
        params = await run_in_threadpool(chat_params, req, settings)
        job = submit(lambda job: engine.chat(params, job))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(out: dict[str, Any]) -> dict[str, int]:
            return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                    "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}

        if not req.stream:
            out = await job.result()
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                                 "choices": [{"index": 0, "finish_reason": out["finish_reason"],
                                              "message": {"role": "assistant", "content": out["text"]}}],
                                 "usage": usage(out)})

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for kind, payload in job.stream():
                    if kind == "text":
                        yield chunk({"content": payload})
                    elif kind == "done":
                        yield chunk({}, payload["finish_reason"], usage=usage(payload))
            except ApiError as err:
                yield f"data: {json.dumps(err.body())}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app
