"""``harmon serve``: a web page and an OpenAI-style HTTP API in front of one model worker.

Built on FastAPI + uvicorn (:mod:`.app`); the page is a static file shipped with the package
(``static/``) that calls the same API.
"""
from __future__ import annotations

from .app import create_app
from .engine import Engine
from .inputs import ServerSettings

__all__ = ["Engine", "ServerSettings", "create_app", "serve"]


def serve(engine: Engine, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
