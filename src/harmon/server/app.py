"""The HTTP server: the web page and an OpenAI-style JSON API, both served by one model worker.

Routes (``/v1/*`` need ``Authorization: Bearer KEY`` when the server has an API key), one router each:

* :mod:`.page`: ``GET /`` the web page (``/static/*`` its script and style), ``GET /page.json`` its
  values, ``GET /health`` liveness and queue state, ``GET /v1/models``;
* :mod:`.images`: ``POST /v1/images/generations`` (``"stream": true`` answers with server-sent events),
  ``POST /v1/images/edits`` (inpaint, outpaint or vary an image; JSON, the image as a data: URL);
* :mod:`.chat`: ``POST /v1/chat/completions`` (``"stream": true`` as well).

Handlers take the engine, settings and worker from ``app.state`` through :mod:`.deps`.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from . import chat, images, page
from .engine import Engine
from .errors import add_error_handlers
from .inputs import ServerSettings
from .worker import ModelWorker


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The server application around a loaded model; its worker thread starts and stops with the app.

    Raises :class:`~harmon.errors.InputError` when ``settings``' default generation settings do not suit
    the model (checked once here rather than in every request), or its queue or batch sizes are out of range.
    """
    settings = settings or ServerSettings()
    settings.generation.resolve(engine.config)
    worker = ModelWorker(settings.queue_size, settings.max_batch, settings.batch_wait)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="harmon", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.worker, app.state.settings = engine, worker, settings
    add_error_handlers(app)
    for router in (page.router, images.router, chat.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
