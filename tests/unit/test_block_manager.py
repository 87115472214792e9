"""BlockManager with exact block ids: allocation, slots, ref counts, prefix cache, LRU, ring."""

from __future__ import annotations

import pytest

from cache.block_manager import BlockManager, OutOfBlocks

KEY = (0, 0)  # adapter identity: (index, load generation)


def test_allocate_append_free_exact_ids():
    m = BlockManager(num_blocks=8, block_size=4)
    assert m.num_free == 7 and m.num_usable == 7  # block 0 reserved
    a = m.allocate(10, 6)
    assert a.block_ids == (1, 2) and a.num_cached_tokens == 0
    assert a.slots == (4, 5, 6, 7, 8, 9)
    assert m.append_slots(10) == [10]
    assert m.blocks_needed_to_append(10, 2) == 1
    assert m.append_slots(10, 2) == [11, 12]  # crosses into a new block: 3
    assert m.block_table(10) == [1, 2, 3] and m.slot(10, 8) == 12
    assert m.allocate(11, 1).block_ids == (4,)
    m.free(10)
    assert m.num_free == 6 and not m.has(10)
    # FIFO free list, freed tail first: 5, 6, 7 were never used, then 3, 2, 1
    assert m.allocate(12, 16).block_ids == (5, 6, 7, 3)
    m.free(11)
    m.free(12)
    assert m.num_free == m.num_usable


def test_block_zero_reservable():
    assert BlockManager(3, 4, num_reserved=0).allocate(1, 12).block_ids == (0, 1, 2)
    with pytest.raises(OutOfBlocks):
        BlockManager(3, 4).allocate(1, 12)


def test_out_of_blocks_names_counts_and_changes_nothing():
    m = BlockManager(4, 4)
    m.allocate(1, 5)
    with pytest.raises(OutOfBlocks, match="needs 2 blocks, 1 free") as err:
        m.allocate(2, 8)
    assert (err.value.needed, err.value.free) == (2, 1) and not m.has(2) and m.num_free == 1
    m.append_slots(1, 3)  # fills block 2
    with pytest.raises(OutOfBlocks) as err:
        m.append_slots(1, 5)
    assert (err.value.needed, err.value.free) == (2, 1)
    assert m.sequence(1).num_tokens == 8 and m.block_table(1) == [1, 2]
    assert m.can_allocate(4) and not m.can_allocate(5)


def test_bad_calls():
    m = BlockManager(4, 4)
    m.allocate(1, 2)
    with pytest.raises(ValueError, match="already"):
        m.allocate(1, 2)
    with pytest.raises(KeyError):
        m.append_slots(99)
    with pytest.raises(IndexError):
        m.slot(1, 2)
    with pytest.raises(ValueError):
        m.allocate(2, 0)


def test_prefix_reuse_of_longest_cached_prefix():
    m = BlockManager(10, 4, enable_prefix_caching=True)
    prompt = list(range(100, 110))  # 10 tokens: blocks 1, 2 full, 3 partial
    assert m.allocate(1, 10, prompt, KEY).block_ids == (1, 2, 3)
    # Nothing is shared before the KV is written.
    assert m.allocate(2, 10, prompt, KEY).num_cached_tokens == 0
    m.free(2)
    m.mark_computed(1)
    b = m.allocate(3, 11, prompt[:8] + [7, 7, 7], KEY)
    assert b.block_ids == (1, 2, 7) and b.num_cached_tokens == 8
    assert b.slots == (28, 29, 30)  # only tokens 8..10 are computed
    assert m.ref_count(1) == 2 and m.ref_count(2) == 2
    # The last token is always computed: an 8-token prompt reuses only the first block.
    c = m.allocate(4, 8, prompt[:8], KEY)
    assert c.block_ids[:1] == (1,) and c.num_cached_tokens == 4
    assert m.num_reused_tokens == 12


