"""The engine: one thread that runs many generations over one paged language model.

Clients `submit` a prepared prompt (token ids, cache keys, image features) with its own
generation settings and read a `Generation` handle (runtime/handle.py): a thread-safe stream of progress, token
and final events. The engine thread loops: take new submissions, drop cancelled ones, ask the
scheduler for the next forward (decode tokens of running sequences plus prefill chunks),
run it (token ids and image features go in; the LM embeds the ids), sample every sequence that reached its last position, and publish the KV
blocks that became full to the prefix cache. It is the only place in the project that owns
concurrency: front ends submit and read.

A decoding sequence may carry proposed tokens (grammar jump-forward, prompt lookup:
runtime/speculative.py): the forward computes them beside its last token, every one of those
positions returns logits, and the sequence keeps the proposals while its sampler picks them. The
first one it does not pick is replaced by the sampled token; the KV of the rest is dropped (the
verified positions alone are cached and published, blocks held only for them are given back).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

import numpy as np

from llava_ov.common import hardware
from llava_ov.errors import ContextLengthError, LlavaOvError
from llava_ov.runtime.generate import DecodeState, TokenEvent
from llava_ov.runtime.handle import Failed, Finished, Handle, Progress
from llava_ov.runtime.engine.kvcache import BlockPool
from llava_ov.runtime.engine.paged import ForwardBatch, PagedLanguageModel
from llava_ov.runtime.engine.scheduler import Chunk, Scheduler, Sequence
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.speculative import SpeculationStats

log = logging.getLogger("llava_ov.runtime.engine.core")

DEFAULT_KV_CACHE_GB = 4.0  # at most; also at most a quarter of the memory available at load time
CONTEXTS_IN_POOL = 16  # the default pool holds at most this many full contexts (small models)


class Generation(Handle):
    """A client's handle on one sequence of the engine (`for` or `async for` over its events)."""

    sequence: Any = None  # the engine's Sequence (for `Engine.submit(after=...)`)


