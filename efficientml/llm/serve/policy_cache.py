"""A sequence's KV cache on blocks of the pool, evicting by a :class:`KVPolicy`: memory really freed.

    cache = PolicyKVCache.for_model(model, KVPolicy.streaming(4, 1020))
    logits = model(ids, cache=cache)            # prefill or a chunk; then one token at a time
    cache.held_blocks, cache.nbytes()           # what the sequence holds in the pool now

**Slots, not positions.** The cache holds ``used`` slots in its blocks (slot ``s`` lives in block
``table[s // block_size]`` at offset ``s % block_size``). Every layer and KV head keeps its own tokens in
those slots (H2O's choices differ per head) and remembers each slot's true position (``pos``) and, for
H2O, the attention it has received (``score``). A step of ``T`` tokens appends them at slots
``used … used+T-1`` in every layer; after the step (``advance``) the policy picks ``used - keep(n)``
victims per layer and head, the last slots move into the victims' places (no other slot moves),
and the blocks past the new end go back to the pool.

**Attention** (:meth:`PolicyKVCache.attend`) runs over the used slots with a mask from positions: a
query at ``t`` sees slots with ``pos ≤ t`` (and inside the policy's window, sinks excepted), so one
forward of many tokens (a prefill, a perplexity chunk) is exactly that many single-token steps of a
window policy. Keys are stored rotated at their true positions; StreamingLLM's positions inside the
cache turn each query once more for the sink keys (``KVPolicy.sink_shift``). Scores are materialized
per tile of at most 256 queries, never as a full attention matrix; H2O sums each tile's probabilities
over queries and the heads sharing a KV head.
"""

from __future__ import annotations

import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.llm.kv_cache import KVCache
from efficientml.llm.rope import apply_rope
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.kv_policy import KVPolicy

QUERY_TILE = 256


