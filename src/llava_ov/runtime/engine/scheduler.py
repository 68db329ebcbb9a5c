"""Which tokens of which sequences go into the next forward (continuous batching, chunked prefill).

Every step has a token budget. Running sequences that are decoding get their one token
first, then sequences still prefilling get chunks of their prompt, then waiting sequences are
admitted in arrival order while the budget, the sequence limit and the block pool allow it.
A new sequence starts from the longest prefix the block pool has cached. When a running
sequence needs a block and none is left, the most recently admitted sequence is preempted:
its blocks are released (their full blocks stay cached) and it waits again at the head of the
queue, to be recomputed later. Nothing here touches OpenVINO; the engine runs the plan.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_ov.runtime.engine.kvcache import BlockPool, PoolExhausted, block_hashes

_ids = itertools.count()


@dataclass(eq=False)  # compared by identity
class Sequence:
    """One generation's tokens and KV blocks.

    `keys` names every known position (token id, or an image's negative content key);
    `ids` holds what is embedded there (the image token id at image positions, whose
    embeddings come from `features` rows `image_rows`)."""

    keys: np.ndarray
    ids: np.ndarray
    image_rows: np.ndarray  # per prompt position: row in `features`, or -1
    features: np.ndarray  # [image tokens, hidden]
    capacity: int  # prompt + the most tokens it may generate
    payload: Any = None  # the engine's per-sequence state
    positions: np.ndarray | None = None  # prompt position ids when they have gaps (pruned image tokens)
    id: int = field(default_factory=lambda: next(_ids))
    length: int = 0  # known positions (prompt + generated so far)
    computed: int = 0  # positions whose keys/values are in `blocks`
    cached: int = 0  # prompt positions found in the prefix cache at the first admission
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # content hashes of the published full blocks
    preemptions: int = 0
    admitted: bool = False
    leader: Sequence | None = None  # same prompt, submitted first: admitted once it has prefilled (n answers)
    ended: bool = False  # finished or cancelled (a follower stops waiting for it)
    draft: int = 0  # proposed tokens written after the known ones, verified in the next forward

    def __post_init__(self) -> None:
        prompt = len(self.keys)
        self.length = prompt
        self.keys = _grow(self.keys, self.capacity)
        self.ids = _grow(self.ids, self.capacity)

    @property
    def prompt_len(self) -> int:
        return len(self.image_rows)

    @property
    def ready(self) -> bool:
        """Admissible: no leader, or the leader's prompt is in its published KV blocks (or it ended)."""
        return self.leader is None or self.leader.ended or self.leader.computed >= self.leader.prompt_len

    @property
    def remaining(self) -> int:
        return self.length - self.computed

    def position_ids(self, start: int, count: int) -> np.ndarray:
        """Position ids of `count` positions from `start`: 0..n-1, or the prompt's own ids and after them
        consecutive ones."""
        index = np.arange(start, start + count)
        if self.positions is None:
            return index
        prompt = self.prompt_len
        after = int(self.positions[-1]) + 1 - prompt if prompt else 0  # the shift of generated positions
        return np.where(index < prompt, self.positions[np.minimum(index, prompt - 1)], index + after)

    def append(self, token: int) -> None:
        self.keys[self.length] = self.ids[self.length] = token
        self.length += 1

    def propose(self, tokens: list[int]) -> None:
        """Write proposed tokens after the known ones (the next forward computes and verifies them)."""
        end = self.length + len(tokens)
        self.keys[self.length : end] = self.ids[self.length : end] = tokens
        self.draft = len(tokens)


def _grow(values: np.ndarray, capacity: int) -> np.ndarray:
    out = np.zeros(max(capacity, len(values)), dtype=np.int64)
    out[: len(values)] = values
    return out


@dataclass
class Chunk:
    """`count` positions of `seq` from `start`; `sample` when they reach its last known position (and
    its proposed tokens after it, whose positions all need logits: `rows`)."""

    seq: Sequence
    start: int
    count: int

    @property
    def sample(self) -> bool:
        return self.start + self.count >= self.seq.length

    @property
    def rows(self) -> int:
        """Positions whose logits the sequence needs: its last known one and every proposed one."""
        return self.start + self.count - self.seq.length + 1 if self.sample else 0


class Scheduler:
    """Waiting and running sequences over one block pool."""

    def __init__(self, pool: BlockPool, max_step_tokens: int = 256, max_running: int = 32):
        self.pool = pool
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.cached_blocks = 0  # blocks admissions found in the prefix cache (tokens not prefilled / block_size)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.pool.block_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Forget `seq` (finished or cancelled) and release its blocks."""
        seq.ended = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.hashes, seq.computed = [], [], 0

    # ---------------------------------------------------------------- planning

    def schedule(self) -> list[Chunk]:
        """The chunks of the next forward (empty when there is nothing to run). Proposed tokens take at most
        half the step's budget, so prompts still get chunks and waiting requests are still admitted."""
        budget = self.max_step_tokens
        drafts = self.max_step_tokens // 2
        plan: list[Chunk] = []
        decoding = [s for s in self.running if s.remaining == 1]
        prefilling = [s for s in self.running if s.remaining > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq not in self.running:  # preempted by an earlier sequence of this plan
                continue
            seq.draft = min(seq.draft, drafts)
            count = min(seq.remaining + seq.draft, budget)
            seq.draft = max(0, count - seq.remaining)  # proposals beyond the budget wait for another step
            drafts -= seq.draft
            if not self._reserve(seq, seq.computed + count, plan):
                continue
            plan.append(Chunk(seq, seq.computed, count))
            budget -= count
        while budget and self.waiting and len(self.running) < self.max_running and self.waiting[0].ready:
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break
            plan.append(chunk)
            budget -= chunk.count
        return plan

    def _reserve(self, seq: Sequence, positions: int, plan: list[Chunk]) -> bool:
        """Blocks for `positions` of a running sequence, preempting newer ones if the pool is empty."""
        while len(seq.blocks) < self.blocks_for(positions):
            try:
                seq.blocks.append(self.pool.allocate())
            except PoolExhausted:
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    return False
        return True

    def _preempt(self, seq: Sequence, plan: list[Chunk]) -> None:
        seq.draft = 0
        self.running.remove(seq)
        plan[:] = [c for c in plan if c.seq is not seq]
        self._release(seq)
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence, budget: int) -> Chunk | None:
        """Start `seq` from its cached prefix if its whole known sequence fits the pool now."""
        hashes = block_hashes(seq.keys[: seq.length], self.pool.block_size)
        usable = hashes[: (seq.length - 1) // self.pool.block_size]  # the last position always runs
        blocks = self.pool.match(usable)  # taking them first: a matched idle block is no longer available
        hit = len(blocks)
        if self.pool.available < self.blocks_for(seq.length) - hit:
            self.pool.release(blocks)
            return None
        seq.blocks = blocks
        seq.hashes = usable[:hit]
        self.cached_blocks += hit
        seq.computed = hit * self.pool.block_size
        if not seq.admitted:
            seq.cached, seq.admitted = seq.computed, True
        count = min(seq.remaining, budget)
        while len(seq.blocks) < self.blocks_for(seq.computed + count):
            seq.blocks.append(self.pool.allocate())
        self.waiting.popleft()
        self.running.append(seq)
        return Chunk(seq, seq.computed, count)

    # ---------------------------------------------------------------- after a forward

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks held only for proposals that were not kept (never published)."""
        keep = self.blocks_for(seq.length)
        if len(seq.blocks) > keep:
            self.pool.release(seq.blocks[keep:])
            del seq.blocks[keep:]

    def advance(self, chunk: Chunk) -> None:
        """Record that a chunk ran: its positions (the verified ones) are cached; name the blocks it filled."""
        seq = chunk.seq
        seq.computed = chunk.start + chunk.count
        size = self.pool.block_size
        for index in range(len(seq.hashes), seq.computed // size):
            parent = seq.hashes[-1] if seq.hashes else b""
            (content,) = block_hashes(seq.keys[index * size : (index + 1) * size], size, parent)
            seq.blocks[index] = self.pool.publish(seq.blocks[index], content)
            seq.hashes.append(content)
