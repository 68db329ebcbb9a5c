"""One generation at a time: a FIFO worker thread with a bounded queue.

Requests become `Job`s; the worker thread runs them one by one through
`Pipeline.stream` and hands every chunk back to the request's event loop
through a thread-safe bridge (`loop.call_soon_threadsafe` into an
`asyncio.Queue`).  A job whose cancel Event is set before it starts is dropped;
one that is running stops before its next token.  No conversation state lives
here: each job carries its whole conversation.
"""

from __future__ import annotations

import asyncio
import logging
import queue
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
    """The queue holds `max_queue` waiting jobs already."""


@dataclass
class Started:
    """The worker took the job (after `wait_s` in the queue)."""

    wait_s: float


@dataclass
class Failed:
    error: BaseException


@dataclass
class Dropped:
    """The job was cancelled before it started."""


@dataclass
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
    """Runs jobs FIFO on one thread; at most `max_queue` wait behind the running one."""

    def __init__(self, max_queue: int, metrics: ServerMetrics):
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_queue))
        self.metrics = metrics
        self.pipeline: Any = None
        self.current: Job | None = None
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return int(self.current is not None)

    def start(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._thread = threading.Thread(target=self._run, name="llava-ov-generation", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything, let the thread finish."""
        if self._thread is None:
            return
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit(Dropped())
        if self.current is not None:
            self.current.cancel.set()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # requests still arriving; the daemon thread ends with the process
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancel.is_set():
                self.metrics.dropped.inc()
                job.emit(Dropped())
                continue
            self.current = job
            try:
                self._generate(job)
            finally:
                self.current = None

    def _generate(self, job: Job) -> None:
        wait_s = time.perf_counter() - job.received_at
        self.metrics.queue_wait.observe(wait_s)
        job.emit(Started(wait_s))
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
