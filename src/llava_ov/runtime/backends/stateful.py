"""The stateful backend (the NPU path): the export's own stateful language model, one sequence at a time.

Submissions wait in arrival order for one thread that runs them: prefill what the KV state
lacks of the prompt (it keeps the longest prefix shared with the previous sequence, trimming
the rest), then one forward per token. Its lock guards the model's KV state and is the only
one it needs; handles are the same as the engine's, so callers cannot tell the backends apart.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.engine.core import close_at_exit
from llava_ov.runtime.features import merge_embeddings
from llava_ov.runtime.generate import DecodeState, ForcedDecode, TokenEvent
from llava_ov.runtime.handle import Failed, Finished, Handle
from llava_ov.runtime.model import ExportedModel

if TYPE_CHECKING:
    from llava_ov.runtime.prompts import PreparedPrompt

log = logging.getLogger(__name__)


class StatefulBackend:
    """Sequences run one after another through the stateful model, with prefix reuse between them."""

    engine = None
    allows_pruning = False  # the stateful model takes consecutive positions only
    max_concurrency = 1

    def __init__(self, model: ExportedModel):
        self.model = model
        self._keys = np.empty(model.max_context + 1, np.int64)  # what the KV state holds, by position
        self._lock = threading.Lock()  # the model's KV state and `_keys`: one sequence at a time
        self._inbox: queue.SimpleQueue[tuple[Handle, PreparedPrompt] | None] = queue.SimpleQueue()
        self._current: Handle | None = None
        self._stopping = False
        self._door = threading.Lock()  # submit vs close: nothing enters the inbox after the thread's last look
        self._thread: threading.Thread | None = None  # started by the first submission (an unused backend is freed)

    @property
    def prompt_limit(self) -> int:
        return self.model.max_context

    def limit_reason(self) -> str:
        return "the model's context is"

    def submit(self, prompt: PreparedPrompt, state: DecodeState | ForcedDecode,
               cancel: threading.Event | None = None, after: Handle | None = None) -> Handle:  # fmt: skip
        """One sequence at a time: a prompt submitted `after` the same one reuses its KV by prefix anyway."""
        handle = Handle(state, cancel)
        with self._door:
            if self._stopping:
                raise LlavaOvError("the pipeline is closed")
            self._start_thread()
            self._inbox.put((handle, prompt))
        return handle

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llava-ov-stateful", daemon=True)
            close_at_exit(self)
            self._thread.start()

    def occupancy(self) -> tuple[int, int]:
        return int(self._current is not None), self._inbox.qsize()

    def prefill(self, prompt: PreparedPrompt) -> tuple[np.ndarray, int]:
        """Feed what the cache lacks of `prompt`; returns (last logits, reused prefix length)."""
        with self._lock:
            return self._prefill(prompt)

    def step(self, token_id: int) -> np.ndarray:
        """One forward of `token_id` after the cached sequence; returns next-token logits."""
        with self._lock:
            return self._step(token_id)

    def reset(self) -> None:
        """Forget the KV state."""
        with self._lock:
            self.model.reset()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what runs and waits, and stop the thread."""
        with self._door:
            self._stopping = True
            self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                break
            handle, prompt = job
            self._current = handle
            try:
                self._generate(handle, prompt)
            except Exception as exc:  # never let the thread die: fail this sequence, keep serving
                if not isinstance(exc, LlavaOvError):
                    log.exception("stateful generation failed")
                self._fail(handle, exc)
            finally:
                self._current = None
        while not self._inbox.empty():  # submitted before the close: they end cancelled, never run
            job = self._inbox.get()
            if job is not None:
                self._end(job[0], job[0].state.cancel())

    def _generate(self, handle: Handle, prompt: PreparedPrompt) -> None:
        state, cancel = handle.state, handle.cancel_event
        if cancel.is_set() or self._stopping:  # cancelled while it waited: costs nothing
            self._end(handle, state.cancel())
            return
        handle.stats.scheduled_at = time.perf_counter()
        with self._lock:
            logits, handle.stats.cached_tokens = self._prefill(prompt)
            handle.stats.first_token_at = time.perf_counter()
            while True:
                event = state.cancel() if cancel.is_set() or self._stopping else state.next(logits)
                if event.finish_reason is not None:
                    self._end(handle, event)
                    return
                handle.put(event)
                logits = self._step(event.token_id)

    def _end(self, handle: Handle, event: TokenEvent) -> None:
        handle.done = True
        handle.put(event)
        handle.put(Finished())

    def _fail(self, handle: Handle, error: BaseException) -> None:
        handle.done = True
        handle.put(Failed(error))

    def _step(self, token_id: int) -> np.ndarray:
        self._keys[self.model.kv_len] = token_id  # valid once forward advances kv_len
        return self.model.forward(self.model.embed_tokens(np.array([token_id])))

    def _prefill(self, prompt: PreparedPrompt) -> tuple[np.ndarray, int]:
        reuse = common_prefix(self._keys[: self.model.kv_len], prompt.keys)
        reuse = min(reuse, len(prompt.keys) - 1)  # the last position must run to give logits
        self.model.trim(reuse)
        suffix = prompt.token_ids[reuse:]
        embeds = self.model.embed_tokens(suffix)
        image_mask = prompt.keys[reuse:] < 0
        if image_mask.any():
            visible = image_features_from(prompt, reuse)
            embeds = merge_embeddings(embeds, image_mask, visible)
        try:
            logits = self.model.forward(embeds)
        except BaseException:
            self.model.reset()
            raise
        self._keys[: len(prompt.keys)] = prompt.keys
        return logits, reuse


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the shared prefix of two 1-D arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def image_features_from(prompt: PreparedPrompt, start: int) -> list[np.ndarray]:
    """The image features for positions >= start, in order (an image may be cut by the reused prefix)."""
    out, pos = [], 0
    image_iter = iter(prompt.images)
    keys = prompt.keys
    while pos < len(keys):
        if keys[pos] >= 0:
            pos += 1
            continue
        image = next(image_iter)
        end = pos + len(image.features)
        if end > start:
            out.append(image.features[max(0, start - pos) :])
        pos = end
    return out
