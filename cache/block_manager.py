"""Paged-KV block allocator for shard-allocation mode: pure Python, no torch.

A sequence's KV lives in fixed-size blocks; token position p of a sequence is stored in slot
`block_ids[p // block_size] * block_size + p % block_size`. The manager owns:

- a free list (FIFO: freed blocks go to the back, allocation takes from the front, so ids are
  deterministic and a just-freed block is reused last),
- per-sequence block lists (`SequenceBlocks`), and a ref count per block (a block shared by several
  sequences through the prefix cache is freed when its last user goes),
- optionally a prefix cache: a full block whose KV has been computed is registered under a hash
  chain h_i = H(h_{i-1}, tokens of block i, cache_key), where cache_key is the adapter identity
  (index and load generation), so a different or reloaded adapter never shares. A new sequence
  reuses the blocks of its longest cached prefix. Cached blocks whose ref count drops to zero stay
  cached but evictable; they are evicted least recently released first, only when the free list is
  empty. `num_free` counts both.
- optionally a sliding window: a sequence keeps a ring of ceil(window / block_size) + 1 blocks and
  position p uses ring block (p // block_size) % ring; `block_table` expands the ring to one entry
  per logical block, so an attention kernel that indexes by p // block_size works unchanged for
  the positions inside the window.

Block ids below `num_reserved` are never handed out (block 0 serves Health / padding writes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


class OutOfBlocks(Exception):
    """Not enough free KV blocks; `needed` and `free` are block counts."""

    def __init__(self, needed: int, free: int, what: str = "allocation"):
        super().__init__(f"out of KV cache blocks: {what} needs {needed} blocks, {free} free")
        self.needed = needed
        self.free = free


@dataclass
class SequenceBlocks:
    """One sequence's blocks and what the prefix cache needs to know about it."""

    block_ids: list[int]  # physical blocks; with a window, the ring in order of first use
    num_tokens: int  # positions that have a slot (the sequence's length in the cache)
    num_cached_tokens: int = 0  # leading tokens reused from the prefix cache at allocation
    cache_key: Hashable = None  # adapter identity, part of every block hash
    token_ids: list[int] = field(default_factory=list)  # known tokens (prefix caching only)
    num_hashed_blocks: int = 0  # leading blocks whose hash chain is computed
    last_hash: bytes = b""  # hash of block num_hashed_blocks - 1 (chain parent)


@dataclass(frozen=True)
class Allocation:
    """Result of `allocate`: the sequence's blocks, the reused prefix and the slots to write."""

    block_ids: tuple[int, ...]
    num_cached_tokens: int  # tokens [0, num_cached_tokens) already have KV: skip computing them
    slots: tuple[int, ...]  # slots of tokens [num_cached_tokens, num_tokens); -1 = write nothing


