"""The KV cache as fixed-size blocks in one preallocated pool (vLLM's PagedAttention memory model).

``k`` and ``v`` are each one tensor ``(layers, num_blocks, block_size, n_kv_heads, head_dim)``,
allocated once. A sequence owns a *block table*, the list of block ids that hold its tokens in
order: token ``p`` lives in block ``block_table[p // block_size]`` at offset ``p % block_size``.
Memory is wasted only in each sequence's last, partly filled block.

**Reference counts.** A block may appear in several tables (a shared prefix, forked sequences);
it returns to the free list when its count reaches 0.

**Prefix caching.** Every full block whose keys/values are computed gets a hash chained with the
previous block's (:func:`chain_hash`, SHA-256 over the previous hash and its token ids), so equal
hashes mean equal prefixes (the block's ids are compared too). Admitting a sequence looks its full
prompt blocks up and reuses the hits, so a shared system prompt is computed once. A freed block keeps its hash and
contents until it is handed out again (the oldest freed first), so a later request can still hit it.
At least the last token is always recomputed: its logits are needed.

**Copy-on-write.** Before a step writes into a block another table also holds (a partly filled
block shared by forked sequences, ``n > 1``), the writer gets a fresh copy of it.

**Rollback.** Speculative decoding computes keys/values for draft tokens that may be rejected:
:meth:`BlockManager.truncate` cuts a sequence's KV back to its first ``n`` tokens (blocks past them
freed, a kept block that will be overwritten leaves the prefix cache).
"""

from __future__ import annotations

import hashlib
from array import array

import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.serve.sequence import Sequence


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    """128 bits of SHA-256 over the previous block's hash and these token ids: a prompt cannot be
    crafted to collide with another request's prefix (Python's ``hash`` could be), as in vLLM."""
    head = (0 if prev is None else prev + 1).to_bytes(17, "little")
    return int.from_bytes(hashlib.sha256(head + array("q", tokens).tobytes()).digest()[:16], "little")


