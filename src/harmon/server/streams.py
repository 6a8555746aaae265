"""Server-sent events: the framing of one event and the streaming response that carries them."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any, event: str | None = None) -> bytes:
    """One event: ``data`` as JSON (or a ready string such as ``[DONE]``), named ``event`` when given."""
    head = f"event: {event}\n" if event else ""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {text}\n\n".encode()


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    """A ``text/event-stream`` response sending ``events`` as they come, unbuffered by proxies."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