def default_pool_blocks(lm: PagedLanguageModel, kv_cache_gb: float | None, max_context: int) -> int:
    """Blocks within the budget: the given GiB, else min(4 GiB, a quarter of available memory,
    CONTEXTS_IN_POOL full contexts); never less than one full context."""
    one_context = -(-max_context // lm.block_size)
    if kv_cache_gb is not None:
        return max(1, int(kv_cache_gb * 2**30 // lm.bytes_per_block))
    budget = min(DEFAULT_KV_CACHE_GB * 2**30, hardware.available_memory() / 4)  # available: capped by a cgroup limit
    return max(one_context, min(int(budget // lm.bytes_per_block), CONTEXTS_IN_POOL * one_context))


def forward_batch(plan: list[Chunk], block_size: int) -> ForwardBatch:
    """The packed forward of a plan's chunks: their tokens side by side, the image features of the prompt
    positions they cover, and logits at each chunk's `rows` last positions."""
    ids = np.concatenate([c.seq.ids[c.start : c.start + c.count] for c in plan])
    image_rows, image_embeds, offset = [], [], 0
    for c in plan:
        if c.start < c.seq.prompt_len and len(c.seq.features):  # only prompts hold image positions
            rows = c.seq.image_rows[c.start : min(c.start + c.count, c.seq.prompt_len)]
            at = np.flatnonzero(rows >= 0)
            if len(at):
                image_rows.append(offset + at)
                image_embeds.append(c.seq.features[rows[at]])
        offset += c.count
    ends = np.cumsum([c.count for c in plan])
    return ForwardBatch(
        ids=ids,
        positions=np.concatenate([c.seq.position_ids(c.start, c.count) for c in plan]),
        past_lens=[c.start for c in plan],
        chunk_lens=[c.count for c in plan],
        block_tables=[c.seq.blocks[: -(-(c.start + c.count) // block_size)] for c in plan],
        logits_rows=[row for c, end in zip(plan, ends) for row in range(int(end) - c.rows, int(end))],
        image_rows=np.concatenate(image_rows) if image_rows else np.zeros(0, np.int64),
        image_embeds=np.concatenate(image_embeds) if image_embeds else None,
    )


_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(engine: Any) -> None:
    """Stop a backend's thread (anything with `close()`) before the interpreter finalizes: a daemon
    thread that comes back from an OpenVINO call during finalization is unwound through C++ frames,
    and the process aborts."""
    if not hasattr(_close_all, "registered"):
        atexit.register(_close_all)
        _close_all.registered = True  # type: ignore[attr-defined]
    _LIVE_ENGINES.add(engine)


def _close_all() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close()


class Engine:
    """Continuous batching over a `PagedLanguageModel`."""

    def __init__(self, lm: PagedLanguageModel, max_context: int, config: LoadSettings | None = None):
        self.lm = lm
        self.max_context = max_context
        self.config = (config or LoadSettings()).validate()  # reads kv_cache_gb, max_step_tokens, max_running
        num_blocks = default_pool_blocks(lm, self.config.kv_cache_gb, max_context)
        lm.allocate(num_blocks)
        self.pool = BlockPool(num_blocks, lm.block_size)
        self.scheduler = Scheduler(self.pool, self.config.max_step_tokens, self.config.max_running)
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clear_cache = False
        self._outbox: list[tuple[Generation, Any]] = []  # events sent while the next forward runs
        self.steps = 0
        self.infer_s = 0.0  # time inside OpenVINO (the LM forwards): the rest is Python overhead
        self.prefilled_tokens = 0  # prompt positions computed (not found in the prefix cache)
        self.speculation = SpeculationStats()  # tokens proposed and kept, over every sequence

    # ---------------------------------------------------------------- clients

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    @property
    def token_limit(self) -> int:
        """The most tokens one sequence may hold: the context, or the whole pool if that is smaller."""
        return min(self.max_context, self.capacity_tokens)

    def limit_reason(self) -> str:
        return "the model's context is" if self.token_limit == self.max_context else (
            "the KV cache (raise --kv-cache-gb) holds")

    def submit(
        self,
        keys: np.ndarray,
        ids: np.ndarray,
        image_rows: np.ndarray,
        features: np.ndarray,
        state: DecodeState,
        cancel: threading.Event | None = None,
        positions: np.ndarray | None = None,
        after: Generation | None = None,
    ) -> Generation:
        """Queue one sequence; its tokens are capped by the context and the pool's size.

        `positions`: the prompt's position ids when they are not 0..n-1 (pruned image tokens).
        `after`: a generation of the same prompt submitted before: this one is admitted once that one
        has prefilled, and starts from its KV blocks in the prefix cache (n answers, one prefill)."""
        prompt = len(keys)
        room = self.token_limit - prompt
        if room < 1:
            raise ContextLengthError(f"the prompt is {prompt} tokens; {self.limit_reason()} {self.token_limit} tokens")
        state.limit = min(state.limit, room)
        handle = Generation(state, cancel or threading.Event())
        seq = Sequence(
            keys, ids, image_rows, features, capacity=prompt + state.limit, payload=handle, positions=positions,
            leader=after.sequence if after is not None else None,
        )
        handle.sequence = seq
        with self._wake:
            if self._stopping:
                raise LlavaOvError("the engine is shut down")
            self._inbox.append(seq)
            self._start_thread()
            self._wake.notify()
        return handle

    def clear_prefix_cache(self) -> None:
        """Forget cached blocks nobody holds (done by the engine thread before its next step)."""
        with self._wake:
            self._clear_cache = True
            self._wake.notify()

    def occupancy(self) -> tuple[int, int]:
        """(running, waiting): sequences being computed, and those submitted but not yet admitted."""
        return len(self.scheduler.running), len(self.scheduler.waiting) + len(self._inbox)

    def stats(self) -> dict[str, Any]:
        running, waiting = self.occupancy()
        return {
            "running": running, "waiting": waiting,
            "blocks_total": self.pool.num_blocks, "blocks_used": self.pool.used, "block_size": self.pool.block_size,
            "blocks_cached_idle": len(self.pool.idle), "prefix_hit_blocks": self.scheduler.cached_blocks,
            "preemptions": self.scheduler.preemptions, "steps": self.steps, "prefilled_tokens": self.prefilled_tokens,
            "proposed_tokens": self.speculation.proposed, "accepted_tokens": self.speculation.accepted,
        }  # fmt: skip

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            close_at_exit(self)
            self._thread = threading.Thread(target=self._run, name="llava-ov-engine", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- the loop

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self.scheduler.has_work() or self._stopping or self._clear_cache):
                    self._deliver()
                    self._wake.wait()
                if self._stopping:
                    break
                for seq in self._inbox:
                    self.scheduler.add(seq)
                self._inbox.clear()
                if self._clear_cache:
                    self.pool.clear_cache()
                    self._clear_cache = False
            try:
                self._step()
            except Exception as exc:  # never let the thread die: fail what ran, keep serving
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._fail(seq, exc)
                self._deliver()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting) + self._inbox:
            self._finish(seq, seq.payload.state.cancel())
        self._deliver()

    def _send(self, handle: Generation, event: Any) -> None:
        """Queue an event for a client; `_deliver` hands them over."""
        self._outbox.append((handle, event))

    def _deliver(self) -> None:
        """Hand queued events to their clients.

        Called while the next forward runs (and whenever the engine would wait): a client thread
        woken by an event then takes the GIL while OpenVINO computes, not between two forwards."""
        outbox, self._outbox = self._outbox, []
        for handle, event in outbox:
            handle.put(event)

    def _step(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.payload.cancel_event.is_set():
                self._finish(seq, seq.payload.state.cancel())
        self._propose()
        plan = self.scheduler.schedule()
        if not plan:  # nothing can run now (cannot happen while the pool holds any sequence alone)
            self._deliver()
            time.sleep(0.005)
            return
        now = time.perf_counter()
        for chunk in plan:
            stats = chunk.seq.payload.stats
            if stats.scheduled_at is None:
                stats.scheduled_at, stats.cached_tokens = now, chunk.seq.cached
        started = time.perf_counter()
        try:
            logits = self.lm.forward(forward_batch(plan, self.pool.block_size), while_running=self._deliver)
        except Exception as exc:
            self._deliver()
            for chunk in plan:
                self._fail(chunk.seq, exc)
            if not isinstance(exc, LlavaOvError):
                log.exception("forward failed")
            return
        self.steps += 1
        self.infer_s += time.perf_counter() - started
        self.prefilled_tokens += sum(max(0, min(c.start + c.count, c.seq.prompt_len) - c.start) for c in plan)
        sampled = [c for c in plan if c.sample]
        for chunk in plan:
            if not chunk.sample:
                self.scheduler.advance(chunk)
                if chunk.seq.computed <= chunk.seq.prompt_len:
                    self._send(chunk.seq.payload, Progress(chunk.seq.computed, chunk.seq.prompt_len))
        ends = np.cumsum([c.rows for c in sampled])
        for chunk, end in zip(sampled, ends):
            self._verify(chunk, logits[end - chunk.rows : end])

    def _propose(self) -> None:
        """Let every decoding sequence propose tokens to verify in the next forward (most propose none), and
        every prefilling one prepare its proposers. Proposals are optional: a proposer that fails only costs
        its sequence this step's proposals."""
        for seq in self.scheduler.running:
            tokens: list[int] = []
            try:
                if seq.remaining == 1:
                    tokens = seq.payload.state.proposals(seq.keys[: seq.length], seq.capacity - seq.length)
                else:  # its prompt is prefilling: a draft model prefills its own beside it
                    seq.payload.state.prepare_proposals()
            except Exception:
                log.exception("proposing tokens failed; this step decodes one token")
            seq.propose(tokens)

    def _verify(self, chunk: Chunk, rows: np.ndarray) -> None:
        """Sample the chunk's sequence at its last known position and at each proposed one while the sampled
        token equals the proposal; cache the verified positions; end the sequence if a token ended it."""
        seq, handle = chunk.seq, chunk.seq.payload
        proposed, seq.draft = seq.draft, 0
        known, accepted, final = seq.length, 0, None
        if handle.stats.first_token_at is None:
            handle.stats.first_token_at = time.perf_counter()
        try:
            for i, row in enumerate(rows):
                event = handle.state.next(row)
                if event.finish_reason is not None:
                    final = event
                    break
                kept = i < proposed and seq.keys[seq.length] == event.token_id  # the proposal at this position
                seq.append(event.token_id)
                self._send(handle, event)
                if not kept:
                    break
                accepted += 1
        except Exception as exc:  # one sequence's sampler or grammar failed: only it ends
            log.exception("sampling failed")
            self._fail(seq, exc)
            return
        handle.state.verified(proposed, accepted)
        self.speculation.add(proposed, accepted)
        chunk.count = known - chunk.start + accepted  # the proposals kept are verified positions
        self.scheduler.advance(chunk)
        if final is not None:
            self._finish(seq, final)
        else:
            self.scheduler.trim(seq)

    def _finish(self, seq: Sequence, event: TokenEvent) -> None:
        seq.payload.stats.preemptions = seq.preemptions
        self._end(seq, event, Finished())

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self._end(seq, Failed(error))

    def _end(self, seq: Sequence, *events: Any) -> None:
        """Release the sequence and send its last events (once, however it ended)."""
        self.scheduler.remove(seq)
        try:
            seq.payload.state.release()
        except Exception:  # what a proposer holds is its own: a failure here must not keep the answer open
            log.exception("releasing a sequence's proposers failed")
        if not seq.payload.done:
            seq.payload.done = True
            for event in events:
                self._send(seq.payload, event)
