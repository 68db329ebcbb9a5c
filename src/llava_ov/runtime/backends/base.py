"""The interface every backend implements (genai's VLMBackend split; vLLM's engine client)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

import numpy as np

from llava_ov.runtime.generate import DecodeState, ForcedDecode
from llava_ov.runtime.handle import Handle

if TYPE_CHECKING:
    from llava_ov.runtime.engine.core import Engine
    from llava_ov.runtime.prompts import PreparedPrompt


class Backend(Protocol):
    engine: Engine | None  # the paged engine, or None
    allows_pruning: bool  # pruned image tokens leave gaps in position ids: only the engine takes them

    @property
    def max_concurrency(self) -> int:
        """How many sequences make progress at once."""

    @property
    def prompt_limit(self) -> int:
        """The most tokens a prompt plus its answer may take."""

    def limit_reason(self) -> str:
        """What sets `prompt_limit`, for error messages ("the model's context is", ...)."""

    def submit(self, prompt: PreparedPrompt, state: DecodeState | ForcedDecode,
               cancel: threading.Event | None = None, after: Handle | None = None) -> Handle:  # fmt: skip
        """Queue `prompt`; `state` samples (or forces) its tokens. Never blocks on other sequences.
        `after`: a handle of the same prompt submitted before, whose prefill this one reuses."""

    def occupancy(self) -> tuple[int, int]:
        """(running, waiting): sequences being computed, and those submitted but not started."""

    def prefill(self, prompt: PreparedPrompt) -> tuple[np.ndarray, int]:
        """Stateful only: feed what the cache lacks of `prompt`; (last logits, reused prefix length)."""

    def step(self, token_id: int) -> np.ndarray:
        """Stateful only: one forward of `token_id` after the cached sequence; next-token logits."""

    def reset(self) -> None:
        """Forget cached KV."""

    def close(self) -> None:
        """Stop the backend's thread (cancels what runs)."""
