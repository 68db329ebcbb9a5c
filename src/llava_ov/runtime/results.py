"""What a generation gives back: timings, the result, stream chunks, and the stream itself.

`ChunkStream` turns a backend's `Handle` (runtime/handle.py) into `StreamChunk`s; like the
handle, it is read with `for` (blocking) or `async for` (on an event loop).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from llava_ov.runtime.generate import Constraint, TokenEvent, TokenLogprob
from llava_ov.runtime.handle import Failed, Handle, Progress

if TYPE_CHECKING:
    from llava_ov.runtime.prompts import PreparedPrompt


@dataclass
class Timings:
    queue_s: float = 0.0  # waiting for the engine to start the prompt (other sequences ran)
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prune_s: float = 0.0  # CDPruner's selection of the image tokens to keep
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the call to the first token (includes image work and prefill)
    grammar_s: float = 0.0  # in the JSON grammar's mask and advance (0 without a schema)
    token_s: list[float] = field(default_factory=list)  # per generated token after the first

    @property
    def decode_s(self) -> float:
        return float(sum(self.token_s))

    @property
    def tpot_s(self) -> float:
        return self.decode_s / len(self.token_s) if self.token_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_s) / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 6) for k, v in asdict(self).items() if k != "token_s"}
        out.update(decode_s=round(self.decode_s, 6), tpot_s=round(self.tpot_s, 6), tokens_per_s=self.tokens_per_s)
        return out


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos | length | stop | cancelled
    prompt_tokens: int  # including image tokens
    image_tokens: int
    cached_tokens: int  # prompt tokens reused from the KV cache (not prefilled)
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # one per token, when the config asks for them
    image_tokens_total: int = 0  # image tokens at the model's own resolution (image_tokens: those kept)
    video_tokens: int = 0  # the prompt's video tokens (not counted in image_tokens)
    video_frames: int = 0  # frames sampled from the prompt's videos
    proposed_tokens: int = 0  # tokens proposed for verification (jump-forward, prompt lookup)
    accepted_tokens: int = 0  # of them, kept: each one a forward saved

    def image_token_note(self) -> str:
        """'2928 image' or, when a budget or pruning removed some, '732 of 2928 image tokens kept'."""
        if self.image_tokens_total and self.image_tokens != self.image_tokens_total:
            note = f"{self.image_tokens} of {self.image_tokens_total} image tokens kept"
        else:
            note = f"{self.image_tokens} image"
        return note + (f", {self.video_tokens} video ({self.video_frames} frames)" if self.video_frames else "")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["timings"] = self.timings.as_dict()
        return out


@dataclass
class StreamChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    result: GenerationResult | None = None  # on the last chunk
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of this chunk's tokens, when asked for
    index: int = 0  # which of `Pipeline.submit_n`'s answers (a choice's index), set by whoever reads several


class Collector:
    """Turns TokenEvents into StreamChunks and the final GenerationResult."""

    def __init__(
        self, prompt: PreparedPrompt, timings: Timings, started: float, reused: int = 0,
        constraint: Constraint | None = None,
    ):  # fmt: skip
        self.prompt, self.timings, self.started, self.reused = prompt, timings, started, reused
        self.constraint = constraint
        self.tokens: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] = []

    def chunk(self, event: TokenEvent) -> StreamChunk:
        if event.token_id is not None:
            self.tokens.append(event.token_id)
            if len(self.tokens) == 1:
                self.timings.ttft_s = time.perf_counter() - self.started
            else:
                self.timings.token_s.append(event.time_s)
        self.texts.append(event.text)
        chunk = StreamChunk(event.text, [] if event.token_id is None else [event.token_id], event.finish_reason)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
            chunk.logprobs.append(event.logprob)
        if event.finish_reason is not None:
            if self.constraint is not None:
                self.timings.grammar_s = self.constraint.spent_s
            chunk.result = GenerationResult(
                "".join(self.texts), self.tokens, event.finish_reason, len(self.prompt.token_ids),
                self.prompt.image_tokens, self.reused, self.timings, self.logprobs if self.logprobs else None,
                self.prompt.image_tokens_total, self.prompt.video_tokens, self.prompt.video_frames,
            )  # fmt: skip
        return chunk


class ChunkStream:
    """The StreamChunks of one submitted prompt; the last has finish_reason and the result.

    Read it once, with `for` or `async for`. Stopping early cancels the generation.
    `progress(done, total)` is called in the reader's thread as prompt chunks are prefilled."""

    def __init__(
        self, handle: Handle, collect: Collector, progress: Callable[[int, int], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ):  # fmt: skip
        self.handle = handle
        self.collect = collect
        self.progress = progress
        self.on_end = on_end
        self.result: GenerationResult | None = None

    @property
    def started(self) -> bool:
        """The backend began computing the prompt (it left the backend's queue)."""
        return self.handle.started

    def cancel(self) -> None:
        self.handle.cancel()

    def __iter__(self) -> Iterator[StreamChunk]:
        try:
            for item in self.handle:
                chunk = self._chunk(item)
                if chunk is not None:
                    yield chunk
        finally:
            self.close()

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._async_chunks()

    async def _async_chunks(self) -> AsyncIterator[StreamChunk]:
        try:
            async for item in self.handle:
                chunk = self._chunk(item)
                if chunk is not None:
                    yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the generation unless it ended (the reader stopped reading)."""
        if not self.handle.done:
            self.handle.cancel()
        if self.on_end is not None:
            self.on_end()
            self.on_end = None

    def _chunk(self, item: Any) -> StreamChunk | None:
        """The chunk for one backend event (None for progress); a failure is raised."""
        if isinstance(item, Progress):
            if self.progress is not None:
                self.progress(item.done, item.total)
            return None
        if isinstance(item, Failed):
            raise item.error
        stats, timings = self.handle.stats, self.collect.timings
        if item.token_id is not None and self.collect.tokens == []:
            timings.queue_s, timings.prefill_s = stats.queue_s, stats.prefill_s
        self.collect.reused = stats.cached_tokens
        chunk = self.collect.chunk(item)
        if chunk.result is not None:
            self.result = chunk.result
            speculation = getattr(self.handle.state, "speculation", None)  # counted before the last event was sent
            if speculation is not None:
                self.result.proposed_tokens, self.result.accepted_tokens = speculation.proposed, speculation.accepted
        return chunk
