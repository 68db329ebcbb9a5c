"""A draft model: a smaller export with the same tokenizer proposes the tokens the target verifies.

The draft sees the image through **its own vision pass**: it prepares the same messages with its own
prompt builder (its template, its image processing and token counts, its features), because a
draft of another family or width cannot take the target's features. Its prompt tokens therefore
differ from the target's; the answer tokens are the same ids (the vocabularies must be equal).

Each answer has a `DraftProposer`: the draft's tokens (its prompt, then the answer as the target
keeps it) and their keys/values in blocks of the draft's own pool. The draft prefills its prompt
CATCH_UP_TOKENS a step while the target prefills its own (a draft far smaller than its target keeps
up). Before proposing it rolls back to the longest prefix of its answer the target kept — a paged KV
needs nothing else: positions past the computed length are overwritten — computes what is new (again
at most CATCH_UP_TOKENS a step, proposing nothing until it has caught up), then proposes up to k
tokens greedily, one draft forward each: one more than the target kept last time (so a draft that
rarely agrees tries one token, after a rest of 1, 2, 4 ... 256 steps; the misses in a row are counted
over answers, so a new answer of a draft that keeps missing starts resting). Greedy proposals are deterministic, so the
engine's verification keeps answers exactly those of plain decoding (runtime/speculative.py).
Proposals run in the engine thread, one sequence after another (not batched across sequences), so the
draft proposes only while at most `--draft-max-running` answers use it (vLLM's
speculative_disable_by_batch_size): at more, its forwards would cost more than they save.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.engine.core import forward_batch
from llava_ov.runtime.engine.kvcache import BlockPool, PoolExhausted, block_hashes
from llava_ov.runtime.engine.scheduler import Chunk, Sequence
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.prompts import Message, PromptBuilder
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.speculative import Backoff

log = logging.getLogger(__name__)

CATCH_UP_TOKENS = 256  # draft positions computed per engine step while it catches up (its prompt)
LONGEST_REST = 256  # steps a draft whose proposals keep missing rests, at most
PROBE_TEXT = "Describe the image: 3 cats, ½ a sandwich — naïve café, 東京, emoji 🙂, code `x = f(y)`.\n"


@dataclass
class DraftPrompt:
    """The draft's own prompt for one request: token ids, image rows/features, position ids."""

    ids: np.ndarray
    keys: np.ndarray  # the prompt's cache keys (images as their content keys): its full blocks are shared
    image_rows: np.ndarray
    features: np.ndarray
    positions: np.ndarray | None


def draft_settings(settings: LoadSettings) -> LoadSettings:
    """How the draft loads: the target's device, properties, cache and vision choices; the paged KV;
    one compilation (its decode steps are small); no draft of its own; no per-part overrides."""
    return LoadSettings(
        device=settings.device_for("language"), properties=settings.properties, cache_dir=settings.cache_dir,
        vision_encoder=settings.vision_encoder, kv_cache="paged", decode_precision="same",
        vision_threads=settings.vision_threads,
    )  # fmt: skip


def check_same_vocabulary(target: ExportedModel, draft: ExportedModel) -> None:
    """The draft's token ids must mean what the target's mean (LlavaOvError naming the difference)."""
    ours, theirs = target.tokenizer.pieces, draft.tokenizer.pieces
    if ours is not None and theirs is not None:
        if ours.pieces != theirs.pieces:
            size_a, size_b = len(ours.pieces), len(theirs.pieces)
            raise LlavaOvError(
                f"the draft model {draft.dir.name} has another vocabulary than {target.dir.name} "
                f"({size_b} vs {size_a} tokens{'' if size_a != size_b else ', different pieces'}): a draft needs the "
                "target's tokenizer"
            )
        return
    if not np.array_equal(target.tokenizer.encode(PROBE_TEXT), draft.tokenizer.encode(PROBE_TEXT)):
        raise LlavaOvError(f"the draft model {draft.dir.name} tokenizes text unlike {target.dir.name}: a draft needs "
                           "the target's tokenizer")  # fmt: skip


