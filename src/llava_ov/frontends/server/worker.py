"""Admission of requests into the engine: bounded slots and a bounded queue, each job streamed back.

Requests become `Job`s, each with a thread. A job takes one of the pipeline's
`max_concurrency` slots (the engine's --max-running; 1 on the stateful path), prepares its
prompt (image work included) and runs it through `Pipeline.stream`, where the engine batches
it with every other running job; chunks go back to the request's event loop through a
thread-safe bridge (`loop.call_soon_threadsafe` into an `asyncio.Queue`). Jobs waiting for a
slot form the queue: at most `max_queue` (429 beyond), served in arrival order. A job whose
cancel Event is set before it gets a slot is dropped; one that is running stops within one
engine step. No conversation state lives here:
each job carries its whole conversation, and the engine's prefix cache finds what it shares
with earlier requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, StreamChunk
from llava_ov.frontends.server.metrics import ServerMetrics

log = logging.getLogger("llava_ov.frontends.server")


class QueueFull(Exception):
    """`max_queue` jobs are waiting already."""


@dataclass
class Started:
    """The engine started the job's prompt (after `wait_s` since the request arrived)."""

    wait_s: float


@dataclass
class Failed:
    error: BaseException


@dataclass
class Dropped:
    """The job was cancelled before it started."""


@dataclass(eq=False)  # a dict key, by identity
class Job:
    messages: list[Message]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    received_at: float = field(default_factory=time.perf_counter)  # when the request arrived
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def emit(self, item: Any) -> None:
        """Hand an event to the request's loop (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next_event(self, timeout: float | None = None) -> Any:
        """The next event; asyncio.TimeoutError after `timeout` seconds."""
        return await asyncio.wait_for(self.events.get(), timeout)


class GenerationWorker:
    """Runs every accepted job concurrently through the pipeline's engine."""

    def __init__(self, max_queue: int, metrics: ServerMetrics):
        self.max_queue = max(1, max_queue)
        self.metrics = metrics
        self.pipeline: Any = None
        self._jobs: dict[Job, threading.Thread] = {}
        self._waiting: list[Job] = []  # arrival order
        self._slots = 1
        self._lock = threading.Condition()
        self._stopping = False

    @property
    def depth(self) -> int:
        """Jobs waiting for a slot."""
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._jobs) - len(self._waiting)

    def engine_stats(self) -> dict:
        engine = getattr(self.pipeline, "engine", None)
        return engine.stats() if engine is not None else {}

    def start(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._slots = max(1, int(getattr(pipeline, "max_concurrency", 1)))

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping or len(self._waiting) >= self.max_queue:
                raise QueueFull
            thread = threading.Thread(target=self._run, args=(job,), name="llava-ov-request", daemon=True)
            self._jobs[job] = thread
            self._waiting.append(job)
        thread.start()

    def _take_slot(self, job: Job) -> bool:
        """Wait for a free slot in arrival order; False if the job was cancelled meanwhile."""
        with self._lock:
            while not job.cancel.is_set() and not (
                self._waiting[0] is job and len(self._jobs) - len(self._waiting) < self._slots
            ):
                self._lock.wait(0.05)  # also wakes to notice a cancel
            self._waiting.remove(job)
            self._lock.notify_all()
            return not job.cancel.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait for their threads."""
        with self._lock:
            self._stopping = True
            jobs = dict(self._jobs)
            for job in jobs:
                job.cancel.set()
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        for thread in jobs.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, job: Job) -> None:
        try:
            if not self._take_slot(job):
                self.metrics.dropped.inc()
                job.emit(Dropped())
                return
            wait_s = time.perf_counter() - job.received_at
            self.metrics.queue_wait.observe(wait_s)
            job.emit(Started(wait_s))
            self._generate(job)
        finally:
            with self._lock:
                self._jobs.pop(job, None)
                self._lock.notify_all()

    def _generate(self, job: Job) -> None:
        first = True
        try:
            for chunk in self.pipeline.stream(job.messages, config=job.config, cancel=job.cancel):
                if first and chunk.token_ids:
                    first = False
                    self.metrics.ttft.observe(time.perf_counter() - job.received_at)
                if chunk.result is not None:
                    self.metrics.record_result(chunk.result)
                job.emit(chunk)
        except Exception as exc:  # reported to the client; bugs are logged here with their trace
            if not isinstance(exc, LlavaOvError):
                log.exception("generation failed")
            job.emit(Failed(exc))


__all__ = ["Job", "GenerationWorker", "QueueFull", "Started", "Failed", "Dropped", "StreamChunk"]
