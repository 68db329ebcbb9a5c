"""The paged backend: prompts become sequences of the continuous-batching `Engine`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.engine.core import Engine, Generation
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.generate import DecodeState, ForcedDecode
from llava_ov.runtime.model import ExportedModel

if TYPE_CHECKING:
    from llava_ov.runtime.prompts import PreparedPrompt


class PagedBackend:
    """Many sequences at once over the paged language model; the engine's admission is the only queue."""

    allows_pruning = True

    def __init__(self, model: ExportedModel, settings: LoadSettings | None = None):
        self.engine: Engine = Engine(model.paged, model.max_context, settings)

    @property
    def max_concurrency(self) -> int:
        return self.engine.config.max_running

    @property
    def prompt_limit(self) -> int:
        return self.engine.token_limit

    def limit_reason(self) -> str:
        return self.engine.limit_reason()

    def submit(self, prompt: PreparedPrompt, state: DecodeState | ForcedDecode,
               cancel: threading.Event | None = None, after: Generation | None = None) -> Generation:  # fmt: skip
        rows, features = prompt.image_rows()
        return self.engine.submit(prompt.keys, prompt.token_ids, rows, features, state, cancel, prompt.positions, after)

    def occupancy(self) -> tuple[int, int]:
        return self.engine.occupancy()

    def prefill(self, prompt: PreparedPrompt) -> tuple[np.ndarray, int]:
        raise _stateful_only("Pipeline.prefill")

    def step(self, token_id: int) -> np.ndarray:
        raise _stateful_only("Pipeline.step")

    def reset(self) -> None:
        """Forget the engine's idle prefix blocks."""
        self.engine.clear_prefix_cache()

    def close(self) -> None:
        self.engine.close()


def _stateful_only(what: str) -> LlavaOvError:
    return LlavaOvError(f"{what} needs the stateful KV cache: load with kv_cache='stateful'")