class PolicyKVCache(KVCache):
    attends = True

    def __init__(self, pool: BlockManager, policy: KVPolicy, inv_freq: torch.Tensor | None = None,
                 sliding_window: int | None = None) -> None:
        self.pool, self.policy = pool, policy
        self.inv_freq = inv_freq  # the model's RoPE frequencies: StreamingLLM's sink rotation
        if policy.kind == "streaming" and policy.reposition and inv_freq is None:
            raise ConfigError("StreamingLLM's positions inside the cache need a RoPE model (inv_freq)")
        self.window = policy.visible_window
        if sliding_window is not None:  # the model's own window (Mistral) also holds
            self.window = sliding_window if self.window is None else min(self.window, sliding_window)
        L, bs, nkv = pool.k.shape[0], pool.block_size, pool.k.shape[3]
        self.L, self.nkv, self.bs = L, nkv, bs
        self.table: list[int] = []
        self.used = 0  # slots holding a token, in every layer and head
        self.seen = 0  # tokens processed so far: the next token's position
        self.max_length = 1 << 62
        self.length = 0  # during a step: the context after it (the model's RoPE table size)
        dev = pool.k.device
        self.pos = torch.full((L, nkv, 0), -1, dtype=torch.long, device=dev)
        self.score = torch.zeros(L, nkv, 0, dtype=torch.float32, device=dev)
        self.peak_blocks = 0
        self.released_blocks = 0
        self.evicted_tokens = 0
        # the step under way: (tokens, their pool slots, every used slot, their positions, sink rotation)
        self._step: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, tuple | None] | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, policy: KVPolicy, pool: BlockManager | None = None,
                  block_size: int = 16, max_tokens: int = 1 << 15) -> "PolicyKVCache":
        """A cache for one sequence of ``model``; without ``pool`` a private one of ``max_tokens`` slots."""
        cfg = model.config
        if cfg.position_embedding == "alibi":
            raise ConfigError("KV policies need a RoPE model; ALiBi models are not supported")
        if pool is None:
            p = next(model.parameters())
            dt = p.dtype if p.is_floating_point() else torch.float32
            pool = BlockManager(cfg.num_hidden_layers, -(-max_tokens // block_size), block_size,
                                cfg.num_key_value_heads, cfg.dim_per_head, dt, p.device, enable_prefix_caching=False)
        inv = model.model.rope.inv_freq if cfg.position_embedding == "rope" else None
        return cls(pool, policy, inv, cfg.sliding_window)

    # ---- memory
    @property
    def held_blocks(self) -> int:
        return len(self.table)

    def nbytes(self) -> int:
        """Bytes of the blocks this sequence holds (keys and values, every layer)."""
        per = self.pool.nbytes() // self.pool.num_blocks
        return per * len(self.table)

    def _grow(self, slots: int) -> None:
        need = -(-slots // self.bs) - len(self.table)
        if need > 0:
            self.table += self.pool.take(need)
            self.peak_blocks = max(self.peak_blocks, len(self.table))
        cap = len(self.table) * self.bs
        if self.pos.shape[2] < cap:
            extra = cap - self.pos.shape[2]
            self.pos = torch.cat([self.pos, self.pos.new_full((self.L, self.nkv, extra), -1)], 2)
            self.score = torch.cat([self.score, self.score.new_zeros(self.L, self.nkv, extra)], 2)

    def _shrink(self) -> None:
        keep = -(-self.used // self.bs)
        if keep < len(self.table):
            tail = self.table[keep:]
            del self.table[keep:]
            self.pool.release(tail)
            self.released_blocks += len(tail)

    def _flat(self, slots: torch.Tensor) -> torch.Tensor:
        """Slot indices → indices into a layer's pool viewed as (num_blocks * block_size, n_kv, hd)."""
        table = torch.tensor(self.table, dtype=torch.long, device=slots.device)
        return table[slots // self.bs] * self.bs + slots % self.bs

    # ---- one step
    def next_positions(self, n: int) -> torch.Tensor:
        """Start a step of ``n`` tokens (the model calls this): room for them, their positions (n,)."""
        dev = self.pool.k.device
        self._grow(self.used + n)
        q_pos = torch.arange(self.seen, self.seen + n, device=dev)
        self.pos[:, :, self.used:self.used + n] = q_pos
        self.score[:, :, self.used:self.used + n] = 0
        flat = self._flat(torch.arange(self.used + n, device=dev))
        self._step = (n, flat[self.used:], flat, q_pos, self._sink_rotation(q_pos))
        self.length = self.seen + n
        return q_pos

    def _sink_rotation(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin (T, r) turning each query by its StreamingLLM shift (the same in every layer), or None."""
        shift = self.policy.sink_shift(q_pos)
        if shift is None:
            return None
        f = shift.double()[:, None].cpu() * self.inv_freq.double()[None]  # (T, r/2)
        emb = torch.cat([f, f], -1).to(device=q_pos.device)
        dt = self.pool.k.dtype
        return emb.cos().to(dt), emb.sin().to(dt)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """q (1, nh, T, hd), k/v (1, nkv, T, hd), rotated at their true positions → (1, T, nh*hd)."""
        if self._step is None or self._step[0] != q.shape[2]:
            raise ShapeError("a PolicyKVCache step starts in model(ids, cache=cache) without input_pos")
        T, new, flat, q_pos, rot = self._step
        _, nh, _, hd = q.shape
        kp, vp = self.pool.k[layer_idx].view(-1, self.nkv, hd), self.pool.v[layer_idx].view(-1, self.nkv, hd)
        kp.index_copy_(0, new, k[0].transpose(0, 1))
        vp.index_copy_(0, new, v[0].transpose(0, 1))
        K, V = kp[flat].transpose(0, 1), vp[flat].transpose(0, 1)  # (nkv, S, hd)
        pos = self.pos[layer_idx, :, :flat.shape[0]]  # (nkv, S)
        g = nh // self.nkv
        qg = q[0].view(self.nkv, g, T, hd)
        scale = hd ** -0.5 if scale is None else scale
        out = q.new_empty(self.nkv, g, T, hd)
        for a in range(0, T, QUERY_TILE):
            b = min(T, a + QUERY_TILE)
            r = None if rot is None else (rot[0][a:b], rot[1][a:b])
            out[:, :, a:b] = self._tile(layer_idx, qg[:, :, a:b], K, V, pos, q_pos[a:b], scale, r)
        return out.permute(2, 0, 1, 3).reshape(1, T, nh * hd)

    def _tile(self, layer_idx: int, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, pos: torch.Tensor,
              q_pos: torch.Tensor, scale: float, rot: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Attention of queries q (nkv, g, t, hd) at ``q_pos`` (t,) over the used slots → (nkv, g, t, hd)."""
        s = torch.matmul(q, K.transpose(1, 2)[:, None]).float() * scale  # (nkv, g, t, S)
        n_sink = self.policy.sinks
        if rot is not None:  # StreamingLLM: each query turned back by its shift, against the sinks only
            qs = apply_rope(q, rot[0].to(q.dtype), rot[1].to(q.dtype))
            s[..., :n_sink] = torch.matmul(qs, K[:, None, :n_sink].transpose(2, 3)).float() * scale
        ok = pos[:, None, :] <= q_pos[None, :, None]  # (nkv, t, S)
        if self.window is not None:
            inside = pos[:, None, :] > q_pos[None, :, None] - self.window
            ok &= inside | (pos[:, None, :] < n_sink)
        p = torch.softmax(s.masked_fill(~ok[:, None], float("-inf")), dim=-1)  # (nkv, g, t, S)
        if self.policy.needs_scores:
            self.score[layer_idx, :, :p.shape[-1]] += p.sum(dim=(1, 2))
        return torch.matmul(p.to(V.dtype), V[:, None])

    def advance(self, n: int) -> None:
        """End of a step: the tokens count as seen, the policy evicts, the blocks past the end go back."""
        self.used += n
        self.seen += n
        self._step = None
        keep = self.policy.keep(self.seen)
        if self.used > keep:
            self._evict(self.used - keep)
        self._shrink()

    def _evict(self, e: int) -> None:
        """Evict ``e`` slots in every layer and head: the policy's victims; the slots past the new end
        that survive move into the victims' places below it."""
        n, new_used = self.used, self.used - e
        order = self.policy.evict_order(self.pos[:, :, :n], self.score[:, :, :n], self.seen)  # (L, nkv, n)
        victims = order.topk(e, dim=-1, largest=False).indices  # (L, nkv, e)
        gone = torch.zeros(self.L, self.nkv, n, dtype=torch.bool, device=order.device)
        gone.scatter_(2, victims, True)
        slot = torch.arange(n, device=order.device)
        holes = gone & (slot < new_used)  # victims below the new end: to be refilled
        movers = ~gone & (slot >= new_used)  # survivors past it: to move down
        dst = (~holes).to(torch.int8).argsort(dim=-1, stable=True)[..., :e]  # holes first, then filler
        src = (~movers).to(torch.int8).argsort(dim=-1, stable=True)[..., :e]
        real = torch.arange(e, device=order.device) < holes.sum(-1, keepdim=True)
        src = torch.where(real, src, dst)  # filler entries copy a slot onto itself
        li = torch.arange(self.L, device=order.device)[:, None, None].expand_as(dst)
        hi = torch.arange(self.nkv, device=order.device)[None, :, None].expand_as(dst)
        fd, fs = self._flat(dst), self._flat(src)
        for buf in (self.pool.k, self.pool.v):
            flat = buf.view(self.L, -1, self.nkv, buf.shape[-1])
            flat[li, fd, hi] = flat[li, fs, hi]
        self.pos[li, hi, dst] = self.pos[li, hi, src]
        self.score[li, hi, dst] = self.score[li, hi, src]
        self.pos[:, :, new_used:n] = -1
        self.score[:, :, new_used:n] = 0
        self.used = new_used
        self.evicted_tokens += e

    def reset(self) -> None:
        self.used = self.seen = self.length = 0
        self.pos.fill_(-1)
        self.score.zero_()
        self._shrink()

    def free(self) -> None:
        """Give every block back (the sequence is done)."""
        self.reset()


@torch.inference_mode()
def stream_perplexity(model: torch.nn.Module, ids: list[int] | torch.Tensor, policy: KVPolicy,
                      chunk: int = 256, block_size: int = 16) -> dict:
    """Perplexity of ``ids`` read as one stream under ``policy``, ``chunk`` tokens per forward: every
    token but the first is scored once, seeing what the policy keeps (window policies exactly as
    single-token steps; H2O evicts after each chunk). Returns perplexity, tokens scored, and the KV
    bytes held at the end and at the peak."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ShapeError(f"a perplexity stream needs at least 2 tokens, got {ids.numel()}")
    if chunk < 1:
        raise ConfigError(f"chunk must be ≥ 1 token, got {chunk}")
    n = ids.numel()
    room = n if policy.kind in ("full", "h2o") else policy.sinks + policy.window  # type: ignore[operator]
    cache = PolicyKVCache.for_model(model, policy, block_size=block_size, max_tokens=room + chunk + block_size)
    dev = model.model.embed_tokens.weight.device
    nll = torch.zeros((), dtype=torch.float64)
    for a in range(0, n - 1, chunk):
        b = min(n - 1, a + chunk)
        logits = model(ids[None, a:b].to(dev), cache=cache)[0]
        nll += torch.nn.functional.cross_entropy(logits.float(), ids[a + 1:b + 1].to(dev), reduction="sum").cpu()
    per_block = cache.pool.nbytes() // cache.pool.num_blocks
    return {"perplexity": float(torch.exp(nll / (n - 1))), "tokens_scored": n - 1, "kv_policy": policy.to_dict(),
            "kv_bytes_end": cache.nbytes(), "kv_bytes_peak": cache.peak_blocks * per_block}
