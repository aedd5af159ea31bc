"""A KVCache over the block pool, for one forward over ragged sequences.

**Layout: flattened, not padded.** A step's sequences contribute different numbers of tokens (a
prefill chunk of hundreds, decodes of one), so they run as one row ``(1, total_tokens)``: every
linear (the bulk of the work) sees exactly the real tokens, where padding to the longest chunk
would multiply a mixed step's work by up to ``max_num_seqs``. Only attention needs the sequence
boundaries, and this cache supplies them: it sets ``attends = True`` and the model's attention
calls :meth:`PagedKVCache.attend`, which

1. writes the step's new keys/values into their slots, ``block_table[p // bs] * bs + p % bs``, of the
   preallocated pool (one ``index_copy_`` per layer for the whole batch);
2. attends each sequence to its own keys, read through its block table:
   - decodes (one query each) together: their used blocks gathered into a ``(B, n_kv, S, hd)``
     batch, ``S`` the longest of their contexts rounded up to blocks, shorter ones masked;
   - each prefill chunk alone: its used blocks gathered to ``(1, n_kv, context, hd)``, causal mask
     over absolute positions (the chunk's queries see the earlier chunks and prefix-cache blocks).

Only the blocks of the sequences in the step are read, never the whole pool. Decodes on a CPU fp32
pool run on :mod:`efficientml.llm.kernels.cpu_paged_attention` (``use_kernel``): a C kernel that reads
each key/value in place through the block table, no gathered copy; elsewhere (and for prefill
chunks, whose gather is shared by all their queries) torch ops: indexing by the block table, then
``scaled_dot_product_attention``. Sliding-window models mask keys beyond the window; ALiBi is not
supported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from efficientml.core.errors import ShapeError
from efficientml.llm.kernels import cpu_paged_attention
from efficientml.llm.kv_cache import KVCache
from efficientml.llm.serve.block_manager import BlockManager

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass
class _Chunk:
    start: int  # first query's index in the flattened batch
    end: int
    blocks: torch.Tensor  # (nb,) the sequence's used blocks
    context: int  # keys after this step
    mask: torch.Tensor  # (n, context) bool


class PagedKVCache(KVCache):
    attends = True

    def __init__(self, blocks: BlockManager, sliding_window: int | None = None, use_kernel: bool = True) -> None:
        self.pool = blocks
        self.sliding_window = sliding_window
        self.use_kernel = use_kernel  # decodes on the CPU paged-attention kernel where it runs
        self._kernel_ok: bool | None = None  # decided at the first attend (needs the number of heads)
        self.max_length = 1 << 62  # bounded by the pool, not per sequence
        self.length = 0  # set by plan(): the longest context in the step
        self.chunks: list[_Chunk] = []
        self.decode_rows = torch.empty(0, dtype=torch.long)
        self.decode_tables = torch.empty(0, 0, dtype=torch.long)
        self.decode_mask = torch.empty(0, 1, 1, 0, dtype=torch.bool)
        self.slots = torch.empty(0, dtype=torch.long)

    def plan(self, items: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """Lay out a step: ``items`` = (block table, computed tokens before, new tokens) per sequence,
        in batch order. Returns each new token's position (T,) for the model's ``input_pos``."""
        bs, dev = self.pool.block_size, self.pool.k.device
        pos, rows, tables, ctxs = [], [], [], []
        self.chunks = []
        t = 0
        for table, done, n in items:
            p = torch.arange(done, done + n)
            pos.append(p)
            ctx = done + n
            if len(table) * bs < ctx:
                raise ShapeError(f"a block table of {len(table)} blocks cannot hold {ctx} tokens")
            used = torch.tensor(table[:-(-ctx // bs)], dtype=torch.long)
            if n == 1:
                rows.append(t)
                tables.append(used)
                ctxs.append(ctx)
            else:
                self.chunks.append(_Chunk(t, t + n, used.to(dev), ctx, self._mask(p, ctx).to(dev)))
            t += n
        positions = torch.cat(pos)
        flat = torch.tensor([b for table, _, _ in items for b in table], dtype=torch.long)
        offsets = torch.tensor([0] + [len(tb) for tb, _, _ in items[:-1]]).cumsum(0)
        which = torch.repeat_interleave(offsets, torch.tensor([n for _, _, n in items]))
        self.slots = (flat[which + positions // bs] * bs + positions % bs).to(dev)  # (T,) pool slots
        self._plan_decodes(rows, tables, ctxs, dev)
        self.length = max(d + n for _, d, n in items)
        return positions.to(dev)

    def _mask(self, q_pos: torch.Tensor, ctx: int) -> torch.Tensor:
        rel = torch.arange(ctx)[None, :] - q_pos[:, None]  # (n, ctx), ≤ 0 where visible
        ok = rel <= 0
        if self.sliding_window is not None:
            ok &= rel > -self.sliding_window
        return ok

    def _plan_decodes(self, rows: list[int], tables: list[torch.Tensor], ctxs: list[int],
                      dev: torch.device) -> None:
        bs = self.pool.block_size
        mb = max((len(tb) for tb in tables), default=0)
        padded = torch.zeros(len(tables), mb, dtype=torch.long)  # padding points at block 0, masked out
        for i, tb in enumerate(tables):
            padded[i, :len(tb)] = tb
        ctx = torch.tensor(ctxs, dtype=torch.long)
        k_pos = torch.arange(mb * bs)[None, :]
        ok = k_pos < ctx[:, None]  # (B, S)
        if self.sliding_window is not None:
            ok &= k_pos > ctx[:, None] - 1 - self.sliding_window
        self.decode_rows = torch.tensor(rows, dtype=torch.long, device=dev)
        self.decode_ctx = ctx.to(dev)
        self.decode_tables = padded.to(dev)
        self.decode_mask = ok[:, None, None, :].to(dev)  # (B, 1, 1, S)

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        _, nkv, T, hd = k.shape
        if T != self.slots.shape[0]:
            raise ShapeError(f"{T} new tokens but the step was planned for {self.slots.shape[0]}")
        self.pool.k[layer_idx].view(-1, nkv, hd).index_copy_(0, self.slots, k[0].transpose(0, 1))
        self.pool.v[layer_idx].view(-1, nkv, hd).index_copy_(0, self.slots, v[0].transpose(0, 1))

    def _gather(self, layer_idx: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values of ``blocks`` (…, nb) → (…, n_kv, nb * bs, hd)."""
        k, v = self.pool.k[layer_idx][blocks], self.pool.v[layer_idx][blocks]  # (…, nb, bs, nkv, hd)
        shape = (*blocks.shape[:-1], -1, k.shape[-2], k.shape[-1])
        return k.reshape(shape).transpose(-3, -2), v.reshape(shape).transpose(-3, -2)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """q (1, nh, T, hd), k/v (1, nkv, T, hd) of the flattened step → attention output (1, T, nh*hd)."""
        self._write(layer_idx, k, v)
        _, nh, T, hd = q.shape
        out = q.new_empty(T, nh, hd)
        if self.decode_rows.numel() and self._kernel(nh):
            qd = q[0, :, self.decode_rows].transpose(0, 1)  # (B, nh, hd)
            out[self.decode_rows] = cpu_paged_attention.paged_decode_attention(
                qd, self.pool.k[layer_idx], self.pool.v[layer_idx], self.decode_tables, self.decode_ctx,
                hd ** -0.5 if scale is None else scale, self.sliding_window)
        elif self.decode_rows.numel():
            kd, vd = self._gather(layer_idx, self.decode_tables)  # (B, nkv, S, hd)
            qd = q[0, :, self.decode_rows].transpose(0, 1)[:, :, None]  # (B, nh, 1, hd)
            out[self.decode_rows] = _sdpa(qd, kd, vd, self.decode_mask, scale)[:, :, 0]
        for c in self.chunks:
            kc, vc = self._gather(layer_idx, c.blocks)  # (nkv, nb*bs, hd)
            o = _sdpa(q[:, :, c.start:c.end], kc[None, :, :c.context], vc[None, :, :c.context], c.mask, scale)
            out[c.start:c.end] = o[0].transpose(0, 1)  # (n, nh, hd)
        return out.reshape(1, T, nh * hd)

    def _kernel(self, num_heads: int) -> bool:
        if self._kernel_ok is None:
            self._kernel_ok = self.use_kernel and cpu_paged_attention.supports(self.pool.k[0], num_heads)
        return self._kernel_ok

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain interface, for a step of one sequence: store, return its keys/values (1, nkv, S, hd)."""
        if len(self.chunks) + self.decode_rows.numel() != 1:
            raise ShapeError("update() serves a step of one sequence; ragged steps go through attend()")
        self._write(layer_idx, k, v)
        if self.chunks:
            c = self.chunks[0]
            kc, vc = self._gather(layer_idx, c.blocks)
            return kc[None, :, :c.context], vc[None, :, :c.context]
        kd, vd = self._gather(layer_idx, self.decode_tables)
        n = int(self.decode_mask.sum())
        return kd[:, :, :n], vd[:, :, :n]

    def advance(self, n: int) -> None:
        pass  # positions live in the sequences (the engine advances their computed counts)

    def nbytes(self) -> int:
        return self.pool.nbytes()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          scale: float | None) -> torch.Tensor:
    g = q.shape[-3] // k.shape[-3]
    if g > 1 and not _HAS_GQA:
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    kw = {"enable_gqa": True} if g > 1 and _HAS_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
