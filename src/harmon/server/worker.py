"""One model worker: a thread that owns the model and runs jobs from a bounded queue, alone or in batches.

Request handlers (asyncio) submit a :class:`Job`; the worker thread runs it and sends
events back to the handler's event loop (``start``, any job-specific events such as
``progress`` or ``text``, then ``done`` or ``error``). A full queue refuses new jobs at
once (:class:`QueueFullError`, answered with 429) instead of letting requests pile up.

A job may be :class:`Batchable`: when the worker takes it, waiting jobs with an equal key join it (in
queue order, up to ``max_batch`` rows; for at most ``batch_wait`` seconds it waits for more to arrive)
and all run in one call of its ``run``. Each job still gets its own events and outcome: a cancelled job
is dropped from the answers, and when a batch fails its jobs are run again one by one, so that a
request's own error reaches that request only.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Hashable

import torch

from ..errors import InputError
from .errors import ApiError, from_input_error

log = logging.getLogger("harmon.server")

MAX_BATCH = 256          # rows (images) one batch may hold at most
MAX_BATCH_WAIT = 10.0    # seconds the worker may wait for batch-mates at most


class QueueFullError(Exception):
    """The worker's queue holds as many waiting jobs as it may."""


class JobCancelled(Exception):
    """Raised inside a job when its client went away; the worker drops the job."""


@dataclass(frozen=True)
class Batchable:
    """How a job may share one run with others: jobs with equal ``key`` run together as
    ``run(items, jobs)``, which returns one result per job (what each job's own function would return).

    ``size``: the rows (images) the job adds to a batch; ``item``: what ``run`` needs of the job.
    """

    key: Hashable
    size: int
    item: Any
    run: Callable[[list[Any], list["Job"]], list[Any]]


class Job:
    """One unit of model work. ``fn(job)`` runs on the worker thread and may call :meth:`emit`; ``batch``
    says whether and how it may run together with others."""

    def __init__(self, fn: Callable[["Job"], Any], loop: asyncio.AbstractEventLoop, batch: Batchable | None = None):
        self.fn = fn
        self.loop = loop
        self.batch = batch
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

    def fail(self, error: ApiError) -> None:
        """Send ``error`` to the waiting request (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("error", error))
        except RuntimeError:
            pass

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


def api_error(err: Exception) -> ApiError:
    """What a request is answered when its job raised ``err`` (any exception but :class:`JobCancelled`)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, InputError):  # the pipelines' message for a request they cannot serve
        return from_input_error(err)
    if isinstance(err, torch.OutOfMemoryError):
        return ApiError(503, "out of memory on the model device: try a smaller size or fewer images",
                        "server_error", code="out_of_memory")
    return ApiError(500, f"internal error: {type(err).__name__}: {err}", "server_error")


class ModelWorker:
    """A single thread running submitted jobs in order, with at most ``queue_size`` jobs waiting; batchable
    jobs run in batches of up to ``max_batch`` rows (1: every job alone), waiting at most ``batch_wait``
    seconds for batch-mates."""

    def __init__(self, queue_size: int = 8, max_batch: int = 1, batch_wait: float = 0.0):
        if queue_size < 1:
            raise InputError(f"queue_size must be >= 1, got {queue_size}")
        if not 1 <= max_batch <= MAX_BATCH:
            raise InputError(f"max_batch must be in 1..{MAX_BATCH} (1: no batching), got {max_batch}")
        if not 0 <= batch_wait <= MAX_BATCH_WAIT:
            raise InputError(f"batch_wait must be in 0..{MAX_BATCH_WAIT} seconds, got {batch_wait}")
        self.queue_size, self.max_batch, self.batch_wait = queue_size, max_batch, batch_wait
        self._jobs: deque[Job] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy = False
        self.completed = 0
        self.failed = 0
        self.batches = 0  # runs of more than one job

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="harmon-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the running job or batch; waiting jobs are cancelled."""
        with self._changed:
            self._stopping = True
            for job in self._jobs:
                job.cancel()
            self._jobs.clear()
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop | None = None,
               batch: Batchable | None = None) -> Job:
        """Queue ``fn`` to run on the worker thread (with others of its ``batch`` key, when given); raises
        :class:`QueueFullError` when the queue is full.

        Its events go to ``loop`` (default: the running loop of the calling request handler).
        """
        job = Job(fn, loop or asyncio.get_running_loop(), batch)
        with self._changed:
            if len(self._jobs) >= self.queue_size:
                raise QueueFullError()
            self._jobs.append(job)
            self._changed.notify_all()
        return job

    # -- the worker thread -------------------------------------------------------------------
    def _next(self) -> list[Job] | None:
        """The next job and its batch-mates (None: stop)."""
        with self._changed:
            while True:
                while not self._jobs and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return None
                first = self._jobs.popleft()
                if not first.cancelled.is_set():
                    break
            jobs = [first]
            if first.batch is None or self.max_batch == 1:
                return jobs
            deadline = time.monotonic() + self.batch_wait
            while True:
                self._join_compatible(jobs)
                left = deadline - time.monotonic()
                if sum(job.batch.size for job in jobs) >= self.max_batch or left <= 0 or self._stopping:
                    return jobs
                self._changed.wait(left)

    def _join_compatible(self, jobs: list[Job]) -> None:
        """Move the waiting jobs with the key of ``jobs[0]`` into ``jobs``, in queue order, while they fit."""
        key, size = jobs[0].batch.key, sum(job.batch.size for job in jobs)
        for job in list(self._jobs):
            if job.batch is not None and job.batch.key == key and not job.cancelled.is_set() \
                    and size + job.batch.size <= self.max_batch:
                self._jobs.remove(job)
                jobs.append(job)
                size += job.batch.size

    def _run(self) -> None:
        while (jobs := self._next()) is not None:
            self.busy = True
            try:
                if len(jobs) == 1:
                    self._run_job(jobs[0])
                else:
                    self._run_batch(jobs)
            finally:
                self.busy = False

    def _run_job(self, job: Job, started: bool = False) -> None:
        try:
            if not started:
                job.emit("start")
            result = job.fn(job)
        except JobCancelled:
            return
        except Exception as err:  # never let one request take the worker down
            if not isinstance(err, (ApiError, InputError, torch.OutOfMemoryError)):
                log.exception("job failed")
            self.failed += 1
            job.fail(api_error(err))
            return
        self._finish(job, result)

    def _finish(self, job: Job, result: Any) -> None:
        try:
            job.emit("done", result)
        except JobCancelled:
            return
        self.completed += 1

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run ``jobs`` (equal batch keys) in one call of their ``run``; if it fails, each job alone."""
        started = []
        for job in jobs:
            try:
                job.emit("start")
                started.append(job)
            except JobCancelled:
                pass
        if not started:
            return
        if len(started) > 1:
            self.batches += 1
        try:
            results = started[0].batch.run([job.batch.item for job in started], started)
        except JobCancelled:  # every job of the batch was cancelled
            return
        except Exception as err:
            log.warning("a batch of %d jobs failed (%s: %s): running them one by one", len(started),
                        type(err).__name__, err)
            for job in started:
                if not job.cancelled.is_set():
                    self._run_job(job, started=True)
            return
        for job, result in zip(started, results):
            self._finish(job, result)
