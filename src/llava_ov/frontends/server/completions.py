"""Running one chat completion: queue the job, watch the client, answer as JSON or as SSE.

The first event is awaited before any response starts, so a prompt that is too
long (or any failure before the first token) is a proper HTTP error even for
streaming requests.  A client that disconnects cancels its job: a running
generation stops before its next token, a queued one is dropped.  The request
timeout counts from arrival: a job still queued then gets 503; a running one is
cut and ends with finish_reason "length".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from llava_ov.runtime.pipeline import StreamChunk
from llava_ov.frontends.server.errors import APIError, error_body
from llava_ov.frontends.server.mapping import (
    FINISH_REASONS, CallGate, api_error, logprobs_content, tool_calls_out, tool_finish_reason, usage,
)  # fmt: skip
from llava_ov.frontends.server.worker import Dropped, Failed, Job, Started


class ClientGone:
    """Event pushed into a job's queue when its client disconnects."""


class JobOutput:
    """Reads a job's events within the request deadline."""

    def __init__(self, job: Job, timeout_s: float):
        self.job = job
        self.deadline = job.received_at + timeout_s
        self.started = False
        self.timed_out = False

    async def next(self) -> Any:
        """The next StreamChunk, Failed, Dropped or ClientGone (APIError 503 if it timed out in the queue)."""
        while True:
            remaining = None if self.timed_out else max(0.0, self.deadline - time.perf_counter())
            try:
                event = await self.job.next_event(remaining)
            except asyncio.TimeoutError:
                self.timed_out = True
                self.job.cancel.set()  # a running job ends with a "cancelled" chunk soon; a queued one is dropped
                if not (self.started or self.job.started):
                    message = "the request timed out waiting in the queue; retry later"
                    raise APIError(503, message, code="timeout") from None
                continue
            if isinstance(event, Started):
                self.started = True
                continue
            return event


class DisconnectWatch:
    """Waits for the client's `http.disconnect` and then cancels the job."""

    def __init__(self, receive: Any, job: Job):
        self.job = job
        self.task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.job.cancel.set()
        self.job.events.put_nowait(ClientGone())

    def stop(self) -> None:
        self.task.cancel()


class Completion:
    """One accepted request: its job, output reader, disconnect watch and response ids."""

    def __init__(
        self, job: Job, receive: Any, timeout_s: float, model: str, include_usage: bool,
        token_bytes: Callable[[int], bytes] | None = None,
    ):  # fmt: skip
        self.job = job
        self.token_bytes = token_bytes if job.config.logprobs is not None else None  # logprobs asked for
        self.output = JobOutput(job, timeout_s)
        self.watch = DisconnectWatch(receive, job)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    async def first(self) -> StreamChunk:
        """The first chunk, or the request's error (the job is cancelled and the watch stopped then)."""
        try:
            event = await self.output.next()
            if isinstance(event, StreamChunk):
                return event
            raise _terminal_error(event)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.job.cancel.set()  # no effect on a finished job
        self.watch.stop()

    async def collect(self, first: StreamChunk) -> dict[str, Any]:
        """The whole answer (n choices) as a `chat.completion` object."""
        results: dict[int, Any] = {}
        try:
            event = first
            while True:
                if event.result is not None:
                    results[event.index] = event.result
                if len(results) == self.job.n:
                    break
                event = await self.output.next()
                if not isinstance(event, StreamChunk):
                    raise _terminal_error(event)
        finally:
            self.close()
        ordered = [results[i] for i in range(self.job.n)]
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": i, **self._message(result), "logprobs": self._logprobs(result.logprobs or [])}
                        for i, result in enumerate(ordered)],
            "usage": usage(*ordered),
        }  # fmt: skip

    async def events(self, first: StreamChunk) -> AsyncIterator[bytes]:
        """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`."""
        results: dict[int, Any] = {}
        gates = [CallGate(self.job.calls_tools) for _ in range(self.job.n)]
        try:
            for index in range(self.job.n):
                yield self._chunk({"role": "assistant", "content": ""}, index=index)
            event: Any = first
            while True:
                if not isinstance(event, StreamChunk):
                    if not isinstance(event, ClientGone):
                        yield _sse(error_body(**_error_kwargs(_terminal_error(event))))
                    break
                gate = gates[event.index]
                text = gate.feed(event.text)
                if not gate.holding and (text or (event.logprobs and self.token_bytes)):
                    yield self._chunk({"content": text}, logprobs=event.logprobs, index=event.index)
                if event.result is not None:
                    results[event.index] = event.result
                    calls = tool_calls_out(event.result) if self.job.calls_tools else None
                    if calls:
                        deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                        yield self._chunk({"tool_calls": deltas}, index=event.index)
                    elif gate.held:  # held as a call but cut by max_tokens: the text it has
                        yield self._chunk({"content": gate.held}, index=event.index)
                    reason = tool_finish_reason(event.result) if calls else FINISH_REASONS[event.result.finish_reason]
                    yield self._chunk({}, reason, index=event.index)
                    if len(results) == self.job.n:
                        if self.include_usage:
                            yield _sse(self._base(choices=[], usage=usage(*(results[i] for i in range(self.job.n)))))
                        break
                event = await self.output.next()
            yield b"data: [DONE]\n\n"
        finally:
            self.close()

    def _message(self, result: Any) -> dict[str, Any]:
        """A finished answer's message and finish reason: its tool calls when it made some."""
        calls = tool_calls_out(result) if self.job.calls_tools else None
        if calls:
            return {"message": {"role": "assistant", "content": None, "tool_calls": calls}, "finish_reason": tool_finish_reason(result)}
        return {"message": {"role": "assistant", "content": result.text}, "finish_reason": FINISH_REASONS[result.finish_reason]}

    def _base(self, **fields: Any) -> dict[str, Any]:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        out.update(fields)
        if self.include_usage and "usage" not in out:
            out["usage"] = None
        return out

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None = None, logprobs: list | None = None, index: int = 0
    ) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": self._logprobs(logprobs) if logprobs else None}  # fmt: skip
        return _sse(self._base(choices=[choice]))

    def _logprobs(self, entries: list) -> dict[str, Any] | None:
        if self.token_bytes is None:
            return None
        return {"content": logprobs_content(entries, self.token_bytes), "refusal": None}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _terminal_error(event: Any) -> APIError:
    if isinstance(event, Failed):
        return api_error(event.error)
    if isinstance(event, Dropped):
        return APIError(503, "the request was cancelled before it started", code="cancelled")
    return APIError(499, "the client closed the request", code="client_closed")  # nobody reads this one


def _error_kwargs(err: APIError) -> dict[str, Any]:
    return {"status": err.status, "message": err.message, "param": err.param, "code": err.code}


class EventStream(Response):
    """A `text/event-stream` response from an async iterator of bytes (it stops when the iterator does)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        self.status_code = 200
        self.background = None
        self.events = events
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})  # no body: no content-length

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            pass
        finally:
            await self.events.aclose()
