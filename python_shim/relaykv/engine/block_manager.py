"""Fixed-size KV blocks: reference counts, a prefix cache keyed by chained block hashes, LRU reuse.

A block's hash covers its token ids and its parent block's hash, so equal hashes
mean equal prefixes (as in vLLM's prefix caching). Freed blocks that hold a cached
prefix stay findable until they are handed out again, least recently freed first.
KV that is not exactly what a full prefill would produce (imported spans, and
anything computed after them, which attended to them) must never be found by a
later request as if it were exact: `mark_not_cacheable` caps what a request may
register.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: blake2b over the parent hash and the token ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b",".join(str(int(t)).encode() for t in token_ids))
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of `token_ids`, each chained on the one before."""
    out: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


@dataclasses.dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set while the block is registered in the prefix cache


class BlockManager:
    """Owns block ids [0, num_blocks) of one KvCache and each request's block list."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in reuse order: the front is handed out first. OrderedDict gives O(1)
        # removal when a cached free block is hit again.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.req_blocks: dict[str, list[int]] = {}
        # Per request: how many leading blocks may be registered in the prefix cache.
        self._cacheable_blocks: dict[str, int] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.stats = {"prefix_queries": 0, "prefix_hit_blocks": 0, "evictions": 0}

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def get_computed_blocks(self, token_ids: Sequence[int]) -> list[int]:
        """Longest run of leading full blocks of `token_ids` found in the prefix cache.

        At least one token is left uncomputed: its logits are the next token's.
        """
        if not self.enable_prefix_caching:
            return []
        self.stats["prefix_queries"] += 1
        usable = (len(token_ids) - 1) // self.block_size
        hits: list[int] = []
        for h in block_hashes(token_ids[: usable * self.block_size], self.block_size):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        self.stats["prefix_hit_blocks"] += len(hits)
        return hits

    # -- allocation ---------------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # reusing a cached block evicts its prefix
            del self._cached[block.block_hash]
            block.block_hash = None
            self.stats["evictions"] += 1
        block.ref_cnt = 1
        return block_id

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self._free[block_id]
        block.ref_cnt += 1

    def allocate_slots(self, request_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()) -> list[int] | None:
        """Grows the request's blocks to hold `num_tokens` tokens, first sharing
        `computed_blocks` (prefix hits, only for a request with no blocks yet).
        Returns the block list, or None (and changes nothing) if the pool is short."""
        blocks = self.req_blocks.get(request_id, [])
        if computed_blocks and blocks:
            raise ValueError(f"request {request_id} already has blocks; prefix hits only apply to new requests")
        have = len(blocks) + len(computed_blocks)
        need = max(0, -(-num_tokens // self.block_size) - have)
        # Prefix hits that sit in the free queue are taken out of it by _touch.
        free_hits = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        if need > self.num_free_blocks - free_hits:
            return None
        blocks = self.req_blocks.setdefault(request_id, [])
        for b in computed_blocks:
            self._touch(b)
            blocks.append(b)
        if computed_blocks:
            self._num_cached_blocks[request_id] = len(computed_blocks)
        blocks.extend(self._take_free() for _ in range(need))
        return blocks

    def mark_not_cacheable(self, request_id: str, from_token: int) -> None:
        """No block holding token `from_token` or later of this request enters the prefix cache."""
        limit = from_token // self.block_size
        self._cacheable_blocks[request_id] = min(self._cacheable_blocks.get(request_id, limit), limit)

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Registers the request's full, computed (and cacheable) blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(request_id, [])
        full = min(num_computed_tokens // self.block_size, len(blocks),
                   self._cacheable_blocks.get(request_id, len(blocks)))
        done = self._num_cached_blocks.get(request_id, 0)
        if full <= done:
            return
        hashes = block_hashes(token_ids[: full * self.block_size], self.block_size)
        for i in range(done, full):
            block = self.blocks[blocks[i]]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        self._num_cached_blocks[request_id] = full

    def free(self, request_id: str) -> None:
        """Drops the request's references. Blocks reaching zero go to the free queue: uncached
        ones to the front (reused first), cached ones to the back, tail first, so the most
        valuable prefix blocks (the leading ones) are evicted last."""
        blocks = self.req_blocks.pop(request_id, [])
        self._cacheable_blocks.pop(request_id, None)
        self._num_cached_blocks.pop(request_id, None)
        for block_id in reversed(blocks):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        for h, block_id in list(self._cached.items()):
            self.blocks[block_id].block_hash = None
        self._cached.clear()


__all__ = ["Block", "BlockManager", "block_hashes", "hash_block"]
