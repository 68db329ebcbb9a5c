"""`Pipeline`: the Python API every front end calls.

`stream` (an iterator of text pieces ending with a finish reason), `astream` (the same on an
event loop) and `generate` (collects a stream). A prompt is a list of chat messages. A call
prepares the prompt (runtime/prompts.py: template, tokens, images, budget, pruning), submits
it to the backend (runtime/backends: the paged engine by default, where calls from many
threads run together in one forward and share cached prefixes; the stateful model with
`kv_cache="stateful"`, the NPU path, one call at a time) and reads the backend's handle into
chunks (runtime/results.py). `prefill`/`step` (one forward) exist on the stateful path only.
Image features are cached by content either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.errors import ContextLengthError, LlavaOvError
from llava_ov.runtime.backends import Backend, backend_for
from llava_ov.runtime.constrained import GrammarConstraint, Grammars
from llava_ov.runtime.draft import DraftModel, DraftPrompt
from llava_ov.runtime.engine.core import Engine
from llava_ov.runtime.generate import DecodeState, ForcedDecode, GenerationConfig
from llava_ov.runtime.handle import Failed
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.prompts import Message, PreparedImage, PreparedPrompt, PromptBuilder, as_messages
from llava_ov.runtime.results import ChunkStream, Collector, GenerationResult, StreamChunk, Timings
from llava_ov.runtime.settings import LoadSettings

__all__ = [
    "Pipeline", "Message", "PreparedImage", "PreparedPrompt", "GenerationResult", "StreamChunk", "Timings",
    "as_messages",
]  # fmt: skip


MAX_ANSWERS = 16  # answers to one prompt (OpenAI's n); each is a sequence of the engine


def _nth(config: GenerationConfig, index: int) -> GenerationConfig:
    """The config of answer `index` of n: its own seed (seed + index) when the request gave one."""
    return config if config.seed is None else dataclasses.replace(config, seed=config.seed + index)


class Pipeline:
    """A loaded export ready to answer questions about images.

    `settings` says how to load and run it; keyword arguments override single fields of it,
    e.g. `Pipeline(path, device="GPU", kv_cache="stateful", max_running=8)`."""

    def __init__(self, model_dir: str | Path, settings: LoadSettings | str | None = None, **overrides: Any):
        if isinstance(settings, str):  # Pipeline(path, "GPU"): the device, as the API took it before LoadSettings
            settings, overrides = None, {"device": settings, **overrides}
        self.settings = (settings or LoadSettings()).with_overrides(**overrides)
        self.model = ExportedModel(model_dir, self.settings)
        self.backend: Backend = backend_for(self.model, self.settings)
        self.prompts = PromptBuilder(self.model, self.backend)
        self.eos_ids = self._eos_ids()
        self.draft = self._load_draft()
        self._cancels: weakref.WeakSet[threading.Event] = weakref.WeakSet()  # of generations still referenced
        self._grammars: Grammars | None = None  # built on the first request with a schema, regex or grammar
        self._grammars_lock = threading.Lock()

    @property
    def engine(self) -> Engine | None:
        """The paged engine (its config, stats, pool), or None on the stateful path."""
        return self.backend.engine

    @property
    def max_concurrency(self) -> int:
        """How many generations make progress at once (the engine's max_running; 1 when stateful)."""
        return self.backend.max_concurrency

    def occupancy(self) -> tuple[int, int]:
        """(running, waiting) generations in the backend: computing, and submitted but not started."""
        return self.backend.occupancy()

    def _load_draft(self) -> DraftModel | None:
        """The draft model of `settings.draft` (runtime/draft.py), its KV pool as large as the engine's."""
        if self.settings.draft is None:
            return None
        return DraftModel(self.model, self.settings, self.backend.engine.capacity_tokens)

    def _eos_ids(self) -> set[int]:
        """The configs' eos ids and the token the chat template ends an assistant turn with."""
        turn_end = self.prompts.template.turn_end(self.model.export.special_token_ids())
        return self.model.export.eos_ids() | ({turn_end} if turn_end is not None else set())

    # ---------------------------------------------------------------- prompts (runtime/prompts.py)

    def prepare_image(self, source: Any) -> PreparedImage:
        """Preprocess + encode + pack one image at the model's own resolution, cached by pixel content."""
        return self.prompts.prepare_image(source)

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None) -> str:
        return self.prompts.render(messages, tools)

    @property
    def template_renders_tools(self) -> bool:
        """The chat template renders function definitions, calls and results itself."""
        return self.prompts.template.supports_tools

    def prepare(
        self, messages: Sequence[Message], config: GenerationConfig | None = None, max_tokens: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> PreparedPrompt:
        """Render, tokenize and expand `<image>`/`<video>` into each one's feature positions.

        `config` brings the image-token budget, video sampling and visual-token pruning; a prompt
        over `max_tokens` is refused before any image is encoded; `cancel()` stops a video's decoding."""
        return self.prompts.prepare(messages, config, max_tokens, cancel)

    def count_tokens(self, messages: Sequence[Message], config: GenerationConfig | None = None) -> int:
        """Prompt tokens of `messages`, image tokens included, from the image sizes (nothing is encoded)."""
        return self.prompts.count_tokens(messages, config)

    @property
    def prompt_limit(self) -> int:
        """The most tokens a prompt plus its answer may take: the context, or the engine's KV pool if smaller."""
        return self.backend.prompt_limit

    # ---------------------------------------------------------------- forward (runtime/backends)

    def step(self, token_id: int) -> np.ndarray:
        """One forward of `token_id` after the cached sequence; returns next-token logits (stateful)."""
        return self.backend.step(token_id)

    def prefill(self, prompt: PreparedPrompt) -> tuple[np.ndarray, int]:
        """Feed what the cache lacks of `prompt`; returns (last logits, reused prefix length) (stateful)."""
        return self.backend.prefill(prompt)

    def score(self, messages: Sequence[Message], tokens: Sequence[int]) -> np.ndarray:
        """[len(tokens) + 1, vocab] next-token logits after the prompt and after each of `tokens`."""
        prompt = self.prepare(messages)
        self.prompts.check_context(prompt)
        if len(prompt.token_ids) + len(tokens) >= self.prompt_limit:
            raise ContextLengthError(
                f"the prompt ({len(prompt.token_ids)} tokens) and the {len(tokens)} tokens to score do not fit: "
                f"{self.backend.limit_reason()} {self.prompt_limit} tokens"
            )
        forced = ForcedDecode(tokens)
        for item in self.backend.submit(prompt, forced):
            if isinstance(item, Failed):
                raise item.error
        if forced.finished != "length" or len(forced.rows) != len(tokens) + 1:
            raise LlavaOvError(f"scoring stopped after {len(forced.rows)} of {len(tokens) + 1} positions (context full?)")
        return np.stack(forced.rows)

    def reset(self) -> None:
        """Forget cached KV: the stateful cache, or the engine's idle prefix blocks (and the draft model's)."""
        self.backend.reset()
        if self.draft is not None:
            self.draft.clear_cache()

    def clear_caches(self) -> None:
        """Forget cached KV and cached image and frame features (first-turn measurements)."""
        self.reset()
        self.prompts.features.clear()
        self.prompts.frame_features.clear()

    def close(self) -> None:
        """Stop the backend's thread (cancels what runs); the pipeline cannot generate afterwards."""
        self.backend.close()

    # ---------------------------------------------------------------- generation

    def submit(
        self,
        prompt: str | Sequence[Message],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
        max_prompt_tokens: int | None = None,
        *,
        videos: Sequence[Any] = (),
    ) -> ChunkStream:
        """Prepare the prompt (blocking: images and videos are loaded and encoded here) and submit it.

        Read the returned stream with `for` or `async for`; stopping early, or setting `cancel`,
        cancels the generation (and a video's decoding while the prompt is prepared).
        `progress(done, total)` is called by the reader as prompt chunks are prefilled. A prompt
        over `max_prompt_tokens` (a caller's own limit) is refused before any image is encoded."""
        return self.submit_n(prompt, 1, images, config, cancel, progress, max_prompt_tokens, videos=videos)[0]

    def submit_n(
        self,
        prompt: str | Sequence[Message],
        n: int,
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
        max_prompt_tokens: int | None = None,
        *,
        videos: Sequence[Any] = (),
    ) -> list[ChunkStream]:
        """`n` answers to one prompt (OpenAI's `n`): prepared once, prefilled once — the other n-1 start
        from the first one's KV blocks in the prefix cache. With a seed, answer i samples with seed + i.
        `cancel` stops them all; each stream is read (or closed) on its own."""
        if not 1 <= n <= MAX_ANSWERS:
            raise LlavaOvError(f"n must be in [1, {MAX_ANSWERS}]")
        started = time.perf_counter()
        config = config or GenerationConfig()
        config.validate()
        config.check_vocabulary(int(self.model.text_config["vocab_size"]))
        messages = as_messages(prompt, images, videos)
        cancel = cancel or threading.Event()
        self._cancels.add(cancel)
        open_streams = [n]

        def on_end() -> None:
            open_streams[0] -= 1
            if open_streams[0] == 0:
                self._cancels.discard(cancel)

        handles: list[Any] = []
        try:
            prompt_, timings, first, draft = self._start(messages, config, max_prompt_tokens, cancel)
            states = [first, *(self._decode_state(prompt_, _nth(config, i), draft=draft) for i in range(1, n))]
            for state in states:
                handles.append(self.backend.submit(prompt_, state, cancel, after=handles[0] if handles else None))
        except BaseException:
            if handles:  # some were submitted: they stop with the rest
                cancel.set()
            self._cancels.discard(cancel)
            raise
        return [ChunkStream(h, Collector(prompt_, timings, started, constraint=s.constraint), progress, on_end=on_end)
                for h, s in zip(handles, states)]  # fmt: skip

    def stream(
        self,
        prompt: str | Sequence[Message],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        videos: Sequence[Any] = (),
    ) -> Iterator[StreamChunk]:
        """Yield text pieces as they are decoded; the last chunk has finish_reason and the result.

        `progress(done, total)` is called (in the caller's thread) as prompt chunks are prefilled.
        Closing the iterator early, or setting `cancel`, cancels the generation."""
        yield from self.submit(prompt, images, config, cancel, progress, videos=videos)

    async def astream(
        self,
        prompt: str | Sequence[Message],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
        *,
        videos: Sequence[Any] = (),
    ) -> AsyncIterator[StreamChunk]:
        """`stream` for an event loop: the prompt is prepared in a worker thread (image work blocks),
        then the chunks are awaited (no thread waits on the generation)."""
        cancel = cancel or threading.Event()
        try:
            chunks = await asyncio.to_thread(self.submit, prompt, images, config, cancel, videos=videos)
        except BaseException:  # e.g. the task was cancelled while the prompt was prepared
            cancel.set()  # a generation submitted after nobody waits for it ends at once
            raise
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            chunks.close()

    def token_bytes(self, token_id: int) -> bytes:
        """A token's text as bytes, for logprobs (thread-safe)."""
        return self.model.tokenizer.token_bytes(token_id)

    def constraint(self, config: GenerationConfig) -> GrammarConstraint | None:
        """A grammar state for one answer under the config's JSON schema, regex or Lark grammar (None when it
        has none; InvalidGrammarError naming what is wrong)."""
        spec = config.constraint_spec
        if spec is None:
            return None
        with self._grammars_lock:
            if self._grammars is None:
                vocab = int(self.model.text_config["vocab_size"])
                self._grammars = Grammars.from_export(self.model.export, vocab, self.eos_ids)
        return self._grammars.constraint(*spec)

    def _start(
        self, messages: Sequence[Message], config: GenerationConfig, max_prompt_tokens: int | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[PreparedPrompt, Timings, DecodeState, DraftPrompt | None]:
        timings = Timings()
        # before any image is encoded: a bad schema costs nothing
        constraint = self.constraint(config)
        prompt = self.prepare(messages, config, max_prompt_tokens, cancel.is_set if cancel is not None else None)
        self.prompts.check_context(prompt)
        timings.preprocess_s = sum(im.preprocess_s for im in prompt.images)
        timings.vision_s = sum(im.vision_s for im in prompt.images)
        timings.prune_s = sum(im.prune_s for im in prompt.images)
        draft = self.draft.prepare(messages, config) if self.draft is not None and config.use_draft else None
        return prompt, timings, self._decode_state(prompt, config, constraint, draft), draft

    def _decode_state(
        self, prompt: PreparedPrompt, config: GenerationConfig, constraint: Any = None, draft: DraftPrompt | None = None
    ) -> DecodeState:
        """One answer's sampler, detokenizer and stop rules (and grammar state: a new one unless given; a
        draft proposer of its own when the draft model has a prompt for it)."""
        return DecodeState(
            self.model.tokenizer.stream(), config, self.eos_ids,
            history=prompt.token_ids.tolist() if config.repetition_penalty != 1.0 else (),
            max_tokens=self.model.max_context - prompt.position_end,
            constraint=constraint if constraint is not None else self.constraint(config),
            draft=self.draft.proposer(draft, len(prompt.keys)) if draft is not None else None,
        )  # fmt: skip

    def generate(self, prompt, images=(), config=None, cancel=None, *, videos=()) -> GenerationResult:
        """Run `stream` to the end and return the collected result (`videos`: files, bytes or frame lists)."""
        for chunk in self.stream(prompt, images, config, cancel, videos=videos):
            if chunk.result is not None:
                return chunk.result
        raise RuntimeError("generation ended without a result")  # unreachable: streams always finish

    def cancel(self) -> None:
        """Stop every running generation, whoever started it, before its next token.

        With several users, give each `stream` call its own cancel Event instead."""
        for event in list(self._cancels):
            event.set()

    def warnings(self) -> list[str]:
        """Things a user must know about this export (e.g. random demo weights)."""
        return self.model.export.notes

    def info(self) -> dict[str, Any]:
        return {
            "name": self.model.export.name,  # the hub id it came from, else the folder's name
            "model_dir": str(self.model.dir),
            "family": self.model.family.model_type,
            "model": self.model.export.describe(),  # architecture, vision tower, language model, what it takes
            "device": self.settings.device,
            "weights": self.model.stored_weights(),  # how each part's weights are stored (fp16, int4_sym g64 r0.6 + int8, ...)
            "vision_encoder": self.model.vision_choice()[1],  # which vision encoder runs and why (INT8-PTQ or float)
            "decode_steps": self.model.decode_why,  # on the main compilation or an f32 one, and why
            "dq_group": self.model.dq_why,  # the activation group of the LM's INT4 matmuls, and why
            "draft": self.draft.describe() if self.draft is not None else None,  # the draft model proposing tokens
            "export": self.model.export.info,
            "runtime": self.model.runtime_info(),
        }