class BlockManager:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"the KV pool needs num_blocks ≥ 1 and block_size ≥ 1, "
                              f"got {num_blocks}, {block_size}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order: oldest freed first
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0  # of those, found
        self.peak_used_blocks = 0
        self.cow_copies = 0  # blocks copied on write

    # ---- counters
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # ---- allocation
    def _take(self) -> int:
        """A free block for new contents (the oldest freed); its old hash, if any, is forgotten."""
        b = next(iter(self._free))
        del self._free[b]
        h = self.block_hash[b]
        if h is not None and self.hash_to_block.get(h) == b:
            del self.hash_to_block[h]
        self.block_hash[b] = self.block_tokens[b] = None
        self.ref_count[b] = 1
        return b

    def _hold(self, b: int) -> None:
        if self.ref_count[b] == 0:
            del self._free[b]
        self.ref_count[b] += 1

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache holding ``seq``'s leading full blocks (all but the last token)."""
        if not self.enable_prefix_caching:
            return []
        ids, bs, hits, h = seq.token_ids, self.block_size, [], None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(ids[i * bs:(i + 1) * bs])
            h = chain_hash(h, tokens)
            b = self.hash_to_block.get(h)
            if b is None or self.block_tokens[b] != tokens:
                break
            hits.append(b)
        return hits

    def cached_tokens(self, seq: Sequence) -> int:
        """How many of ``seq``'s leading tokens the prefix cache holds now (no side effects)."""
        return len(self._prefix_hits(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Whether ``seq``'s tokens fit, leaving at least ``reserve`` blocks free."""
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self.ref_count[b] == 0)  # cached but free: leaves the free list
        return self.blocks_for(seq.num_tokens) - len(hits) + revived + reserve <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of ``seq``'s tokens, prefix-cache hits first; sets its computed/cached counts."""
        if seq.block_table:
            raise ConfigError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq):
            raise ConfigError(f"not enough free KV blocks for sequence {seq.seq_id}; check can_allocate first")
        hits = self._prefix_hits(seq)
        if self.enable_prefix_caching:
            self.prefix_queries += (seq.num_tokens - 1) // self.block_size
            self.prefix_hits += len(hits)
        for b in hits:
            self._hold(b)
        seq.block_table = hits + [self._take() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.block_hashes = [self.block_hash[b] for b in hits]  # type: ignore[misc]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self._peak()

    def _shared_in(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Indices into ``seq.block_table`` of the shared blocks that positions start…end-1 write."""
        first, last = start // self.block_size, self.blocks_for(end)
        return [i for i in range(first, min(last, len(seq.block_table))) if self.ref_count[seq.block_table[i]] > 1]

    def can_append(self, seq: Sequence, n: int) -> bool:
        """Whether ``n`` more tokens of ``seq`` can be computed (new blocks + copies on write)."""
        end = seq.num_computed_tokens + n
        need = max(0, self.blocks_for(end) - len(seq.block_table))
        return need + len(self._shared_in(seq, seq.num_computed_tokens, end)) <= len(self._free)

    def append(self, seq: Sequence, n: int) -> None:
        """Make room to compute ``n`` more tokens: new blocks, and a private copy of any shared one written."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        for i in self._shared_in(seq, start, end):
            old = seq.block_table[i]
            new = self._take()
            self.k[:, new].copy_(self.k[:, old])  # every layer's slots of the block
            self.v[:, new].copy_(self.v[:, old])
            self.ref_count[old] -= 1
            seq.block_table[i] = new
            self.cow_copies += 1
        while len(seq.block_table) < self.blocks_for(end):
            seq.block_table.append(self._take())
        self._peak()

    def take(self, n: int) -> list[int]:
        """``n`` private blocks for a caller that manages its own slots (a KV policy's cache)."""
        if n > len(self._free):
            raise ConfigError(f"{n} KV blocks requested, {len(self._free)} free; use a larger pool")
        blocks = [self._take() for _ in range(n)]
        self._peak()
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Return blocks from :meth:`take` (or an evicting cache's tail) to the free list."""
        for b in reversed(blocks):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free[b] = None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent``."""
        for b in parent.block_table:
            self._hold(b)
        child.block_table = list(parent.block_table)

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of ``seq``'s blocks that became full and computed in the last step."""
        bs = self.block_size
        ids = seq.token_ids
        while len(seq.block_hashes) < seq.num_computed_tokens // bs:
            i = len(seq.block_hashes)
            tokens = tuple(ids[i * bs:(i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if self.enable_prefix_caching and self.block_hash[b] is None:
                self.block_hash[b], self.block_tokens[b] = h, tokens
                self.hash_to_block.setdefault(h, b)

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (kept in the prefix cache while nobody needs them)."""
        for b in reversed(seq.block_table):  # the tail first: it is the least likely to be shared again
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free[b] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep the keys/values of ``seq``'s first ``n`` tokens only: the blocks past them are released
        (a full one keeps its hash: its contents still match it), and the block holding position ``n``,
        whose slots from ``n`` on the next step overwrites, forgets its hash when ``seq`` alone holds it
        (a shared one is copied on write first and keeps it). Token ids are the caller's."""
        if n < 0:
            raise ConfigError(f"cannot truncate sequence {seq.seq_id} to {n} tokens")
        bs, keep = self.block_size, self.blocks_for(n)
        for b in reversed(seq.block_table[keep:]):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free[b] = None
        del seq.block_table[keep:]
        if n % bs and keep <= len(seq.block_table):
            b = seq.block_table[keep - 1]  # partly kept: its tail is rewritten
            h = self.block_hash[b]
            if h is not None and self.ref_count[b] == 1:
                if self.hash_to_block.get(h) == b:
                    del self.hash_to_block[h]
                self.block_hash[b] = self.block_tokens[b] = None
        del seq.block_hashes[n // bs:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, n)

    def usage(self, seqs: list[Sequence]) -> tuple[int, int]:
        """(slots in used blocks, slots of them holding a computed token of one of ``seqs``): the
        difference is the memory paging wastes (each sequence's last block's tail)."""
        bs, filled = self.block_size, {}
        for s in seqs:
            for j, b in enumerate(s.block_table):
                filled[b] = max(filled.get(b, 0), min(bs, max(0, s.num_computed_tokens - j * bs)))
        return self.num_used_blocks * bs, sum(filled.values())

    def _peak(self) -> None:
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