class DraftModel:
    """A loaded draft export, its KV block pool and its prompt builder (the `Limits` of its prompts)."""

    allows_pruning = True

    def __init__(self, target: ExportedModel, settings: LoadSettings, pool_tokens: int):
        if settings.draft is None:
            raise LlavaOvError("no draft model was given")
        self.model = ExportedModel(settings.draft, draft_settings(settings))
        check_same_vocabulary(target, self.model)
        self.tokens = settings.draft_tokens
        self.max_running = settings.draft_max_running
        self.running = 0  # answers that started drafting and have not ended (engine thread)
        self.vocab = min(int(target.text_config["vocab_size"]), int(self.model.text_config["vocab_size"]))
        self.lm = self.model.paged
        one_context = -(-self.model.max_context // self.lm.block_size)
        blocks = max(one_context, -(-pool_tokens // self.lm.block_size))
        self.lm.allocate(blocks)
        self.pool = BlockPool(blocks, self.lm.block_size)
        self.prompts = PromptBuilder(self.model, self)
        self._clear = False  # forget idle cached prompt blocks before the next answer starts (engine thread)
        self.misses = 0  # proposals in a row, over all answers, of which nothing was kept (engine thread)

    def first_rest(self) -> int:
        """Steps a new answer waits before its first proposal: none while the draft's proposals are kept, else
        as long as the misses in a row say (1, 2, 4 ... LONGEST_REST): a draft that never agrees costs ~nothing."""
        return 0 if not self.misses else min(LONGEST_REST, 2 ** min(self.misses - 1, 16))

    def learn(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.misses = 0 if accepted else self.misses + 1

    def clear_cache(self) -> None:
        """Forget the draft's cached prompt blocks (done when the next answer starts: the pool is the engine
        thread's)."""
        self._clear = True

    def take_cached(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (engine thread)."""
        if self._clear:
            self.pool.clear_cache()
            self._clear = False
        return self.pool.match(hashes)

    @property
    def prompt_limit(self) -> int:
        return min(self.model.max_context, self.pool.num_blocks * self.pool.block_size)

    def limit_reason(self) -> str:
        return "the draft model's context is"

    def describe(self) -> dict[str, Any]:
        return {"model_dir": str(self.model.dir), "family": self.model.family.model_type,
                "tokens_per_step": self.tokens, "kv_blocks": self.pool.num_blocks}  # fmt: skip

    def prepare(self, messages: Seq[Message], config: GenerationConfig) -> DraftPrompt | None:
        """The draft's prompt for these messages (its own vision pass), or None when it cannot take them
        (too long for its context, ...): that request then runs without drafts."""
        try:
            prompt = self.prompts.prepare(messages, config)
        except LlavaOvError as exc:
            log.info("no draft for this request: %s", exc)
            return None
        rows, features = prompt.image_rows()
        return DraftPrompt(prompt.token_ids, prompt.keys, rows, features, prompt.positions)

    def proposer(self, prompt: DraftPrompt, target_prompt_len: int) -> DraftProposer:
        return DraftProposer(self, prompt, target_prompt_len)


class DraftProposer:
    """One answer's draft: catches up with the tokens the target kept, then proposes greedily."""

    def __init__(self, draft: DraftModel, prompt: DraftPrompt, target_prompt_len: int):
        self.draft = draft
        self.skip = target_prompt_len  # the target's context holds its prompt first: the answer follows
        self.seq = Sequence(prompt.ids, prompt.ids, prompt.image_rows, prompt.features,
                            capacity=draft.prompt_limit, positions=prompt.positions)  # fmt: skip
        self.seq.keys = self.seq.ids  # the draft needs no cache keys: its blocks are its own
        self.backoff = Backoff(LONGEST_REST, draft.first_rest())
        self.length = draft.tokens  # tokens the next proposal drafts (adapts to what the target keeps)
        self.off = False  # the draft's context or pool is full, or the answer left its vocabulary
        self.hashes = block_hashes(prompt.keys, draft.pool.block_size)  # of the prompt's full blocks
        self.published = 0  # prompt blocks named in the pool's prefix cache
        self.started = self.ended = False

    def propose(self, context: np.ndarray, room: int) -> list[int]:
        """Up to `room` (and the draft's tokens per step) greedy tokens after `context` (the target's keys)."""
        self._start()
        if self.off or not self._follow(context[self.skip :]):
            return []
        if self.backoff.resting() or self.draft.running > self.draft.max_running:
            return []
        seq = self.seq
        room = min(room, self.length, seq.capacity - seq.length)
        if room <= 0:
            return []
        if seq.remaining > CATCH_UP_TOKENS:  # a long prompt: prefill part of it and propose next time
            self._forward(seq.computed, CATCH_UP_TOKENS)
            return []
        logits = self._forward(seq.computed, seq.remaining)
        proposed: list[int] = []
        while logits is not None:
            token = int(np.argmax(logits[: self.draft.vocab]))
            proposed.append(token)
            seq.propose(proposed)
            if len(proposed) == room:
                break
            logits = self._forward(seq.length + len(proposed) - 1, 1, written=len(proposed))
        return proposed

    def prepare(self) -> None:
        """One chunk of the draft's prompt, while the target's prompt prefills."""
        seq = self.seq
        self._start()
        if not self.off and seq.computed < seq.prompt_len:
            self._forward(seq.computed, min(CATCH_UP_TOKENS, seq.prompt_len - seq.computed))

    def verified(self, proposed: int, accepted: int) -> None:
        """Draft one more token after a proposal kept whole, one more than was kept after a partial one, and
        one (after a rest) after a full miss: a draft that rarely agrees costs one draft forward a try."""
        self.backoff.verified(proposed, accepted)
        self.draft.learn(proposed, accepted)
        if proposed:
            self.length = min(self.draft.tokens, accepted + 1)

    def release(self) -> None:
        """Give the draft's blocks back (the answer ended); its prompt's full blocks stay cached."""
        self.draft.pool.release(self.seq.blocks)
        self.seq.blocks, self.seq.computed, self.published = [], 0, 0
        if self.started and not self.ended:
            self.ended = True
            self.draft.running -= 1

    def _start(self) -> None:
        """On first use: start from the prompt's blocks the draft's pool has cached (n answers, turns)."""
        if self.started:
            return
        self.started = True
        self.draft.running += 1
        seq = self.seq
        seq.blocks = self.draft.take_cached(self.hashes[: (seq.prompt_len - 1) // self.draft.pool.block_size])
        seq.computed = self.published = len(seq.blocks) * self.draft.pool.block_size

    def _publish(self) -> None:
        """Name the prompt's blocks that became full (they are never written again: answers follow them)."""
        seq, size = self.seq, self.draft.pool.block_size
        for index in range(self.published // size, min(seq.computed, seq.prompt_len) // size):
            seq.blocks[index] = self.draft.pool.publish(seq.blocks[index], self.hashes[index])
            self.published = (index + 1) * size

    def _follow(self, answer: np.ndarray) -> bool:
        """Make the draft's answer the target's (kept) answer: keep the computed positions of the common
        prefix, drop the rest. False (and off) when it no longer fits or leaves the draft's vocabulary."""
        seq = self.seq
        start = seq.prompt_len
        if start + len(answer) >= seq.capacity or (len(answer) and int(answer.max()) >= self.draft.vocab):
            self._stop()
            return False
        known = seq.ids[start : start + len(answer)]
        differs = np.flatnonzero(known != answer)
        common = int(differs[0]) if len(differs) else len(answer)
        seq.ids[start : start + len(answer)] = answer
        seq.length, seq.draft = start + len(answer), 0
        # the last known position always runs again: its logits give the first proposal (when the target kept
        # nothing new since the last proposal, e.g. its step was preempted, everything else is computed)
        seq.computed = min(seq.computed, start + common, seq.length - 1)
        return True

    def _forward(self, start: int, count: int, written: int = 0) -> np.ndarray | None:
        """Compute `count` draft positions from `start`; the logits of the last one (None if the pool is full).
        `written`: proposals already written after the known tokens (they count as known for this forward)."""
        seq = self.seq
        need = -(-(start + count) // self.draft.pool.block_size)
        try:
            while len(seq.blocks) < need:
                seq.blocks.append(self.draft.pool.allocate())
        except PoolExhausted:
            log.info("the draft model's KV pool is full: this answer goes on without drafts")
            self._stop()
            return None
        length, seq.length = seq.length, seq.length + written  # the chunk's last position gets logits
        try:
            chunk = Chunk(seq, start, count)
            logits = self.draft.lm.forward(forward_batch([chunk], self.draft.pool.block_size))
        finally:
            seq.length = length
        seq.computed = start + count
        self._publish()
        return logits[-1] if len(logits) else None

    def _stop(self) -> None:
        self.off = True
        self.release()
