"""Admission of requests into the pipeline's backend; each job streamed back on the event loop.

Each accepted request becomes a `Job` and one asyncio task: it prepares the prompt in a
worker thread (`Pipeline.submit`: template, tokens, image loading and encoding block), then
awaits the backend's handle (`async for`: the engine thread wakes the loop with
`call_soon_threadsafe`, nothing polls) and relays the chunks to the request. No thread waits
on a generation and there is no queue here: the backend's admission (the engine's
`--max-running`; one at a time on the stateful path) is the only one. `max_queue` bounds the
requests accepted beyond what the backend runs at once (waiting in its queue, or preparing
with no free place to run); more get 429. A job cancelled before the backend started it is
dropped without any model work; a running one stops within one engine step. No conversation
state lives here: each job carries its whole conversation, and the engine's prefix cache
finds what it shares with earlier requests.
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
    """The backend started the job's prompt (after `wait_s` since the request arrived)."""

    wait_s: float


@dataclass
class Failed:
    error: BaseException


@dataclass
class Dropped:
    """The job was cancelled before it started."""


@dataclass(eq=False)  # a set member, by identity
class Job:
    messages: list[Message]
    config: GenerationConfig
    received_at: float = field(default_factory=time.perf_counter)  # when the request arrived
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    n: int = 1  # answers to the prompt (OpenAI's n): one prefill, n sequences
    calls_tools: bool = False  # the answer may be tool calls (tools offered, tool_choice not "none")
    streams: list[Any] = field(default_factory=list)  # the pipeline's ChunkStreams once submitted

    @property
    def stream(self) -> Any:
        """The first answer's stream (what admission and queue metrics follow)."""
        return self.streams[0] if self.streams else None

    @property
    def started(self) -> bool:
        """The backend began computing the prompt."""
        return self.stream is not None and self.stream.started

    def emit(self, item: Any) -> None:
        """Hand an event to the request (on the event loop)."""
        self.events.put_nowait(item)

    async def next_event(self, timeout: float | None = None) -> Any:
        """The next event; asyncio.TimeoutError after `timeout` seconds."""
        return await asyncio.wait_for(self.events.get(), timeout)


class GenerationWorker:
    """Runs every accepted job as a task over the pipeline's backend (all on one event loop)."""

    def __init__(self, max_queue: int, metrics: ServerMetrics, max_prompt_tokens: int | None = None):
        self.max_queue = max(1, max_queue)
        self.max_prompt_tokens = max_prompt_tokens  # the server's own limit, images counted before encoding
        self.metrics = metrics
        self.pipeline: Any = None
        self._slots = 1
        self._preparing = 0  # accepted jobs not yet submitted to the backend
        self._count_lock = threading.Lock()  # `_preparing`: the loop adds, worker threads subtract
        self._jobs: set[Job] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    @property
    def depth(self) -> int:
        """Accepted jobs beyond what the backend runs at once: waiting in its queue, or preparing
        with no free place to run."""
        running, waiting = self._occupancy()
        free = max(0, self._slots - running - waiting)
        return waiting + max(0, self._preparing - free)

    @property
    def running(self) -> int:
        """Jobs the backend is computing."""
        return self._occupancy()[0]

    def _occupancy(self) -> tuple[int, int]:
        return self.pipeline.occupancy() if self.pipeline is not None else (0, 0)

    def engine_stats(self) -> dict:
        engine = getattr(self.pipeline, "engine", None)
        return engine.stats() if engine is not None else {}

    def start(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._slots = max(1, int(getattr(pipeline, "max_concurrency", 1)))

    def submit(self, job: Job) -> None:
        """Accept a job (on the event loop); QueueFull when `max_queue` jobs wait already."""
        if self._stopping or self.depth >= self.max_queue:
            raise QueueFull
        with self._count_lock:
            self._preparing += 1
        self._jobs.add(job)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait for their tasks."""
        self._stopping = True
        for job in self._jobs:
            job.cancel.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def _run(self, job: Job) -> None:
        try:
            job.streams = await self._submit(job)
            if not job.streams:
                self._drop(job)
                return
            await self._relay(job)
        except Exception as exc:  # reported to the client; bugs are logged here with their trace
            if not isinstance(exc, LlavaOvError):
                log.exception("generation failed")
            job.emit(Failed(exc))
        finally:
            self._jobs.discard(job)

    async def _submit(self, job: Job) -> list[Any]:
        """Prepare and submit the job in a worker thread: its n streams (none if it was cancelled before)."""
        if job.cancel.is_set():
            self._prepared()
            return []
        return await asyncio.to_thread(self._prepare_and_submit, job)

    def _prepare_and_submit(self, job: Job) -> list[Any]:
        """(worker thread) The job leaves the preparing count as it enters the backend's queue, not
        when the event loop next resumes its task (it would count twice in `depth` meanwhile)."""
        try:
            return self.pipeline.submit_n(job.messages, job.n, config=job.config, cancel=job.cancel,
                                          max_prompt_tokens=self.max_prompt_tokens)  # fmt: skip
        finally:
            self._prepared()

    def _prepared(self) -> None:
        with self._count_lock:
            self._preparing -= 1

    async def _relay(self, job: Job) -> None:
        """Announce the start (or the drop) on the first answer's first chunk, then relay every answer's
        chunks as they come, each stamped with its answer's index."""
        chunks = aiter(job.stream)
        head = await anext(chunks, None)
        if head is None or not job.stream.started:  # it ended before the backend ran it: cancelled while it waited
            self._drop(job)
            return
        wait_s = job.stream.handle.stats.scheduled_at - job.received_at
        self.metrics.queue_wait.observe(wait_s)
        job.emit(Started(wait_s))
        first = [False]
        others = [self._relay_answer(job, i, aiter(stream), first) for i, stream in enumerate(job.streams) if i]
        await asyncio.gather(self._relay_answer(job, 0, chunks, first, head), *others)

    async def _relay_answer(self, job: Job, index: int, chunks: Any, first: list[bool], head: Any = None) -> None:
        """One answer's chunks, stamped with its index (`head`: a chunk already read from it)."""
        if head is not None:
            head.index = index
            self._forward(job, head, first)
        async for chunk in chunks:
            chunk.index = index
            self._forward(job, chunk, first)

    def _forward(self, job: Job, chunk: Any, first: list[bool]) -> None:
        if not first[0] and chunk.token_ids:
            first[0] = True
            self.metrics.ttft.observe(time.perf_counter() - job.received_at)
        if chunk.result is not None:
            self.metrics.record_result(chunk.result)
        job.emit(chunk)

    def _drop(self, job: Job) -> None:
        self.metrics.dropped.inc()
        job.emit(Dropped())


__all__ = ["Job", "GenerationWorker", "QueueFull", "Started", "Failed", "Dropped", "StreamChunk"]
