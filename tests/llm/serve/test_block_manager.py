"""The block pool's bookkeeping: counts, reference counts, prefix-cache hashes, eviction, copy-on-write."""

from __future__ import annotations

import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.serve.block_manager import BlockManager, chain_hash
from efficientml.llm.serve.sequence import SamplingParams, Sequence


def _bm(n=8, bs=4):
    return BlockManager(num_layers=2, num_blocks=n, block_size=bs, num_kv_heads=1, head_dim=2)


def _seq(ids):
    return Sequence(list(ids), SamplingParams())


def _computed(bm, seq):
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_allocate_free_counts_and_pool_shape():
    bm = _bm()
    assert bm.k.shape == (2, 8, 4, 1, 2) and bm.nbytes() == 2 * 2 * 8 * 4 * 2 * 4
    s = _seq(range(10))  # 3 blocks of 4
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_used_blocks == 0 and s.block_table == []
    with pytest.raises(ConfigError, match="num_blocks"):
        _bm(n=0)
    big = _seq(range(40))
    assert not bm.can_allocate(big)
    with pytest.raises(ConfigError, match="can_allocate"):
        bm.allocate(big)


def test_prefix_hits_are_chained_hashes_of_full_computed_blocks():
    bm = _bm()
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    _computed(bm, a)
    assert a.block_hashes == [chain_hash(None, (1, 2, 3, 4)), chain_hash(a.block_hashes[0], (5, 6, 7, 8))]
    b = _seq([1, 2, 3, 4, 5, 6, 7, 8, 0, 0])
    bm.allocate(b)  # both full blocks hit and are shared
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.ref_count[a.block_table[0]] == 2 and bm.num_used_blocks == 4
    c = _seq([9, 2, 3, 4, 5, 6, 7, 8, 0])  # same second block, different first: the chain misses both
    bm.allocate(c)
    assert c.num_computed_tokens == 0 and bm.prefix_hits == 2 and bm.prefix_queries == 2 + 2 + 2
    d = _seq([1, 2, 3, 4, 5, 6, 7, 8])  # the whole prompt cached: its last block is recomputed
    bm.allocate(d)
    assert d.num_computed_tokens == 4


def test_freed_blocks_stay_cached_until_reused_oldest_first():
    bm = _bm(n=4)
    a = _seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    _computed(bm, a)
    kept = a.block_table[0]
    bm.free(a)
    b = _seq([1, 2, 3, 4, 7, 7])
    assert bm.can_allocate(b)
    bm.allocate(b)  # revives the cached block from the free list
    assert b.block_table[0] == kept and bm.num_used_blocks == 2
    bm.free(b)
    filler = _seq(range(10, 26))  # takes all 4 blocks: the cached one is evicted
    bm.allocate(filler)
    bm.free(filler)
    assert bm.hash_to_block == {} or kept not in bm.hash_to_block.values()


def test_copy_on_write_of_a_shared_partial_block():
    bm = _bm()
    parent = _seq([1, 2, 3, 4, 5, 6])
    bm.allocate(parent)
    bm.k[:, parent.block_table[1]] = 7.0
    _computed(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert bm.ref_count[parent.block_table[1]] == 2
    for s in (parent, child):
        s.append_token(9)
    assert bm.can_append(child, 1)
    bm.append(child, 1)  # writes slot 6, in the shared second block: it gets a copy
    assert child.block_table[0] == parent.block_table[0] and child.block_table[1] != parent.block_table[1]
    assert torch.equal(bm.k[:, child.block_table[1]], bm.k[:, parent.block_table[1]]) and bm.cow_copies == 1
    bm.append(parent, 1)  # now the only holder: no copy
    assert bm.cow_copies == 1
    bm.free(parent)
    bm.free(child)
    assert bm.num_used_blocks == 0


def test_usage_counts_the_unfilled_tail_of_each_last_block_once():
    bm = _bm()
    a = _seq(range(10))  # 3 blocks, 10 of 12 slots filled
    bm.allocate(a)
    _computed(bm, a)
    b = a.fork(1)
    bm.fork(a, b)  # shares all three blocks: nothing more is used
    assert bm.usage([a, b]) == (12, 10)
    assert not bm.can_allocate(_seq(range(100, 120)), reserve=1) and bm.can_allocate(_seq(range(100, 120)))
