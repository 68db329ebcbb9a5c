"""Admission of requests into the engine: a bounded number waiting, each streamed back to its loop.

Requests become `Job`s. Each accepted job gets a thread that prepares its prompt (image
work included) and runs it through `Pipeline.stream`, where the engine batches it with every
other running job; chunks go back to the request's event loop through a thread-safe bridge
(`loop.call_soon_threadsafe` into an `asyncio.Queue`). A job counts as *waiting* until the
engine starts its prompt, then as *running*; at most `max_queue` may wait (429 beyond), and
the engine itself bounds how many run. A job whose cancel Event is set before it starts is
dropped; one that is running stops within one engine step. No conversation state lives here:
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

from ..errors import LlavaOvError
from ..generate import GenerationConfig
from ..pipeline import Message, StreamChunk
from .metrics import ServerMetrics

log = logging.getLogger("llava_ov.server")


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
    started: bool = False

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
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def depth(self) -> int:
        """Jobs accepted but not started by the engine yet."""
        with self._lock:
            return sum(not job.started for job in self._jobs)

    @property
    def running(self) -> int:
        with self._lock:
            return sum(job.started for job in self._jobs)

    def start(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping or sum(not j.started for j in self._jobs) >= self.max_queue:
                raise QueueFull
            thread = threading.Thread(target=self._run, args=(job,), name="llava-ov-request", daemon=True)
            self._jobs[job] = thread
        thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait for their threads."""
        with self._lock:
            self._stopping = True
            jobs = dict(self._jobs)
        for job in jobs:
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for thread in jobs.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, job: Job) -> None:
        try:
            if job.cancel.is_set():
                self.metrics.dropped.inc()
                job.emit(Dropped())
                return
            self._generate(job)
        finally:
            with self._lock:
                self._jobs.pop(job, None)

    def _mark_started(self, job: Job) -> None:
        if not job.started:
            job.started = True
            wait_s = time.perf_counter() - job.received_at
            self.metrics.queue_wait.observe(wait_s)
            job.emit(Started(wait_s))

    def _generate(self, job: Job) -> None:
        first = True
        try:
            chunks = self.pipeline.stream(
                job.messages, config=job.config, cancel=job.cancel, progress=lambda done, total: self._mark_started(job)
            )
            for chunk in chunks:
                self._mark_started(job)
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
