"""One model worker: a thread that owns the model and runs jobs one at a time from a bounded queue.

Request handlers (asyncio) submit a :class:`Job`; the worker thread runs it and sends
events back to the handler's event loop (``start``, any job-specific events such as
``progress`` or ``text``, then ``done`` or ``error``). A full queue refuses new jobs at
once (:class:`QueueFullError`, answered with 429) instead of letting requests pile up.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator, Callable

import torch

from ..errors import InputError
from .errors import ApiError, from_input_error

log = logging.getLogger("harmon.server")


class QueueFullError(Exception):
    """The worker's queue holds as many waiting jobs as it may."""


class JobCancelled(Exception):
    """Raised inside a job when its client went away; the worker drops the job."""


class Job:
    """One unit of model work. ``fn(job)`` runs on the worker thread and may call :meth:`emit`."""

    def __init__(self, fn: Callable[["Job"], Any], loop: asyncio.AbstractEventLoop):
        self.fn = fn
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, payload: Any = None) -> None:
        """Send an event to the waiting request (from the worker thread); stops the job if it was cancelled."""
        if self.cancelled.is_set():
            raise JobCancelled()
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()
            raise JobCancelled() from None

    def cancel(self) -> None:
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[tuple[str, Any]]:
        """Events until ``done`` (yielded) or ``error`` (raised as :class:`ApiError`); cancels the job if abandoned."""
        try:
            while True:
                kind, payload = await self.events.get()
                if kind == "error":
                    raise payload
                yield kind, payload
                if kind == "done":
                    return
        finally:
            self.cancel()  # no-op once done; stops a running or queued job whose client went away

    async def result(self) -> Any:
        """Wait for the job's return value, ignoring intermediate events."""
        async for kind, payload in self.stream():
            if kind == "done":
                return payload
        raise ApiError(500, "the job ended without a result", "server_error")


class ModelWorker:
    """A single thread running submitted jobs in order, with at most ``queue_size`` jobs waiting."""

    def __init__(self, queue_size: int = 8):
        if queue_size < 1:
            raise InputError(f"queue_size must be >= 1, got {queue_size}")
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self.busy = False
        self.completed = 0
        self.failed = 0

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="harmon-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the running job; waiting jobs are cancelled."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            self._thread = None

    def submit(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue ``fn`` to run on the worker thread; raises :class:`QueueFullError` when the queue is full.

        Its events go to ``loop`` (default: the running loop of the calling request handler).
        """
        job = Job(fn, loop or asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError() from None
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._run_job(job)
            finally:
                self.busy = False

    def _run_job(self, job: Job) -> None:
        try:
            job.emit("start")
            result = job.fn(job)
            job.emit("done", result)
            self.completed += 1
            return
        except JobCancelled:
            return
        except ApiError as err:
            error = err
        except InputError as err:  # the pipelines' message for a request they cannot serve
            error = from_input_error(err)
        except torch.OutOfMemoryError:
            error = ApiError(503, "out of memory on the model device: try a smaller size or fewer images",
                             "server_error", code="out_of_memory")
        except Exception as err:  # never let one request take the worker down
            log.exception("job failed")
            error = ApiError(500, f"internal error: {type(err).__name__}: {err}", "server_error")
        self.failed += 1
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, ("error", error))
        except RuntimeError:
            pass
