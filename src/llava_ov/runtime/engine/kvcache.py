"""The KV block pool: which blocks are free, which a sequence holds, and the prefix cache.

A block holds the keys and values of `block_size` consecutive positions of one sequence.
A *full* block is named by a content hash chained over every key before it (token ids; image
positions carry their image's content key), so two sequences that start alike share the same
physical blocks, and a block keeps its content after its sequence ends. Blocks nobody holds but
whose content is known wait in an LRU list and are reused on a hash hit, or recycled (oldest
first) when no free block is left. Pure Python bookkeeping: the tensors live in `paged.py`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def block_hashes(keys: np.ndarray, block_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained content hashes of every full block of `keys`."""
    out = []
    for start in range(0, len(keys) - block_size + 1, block_size):
        parent = hashlib.blake2b(parent + keys[start : start + block_size].tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


class PoolExhausted(Exception):
    """No free or recyclable block is left."""


class BlockPool:
    """Reference-counted blocks with a content-addressed prefix cache (LRU of idle blocks)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never held, no content: pop() takes 0 first
        self.idle: OrderedDict[int, None] = OrderedDict()  # held by nobody, content kept (LRU first)

    @property
    def available(self) -> int:
        """Blocks a sequence can take now (free, or idle and recyclable)."""
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def allocate(self) -> int:
        """A block for new content; recycles the least recently used idle block if none is free."""
        if self.free:
            block = self.free.pop()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.by_hash[self.hash_of[block]]
            self.hash_of[block] = None
        else:
            raise PoolExhausted
        self.refs[block] = 1
        return block

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Take the cached blocks for the longest prefix of `hashes` (each one gains a holder)."""
        found = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self.refs[block] == 0:
                del self.idle[block]
            self.refs[block] += 1
        return found

    def publish(self, block: int, content: bytes) -> int:
        """Name a block that just became full; returns the block to keep using.

        If another block already holds the same content, that one is shared and this
        one is released, so equal prefixes never occupy two blocks."""
        existing = self.by_hash.get(content)
        if existing is not None and existing != block:
            if self.refs[existing] == 0:
                del self.idle[existing]
            self.refs[existing] += 1
            self.release([block])
            return existing
        self.hash_of[block] = content
        self.by_hash[content] = block
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one holder of each block; blocks with known content stay cached, newest last.

        `blocks` are in prefix order and are released back to front, so a prefix's tail is recycled
        before its head: a prefix only matches from its first block, and a kept tail alone is useless."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if self.hash_of[block] is None:
                self.free.append(block)
            else:
                self.idle[block] = None

    def clear_cache(self) -> None:
        """Forget every idle block's content (e.g. `Pipeline.reset`)."""
        for block in list(self.idle):
            del self.by_hash[self.hash_of[block]]
            self.hash_of[block] = None
            self.free.append(block)
        self.idle.clear()
