"""The page and the server's own routes: ``GET /`` (the web page, a static file shipped with the package),
``GET /page.json`` (what the page fills in: the model, the server's defaults and limits), ``GET /health``
and ``GET /v1/models``.

The page (``static/index.html``, ``page.js``, ``page.css``, under ``/static``) has three tabs: text to
image (prompt, seed, guidance, steps, size, a live progress bar, the image with a download of the PNG and
its metadata), image editing (upload an image, then inpaint a box, outpaint margins or make a variation)
and image understanding (upload an image, then a chat whose answers stream in token by token). It calls
the same ``/v1`` API as any client.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from starlette.responses import FileResponse

from .deps import EngineDep, SettingsDep, WorkerDep, authorize
from .engine import Engine
from .inputs import ServerSettings

STATIC = Path(__file__).with_name("static")

router = APIRouter()


def page_values(engine: Engine, s: ServerSettings) -> dict[str, Any]:
    """What the page shows and sends by default: the model, whether a key is needed, the VAE stride (pixels
    per token), the server's default settings for this model (``num_steps`` as configured: None for the
    model's) and its limits."""
    defaults = s.generation.resolve(engine.config)
    limits = ("max_size", "max_num_iter", "max_num_steps", "max_guidance_scale", "max_images", "max_prompt_chars",
              "max_new_tokens", "max_upload_bytes")
    return {"model": engine.name, "auth": bool(s.api_key), "stride": engine.stride,
            "guidance_scale": defaults.guidance_scale, "num_iter": defaults.num_iter,
            "num_steps": s.generation.num_steps, "width": defaults.width, "height": defaults.height,
            **{name: getattr(s, name) for name in limits}}


@router.get("/")
async def index() -> FileResponse:
    """The web page."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/page.json")
async def page_json(engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    """The values the page fills in (no key needed: the page learns from it whether to ask for one)."""
    return page_values(engine, settings)


@router.get("/health")
async def health(engine: EngineDep, worker: WorkerDep) -> dict[str, Any]:
    """Liveness and the queue's state (``batches``: sampling loops that drew several requests)."""
    return {"status": "ok", "model": engine.name, "busy": worker.busy, "queued": worker.waiting,
            "queue_size": worker.queue_size, "completed": worker.completed, "max_batch": worker.max_batch,
            "batches": worker.batches}


@router.get("/v1/models", dependencies=[Depends(authorize)])
async def models(engine: EngineDep) -> dict[str, Any]:
    """The one model served, as OpenAI lists models."""
    return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "harmon"}]}
