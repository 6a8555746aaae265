"""The image routes: ``POST /v1/images/generations`` (streamed with ``"stream": true``) and
``POST /v1/images/edits``, both answered as OpenAI's images API answers (base64 PNGs, with Harmon's seed
and metadata per image)."""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..settings import GenerationSettings
from .deps import EngineDep, SettingsDep, WorkerDep, authorize, json_body, submit
from .errors import ApiError
from .image_requests import EditRequest, ImageRequest, edit_params, generation_params
from .streams import event_stream, sse
from .worker import Job, ModelWorker

router = APIRouter(prefix="/v1/images", dependencies=[Depends(authorize)])


@dataclass
class ImageReply:
    """The answer to one image request: its model, size and time, and one item per drawn image."""

    model: str
    size: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, model: str, settings: GenerationSettings) -> "ImageReply":
        return cls(model, f"{settings.width}x{settings.height}")

    def item(self, k: int, out: dict[str, Any]) -> dict[str, Any]:
        """Image ``k``: the PNG as base64, its seed and its metadata."""
        return {"b64_json": base64.b64encode(out["png"]).decode(), "seed": out["seed"], "image_index": k,
                "size": self.size, "output_format": "png", "metadata": out["metadata"]}

    def body(self, outs: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole JSON answer for the images ``outs``."""
        return {"created": self.created, "model": self.model, "output_format": "png", "size": self.size,
                "data": [self.item(k, out) for k, out in enumerate(outs)]}

    async def events(self, job: Job, worker: ModelWorker) -> AsyncIterator[bytes]:
        """The streamed answer: queued (how many jobs wait), one progress event per MAR iteration, then one
        event per image."""
        yield sse({"type": "image_generation.queued", "queued": worker.waiting}, "image_generation.queued")
        try:
            async for kind, payload in job.stream():
                if kind == "progress":
                    yield sse({"type": "image_generation.progress", **payload}, "image_generation.progress")
                elif kind == "done":
                    for k, out in enumerate(payload):
                        yield sse({"type": "image_generation.completed", "created_at": self.created,
                                   **self.item(k, out)}, "image_generation.completed")
        except ApiError as err:
            yield err.sse()


@router.post("/generations")
async def generations(req: Annotated[ImageRequest, Depends(json_body(ImageRequest))], engine: EngineDep,
                      settings: SettingsDep, worker: WorkerDep) -> Response:
    """Text to image: ``n`` images of one prompt (drawn with other waiting requests of equal settings)."""
    params = generation_params(req, settings, engine.config)
    job = submit(worker, lambda job: engine.generate(params, job), batch=engine.batchable(params))
    reply = ImageReply.of(engine.name, params.settings)
    if req.stream:
        return event_stream(reply.events(job, worker))
    return JSONResponse(reply.body(await job.result()))


@router.post("/edits")
async def edits(req: Annotated[EditRequest, Depends(json_body(EditRequest))], engine: EngineDep,
                settings: SettingsDep, worker: WorkerDep) -> Response:
    """Inpaint, outpaint or vary an image (JSON, the image as a data: URL)."""
    params = await run_in_threadpool(edit_params, req, settings, engine.config)
    job = submit(worker, lambda job: engine.edit(params, job))
    reply = ImageReply.of(engine.name, params.settings)
    return JSONResponse(reply.body([await job.result()]))
