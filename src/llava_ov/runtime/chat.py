"""Conversations: history, images, context policy; KV reuse comes from the Pipeline's prefix cache.

Each turn renders the whole conversation with the model's chat template; the
pipeline keeps the KV cache of the longest prefix it shares with the previous
turn, so only the new tokens are prefilled.  When the history outgrows the
context, the oldest turns are dropped (the system prompt stays); a single turn
that cannot fit is an error and leaves the conversation unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from llava_ov.errors import ContextLengthError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import GenerationResult, Message, Pipeline, StreamChunk


class ChatSession:
    """A multi-turn conversation with one Pipeline."""

    def __init__(self, pipeline: Pipeline, system: str | None = None, truncate: bool = True):
        self.pipeline = pipeline
        self.system = system
        self.truncate = truncate
        self.messages: list[Message] = []
        self.dropped_turns = 0
        self.frames_per_video: int | None = None  # the first video turn's sampling, kept for the conversation

    @property
    def last_image(self) -> Any | None:
        """The most recent image in the conversation (what a follow-up question refers to)."""
        return self._last("images")

    @property
    def last_video(self) -> Any | None:
        """The most recent video in the conversation."""
        return self._last("videos")

    def _last(self, kind: str) -> Any | None:
        for message in reversed(self.messages):
            items = getattr(message, kind)
            if items:
                return items[-1]
        return None

    def reset(self) -> None:
        self.messages.clear()
        self.dropped_turns = 0
        self.frames_per_video = None

    def history(self) -> list[Message]:
        head = [Message("system", self.system)] if self.system else []
        return head + self.messages

    def stream(
        self,
        text: str,
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        videos: Sequence[Any] = (),
    ) -> Iterator[StreamChunk]:
        """Add a user turn, stream the answer, and keep it in the history (`progress` as Pipeline.stream)."""
        self.messages.append(Message("user", text, list(images), list(videos)))
        try:
            config = self._pinned_frames(config or GenerationConfig())
            self._fit_context(config)
            result = None
            for chunk in self.pipeline.stream(self.history(), config=config, cancel=cancel, progress=progress):
                result = chunk.result or result
                yield chunk
        except BaseException:
            self.messages.pop()  # a failed turn leaves the conversation as it was
            raise
        if videos and result is not None and result.video_frames and self.frames_per_video is None:
            self.frames_per_video = max(1, result.video_frames // sum(len(m.videos) for m in self.messages))
        self.messages.append(Message("assistant", result.text if result else ""))

    def _pinned_frames(self, config: GenerationConfig) -> GenerationConfig:
        """Later turns sample the conversation's videos as its first video turn did: with the frame count
        chosen to fit the context each turn, a longer history would mean fewer frames, another sampling,
        and no reuse of the cached prompt."""
        if self.frames_per_video is None or config.num_frames is not None or config.video_fps is not None:
            return config
        return replace(config, num_frames=self.frames_per_video)

    def ask(self, text: str, images: Sequence[Any] = (), config=None, cancel=None, *, videos=()) -> GenerationResult:
        result = None
        for chunk in self.stream(text, images, config, cancel, videos=videos):
            result = chunk.result or result
        assert result is not None
        return result

    def _fit_context(self, config: GenerationConfig) -> None:
        """Drop the oldest turns until the prompt leaves room to answer."""
        limit = self.pipeline.prompt_limit
        room = min(config.max_new_tokens, max(1, limit // 8))
        while True:
            size = self.pipeline.count_tokens(self.history(), config)
            if size + room <= limit or not self.truncate or not self._drop_oldest_turn():
                break
        if size >= limit:
            raise ContextLengthError(
                f"this message needs {size} tokens with its images and videos; the model's context (or KV cache) "
                f"holds {limit}"
            )

    def _drop_oldest_turn(self) -> bool:
        """Remove the oldest user turn (and its answer) that does not carry the latest image or video.

        Follow-up questions refer to the latest image or video, so its turn stays; False when
        nothing but the current turn and that turn is left."""
        last_image_turn = max((i for i, m in enumerate(self.messages) if m.images or m.videos), default=None)
        for i, message in enumerate(self.messages[:-1]):
            if message.role == "user" and i != last_image_turn:
                end = i + 1
                while end < len(self.messages) - 1 and self.messages[end].role != "user":
                    end += 1
                del self.messages[i:end]
                self.dropped_turns += 1
                return True
        return False
