"""A client's handle on one submitted sequence, shared by both backends (engine and stateful).

The backend's thread `put`s events; the client reads them either with `for` (blocking) or
with `async for` (on an event loop). The async side is woken through
`loop.call_soon_threadsafe`, never by polling.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """Prefill progress of one generation: `done` of `total` prompt positions are in the cache."""

    done: int
    total: int


@dataclass
class Finished:
    """The generation ended (its last TokenEvent had the finish reason)."""


@dataclass
class Failed:
    error: BaseException


@dataclass
class SequenceStats:
    submitted_at: float = field(default_factory=time.perf_counter)
    scheduled_at: float | None = None  # first admitted into a forward
    first_token_at: float | None = None
    cached_tokens: int = 0
    preemptions: int = 0

    @property
    def queue_s(self) -> float:
        return (self.scheduled_at or self.submitted_at) - self.submitted_at

    @property
    def prefill_s(self) -> float:
        if self.first_token_at is None or self.scheduled_at is None:
            return 0.0
        return self.first_token_at - self.scheduled_at


class Handle:
    """Events of one sequence in order: Progress, TokenEvent (the last one has finish_reason), or Failed."""

    def __init__(self, state: Any, cancel: threading.Event | None = None):
        self.state = state  # DecodeState or ForcedDecode
        self.cancel_event = cancel or threading.Event()
        self.stats = SequenceStats()
        self.done = False  # set by the backend once it sent the last event
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    @property
    def started(self) -> bool:
        """The backend began computing it (it left the backend's queue)."""
        return self.stats.scheduled_at is not None

    def cancel(self) -> None:
        self.cancel_event.set()

    def put(self, event: Any) -> None:
        """Hand an event to the reader (from the backend's thread)."""
        self._events.put(event)
        waker = self._waker
        if waker is not None:
            loop, flag = waker
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the reader's loop is closed: nobody listens any more
                pass

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._events.get()
            if isinstance(item, Finished):
                return
            yield item
            if isinstance(item, Failed):
                return

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._async_events()

    async def _async_events(self) -> AsyncIterator[Any]:
        if self._waker is not None:
            raise RuntimeError("a handle has one reader: it is already being read with `async for`")
        flag = asyncio.Event()
        self._waker = (asyncio.get_running_loop(), flag)
        while True:
            flag.clear()  # before looking: a put after the look sets it again
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                await flag.wait()
                continue
            if isinstance(item, Finished):
                return
            yield item
            if isinstance(item, Failed):
                return