def block_hash(parent: bytes, tokens: Sequence[int], cache_key: Hashable) -> bytes:
    """Chain hash of one full block (deterministic across processes; repr of cache_key is hashed)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(repr(cache_key).encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Allocates KV blocks to sequences. All methods are O(blocks touched); no device work."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_reserved: int = 1,
        enable_prefix_caching: bool = False,
        sliding_window: int | None = None,
    ):
        if block_size <= 0 or num_blocks <= num_reserved or num_reserved < 0:
            raise ValueError(
                f"need block_size > 0 and num_blocks > num_reserved, got "
                f"{num_blocks=} {block_size=} {num_reserved=}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_reserved = num_reserved
        # A ring shares blocks between positions a window apart; cached prefix blocks would be
        # overwritten under another sequence, so the two features exclude each other.
        self.enable_prefix_caching = enable_prefix_caching and sliding_window is None
        self.ring_blocks = None if sliding_window is None else -(-sliding_window // block_size) + 1
        self._free: deque[int] = deque(range(num_reserved, num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block id -> hash, for registered blocks
        self._cached: dict[bytes, int] = {}  # hash -> block id (in use or evictable)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 cached blocks, LRU first
        self._seqs: dict[int, SequenceBlocks] = {}
        self.num_reused_tokens = 0  # total prefix-cache hits in tokens (a counter for tests/metrics)

    # ---- capacity -----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: free list plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - self.num_reserved

    def blocks_for(self, num_tokens: int) -> int:
        """Physical blocks a sequence of `num_tokens` holds (capped by the ring with a window)."""
        n = -(-num_tokens // self.block_size)
        return n if self.ring_blocks is None else min(n, self.ring_blocks)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of `num_tokens` fits, ignoring possible prefix-cache hits."""
        return self.blocks_for(num_tokens) <= self.num_free

    def blocks_needed_to_append(self, seq_id: int, n: int) -> int:
        seq = self._seq(seq_id)
        return self.blocks_for(seq.num_tokens + n) - len(seq.block_ids)

    # ---- sequences ------------------------------------------------------------------------------

    def allocate(
        self,
        seq_id: int,
        num_tokens: int,
        token_ids: Sequence[int] | None = None,
        cache_key: Hashable = None,
    ) -> Allocation:
        """Give a new sequence blocks for `num_tokens` positions, reusing cached prefix blocks.

        With prefix caching, `token_ids` (len == num_tokens) and `cache_key` select the reusable
        prefix: whole blocks only, and never the last token (the model must compute at least one
        position to produce logits). Raises OutOfBlocks (nothing changed) when the rest does not fit.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
        if token_ids is not None and len(token_ids) != num_tokens:
            raise ValueError(f"{len(token_ids)} token ids for {num_tokens} tokens")
        hits, hashes = self._lookup_prefix(token_ids, cache_key) if token_ids is not None else ([], [])
        new = self.blocks_for(num_tokens) - len(hits)
        reserved_hits = sum(1 for b in hits if b in self._evictable)
        if new + reserved_hits > self.num_free:
            raise OutOfBlocks(new + reserved_hits, self.num_free, f"a sequence of {num_tokens} tokens")
        for b in hits:  # take the hits first so that allocating the rest cannot evict them
            self._take_ref(b)
        blocks = hits + [self._pop_free() for _ in range(new)]
        cached = len(hits) * self.block_size
        self._seqs[seq_id] = SequenceBlocks(
            block_ids=blocks,
            num_tokens=num_tokens,
            num_cached_tokens=cached,
            cache_key=cache_key,
            token_ids=list(token_ids) if token_ids is not None and self.enable_prefix_caching else [],
            num_hashed_blocks=len(hits),
            last_hash=hashes[-1] if hashes else b"",
        )
        self.num_reused_tokens += cached
        return Allocation(tuple(blocks), cached, tuple(self._slots(seq_id, cached, num_tokens)))

    def append_slots(self, seq_id: int, n: int = 1, token_ids: Sequence[int] | None = None) -> list[int]:
        """Extend a sequence by `n` positions (a decode step: n = 1); return their slots.

        `token_ids` are the tokens at those positions, needed only to cache the blocks they fill.
        All or nothing: raises OutOfBlocks before changing anything.
        """
        seq = self._seq(seq_id)
        need = self.blocks_needed_to_append(seq_id, n)
        if need > self.num_free:
            raise OutOfBlocks(need, self.num_free, f"appending {n} tokens to sequence {seq_id}")
        seq.block_ids.extend(self._pop_free() for _ in range(need))
        start = seq.num_tokens
        seq.num_tokens += n
        if self.enable_prefix_caching and token_ids is not None and len(seq.token_ids) == start:
            seq.token_ids.extend(token_ids)
        return self._slots(seq_id, start, seq.num_tokens)

    def mark_computed(self, seq_id: int, num_tokens: int | None = None) -> None:
        """Register the full blocks among the first `num_tokens` (default: all) whose KV is written.

        Call after the forward that wrote them; until then no other sequence may reuse them.
        No-op without prefix caching or when the tokens are unknown.
        """
        if not self.enable_prefix_caching:
            return
        seq = self._seq(seq_id)
        limit = min(seq.num_tokens if num_tokens is None else num_tokens, len(seq.token_ids))
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, limit // bs):
            h = block_hash(seq.last_hash, seq.token_ids[i * bs : (i + 1) * bs], seq.cache_key)
            block = seq.block_ids[i]
            if h not in self._cached:  # an identical block computed concurrently keeps the entry
                self._cached[h] = block
                self._hash_of[block] = h
            seq.last_hash, seq.num_hashed_blocks = h, i + 1

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (tail first, so a prefix outlives its tails in the LRU)."""
        seq = self._seqs.pop(seq_id)
        for b in reversed(seq.block_ids):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            if b in self._hash_of:
                self._evictable[b] = None  # most recently released: evicted last
            else:
                self._free.append(b)

    # ---- queries --------------------------------------------------------------------------------

    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def sequence(self, seq_id: int) -> SequenceBlocks:
        return self._seq(seq_id)

    def block_table(self, seq_id: int) -> list[int]:
        """One block id per logical block of the sequence (the ring repeated with a window)."""
        seq = self._seq(seq_id)
        n = -(-seq.num_tokens // self.block_size)
        return [seq.block_ids[j % len(seq.block_ids)] for j in range(n)]

    def slot(self, seq_id: int, position: int) -> int:
        seq = self._seq(seq_id)
        if not 0 <= position < seq.num_tokens:
            raise IndexError(f"position {position} outside sequence {seq_id} of {seq.num_tokens} tokens")
        block = seq.block_ids[(position // self.block_size) % len(seq.block_ids)]
        return block * self.block_size + position % self.block_size

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def cached_block_ids(self) -> list[int]:
        """Evictable cached blocks, least recently released (next to be evicted) first."""
        return list(self._evictable)

    # ---- internals ------------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> SequenceBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id} has no blocks") from None

    def _slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Slots of positions [start, end). With a ring, positions that a later position of the same
        range overwrites get -1, so one kernel never writes a slot twice."""
        seq = self._seq(seq_id)
        lowest = -1 if self.ring_blocks is None else seq.num_tokens - len(seq.block_ids) * self.block_size
        bs = self.block_size
        out = []
        for p in range(start, end):
            if p < lowest:
                out.append(-1)
            else:
                out.append(seq.block_ids[(p // bs) % len(seq.block_ids)] * bs + p % bs)
        return out

    def _lookup_prefix(self, token_ids: Sequence[int], cache_key: Hashable) -> tuple[list[int], list[bytes]]:
        """Blocks of the longest cached prefix (whole blocks, excluding the last token)."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        hits: list[int] = []
        hashes: list[bytes] = []
        parent = b""
        for i in range((len(token_ids) - 1) // bs):
            parent = block_hash(parent, token_ids[i * bs : (i + 1) * bs], cache_key)
            block = self._cached.get(parent)
            if block is None:
                break
            hits.append(block)
            hashes.append(parent)
        return hits, hashes

    def _take_ref(self, block: int) -> None:
        self._evictable.pop(block, None)
        self._ref[block] += 1

    def _pop_free(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently released cached block
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
        self._ref[block] = 1
        return block
