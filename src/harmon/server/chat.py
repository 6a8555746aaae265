"""The chat route: ``POST /v1/chat/completions``, answered as OpenAI's chat completions (streamed as
``chat.completion.chunk`` events ending with ``[DONE]`` with ``"stream": true``)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from .chat_requests import ChatRequest, chat_params
from .deps import EngineDep, SettingsDep, WorkerDep, authorize, json_body, submit
from .errors import ApiError
from .streams import event_stream, sse
from .worker import Job

router = APIRouter(prefix="/v1/chat", dependencies=[Depends(authorize)])


def usage(out: dict[str, Any]) -> dict[str, int]:
    """OpenAI's token counts of an answer."""
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


@dataclass
class ChatReply:
    """The answer to one chat request: its id, model and time, whole or as chunks."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, out: dict[str, Any]) -> dict[str, Any]:
        """The whole answer ``out`` as a ``chat.completion``."""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "finish_reason": out["finish_reason"],
                             "message": {"role": "assistant", "content": out["text"]}}],
                "usage": usage(out)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        """One ``chat.completion.chunk`` event."""
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    async def events(self, job: Job) -> AsyncIterator[bytes]:
        """The streamed answer: the role, one chunk per text piece, the finish with usage, then ``[DONE]``."""
        yield self.chunk({"role": "assistant", "content": ""})
        try:
            async for kind, payload in job.stream():
                if kind == "text":
                    yield self.chunk({"content": payload})
                elif kind == "done":
                    yield self.chunk({}, payload["finish_reason"], usage=usage(payload))
        except ApiError as err:
            yield sse(err.body())
        yield sse("[DONE]")


@router.post("/completions")
async def completions(req: Annotated[ChatRequest, Depends(json_body(ChatRequest))], engine: EngineDep,
                      settings: SettingsDep, worker: WorkerDep) -> Response:
    """Answer the last question of a conversation about one image."""
    params = await run_in_threadpool(chat_params, req, settings)
    job = submit(worker, lambda job: engine.chat(params, job))
    reply = ChatReply(engine.name)
    if req.stream:
        return event_stream(reply.events(job))
    return JSONResponse(reply.body(await job.result()))