def test_no_reuse_across_adapters_or_broken_chain():
    m = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(1, 10))
    m.allocate(1, 9, prompt, KEY)
    m.mark_computed(1)
    assert m.allocate(2, 9, prompt, (1, 0)).num_cached_tokens == 0  # another adapter
    assert m.allocate(3, 9, prompt, (0, 1)).num_cached_tokens == 0  # same index, reloaded
    # Same second block after a different first block: the hash chain does not match.
    assert m.allocate(4, 9, [0, 0, 0, 0] + prompt[4:], KEY).num_cached_tokens == 0


def test_decoded_blocks_are_cached_too():
    m = BlockManager(10, 2, enable_prefix_caching=True)
    m.allocate(1, 3, [5, 6, 7], KEY)
    m.mark_computed(1)
    m.append_slots(1, 1, [8])
    m.mark_computed(1)  # block 2 = (7, 8) now full and written
    assert m.allocate(2, 5, [5, 6, 7, 8, 9], KEY).block_ids[:2] == (1, 2)


def test_lru_eviction_order_exact_ids():
    m = BlockManager(7, 2, enable_prefix_caching=True)  # usable blocks 1..6
    m.allocate(1, 5, [1, 2, 3, 4, 5], KEY)  # blocks 1, 2, 3
    m.mark_computed(1)
    m.free(1)  # tail first: 3 -> free list; 2 then 1 -> evictable
    assert m.cached_block_ids() == [2, 1] and m.num_free == 6
    m.allocate(2, 5, [7, 8, 9, 10, 11], KEY)  # 4, 5, 6 from the free list
    m.mark_computed(2)
    m.free(2)
    assert m.cached_block_ids() == [2, 1, 5, 4]
    # Reusing (1, 2) and releasing them again makes them the most recent.
    assert m.allocate(3, 5, [1, 2, 3, 4, 0], KEY).block_ids == (1, 2, 3)
    m.free(3)
    assert m.cached_block_ids() == [5, 4, 2, 1]
    # 4 new blocks: free list (6, 3) first, then evict least recent 5 and 4.
    assert m.allocate(4, 8, list(range(50, 58)), KEY).block_ids == (6, 3, 5, 4)
    assert m.cached_block_ids() == [2, 1]
    m.free(4)
    assert m.allocate(5, 5, [7, 8, 9, 10, 11], KEY).num_cached_tokens == 0  # evicted
    assert m.allocate(6, 3, [1, 2, 3], KEY).block_ids[0] == 1  # still cached
    m.free(5)
    m.free(6)
    assert m.num_free == m.num_usable


def test_hits_are_taken_before_eviction():
    m = BlockManager(4, 2, enable_prefix_caching=True)  # usable 1..3
    m.allocate(1, 5, [1, 2, 3, 4, 5], KEY)
    m.mark_computed(1)
    m.free(1)  # evictable [2, 1], free [3]
    a = m.allocate(2, 6, [1, 2, 3, 4, 5, 6], KEY)  # reuses 1, 2; the new block must not evict them
    assert a.block_ids == (1, 2, 3) and a.num_cached_tokens == 4
    with pytest.raises(OutOfBlocks):
        m.allocate(3, 1)


def test_sliding_window_ring_holds_at_most_window_blocks_plus_one():
    m = BlockManager(10, 4, sliding_window=8)  # ring of 3 blocks
    a = m.allocate(1, 20)
    assert a.block_ids == (1, 2, 3)
    # positions 0..7 would be overwritten by 12..19: not written at all
    assert a.slots[:8] == (-1,) * 8
    assert a.slots[8:] == (12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11)
    assert m.block_table(1) == [1, 2, 3, 1, 2]
    assert m.append_slots(1) == [12] and m.slot(1, 20) == 12
    for _ in range(100):
        m.append_slots(1)
    assert m.sequence(1).block_ids == [1, 2, 3] and m.num_free == 6
    short = m.allocate(2, 3)
    assert short.block_ids == (4,) and short.slots == (16, 17, 18)
    m.free(1)
    m.free(2)
    assert m.num_free == m.num_usable
