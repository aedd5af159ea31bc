"""Key/value caches: a small interface between attention and wherever past keys and values live.

The model never owns a cache; the caller creates one and passes it to ``model(ids, cache=cache)``.
One forward of ``T`` new tokens does:

1. ``start = cache.length`` — the new tokens take absolute positions ``start … start+T-1``;
2. each attention layer calls ``k_all, v_all = cache.update(layer_idx, k, v, input_pos)`` with its new
   ``k, v`` of shape ``(B, n_kv_heads, T, head_dim)`` and gets back every key/value the new queries may
   attend to, ``(B, n_kv_heads, S, head_dim)``;
3. the model calls ``cache.advance(T)`` once all layers are done.

Left padding (a batch of prompts of different lengths): ``key_mask`` (B, max_length) bool says which
slots hold real tokens; it is None (every slot real) until :meth:`KVCache.mark_keys` records a
padding slot, and the model hides the False slots from every later query.

``S`` is ``start + T`` for a cache with ``static_shapes = False`` (the CPU path: slice the filled
prefix, nothing wasted), and ``max_length`` for ``static_shapes = True`` (every step has the same
shapes, as CUDA graphs and ``torch.compile`` need); the model then masks keys past each query's position.

To add a quantized (int8/int4) cache, subclass :class:`KVCache`: ``update`` stores the new entries in
its own format and returns dequantized views. A paged cache (the serving engine's
:class:`~efficientml.llm.serve.paged_cache.PagedKVCache`) sets ``attends = True``: one forward runs
several ragged sequences flattened into one row, so no single key set fits every query; attention
then calls ``cache.attend(layer_idx, q, k, v, scale)``, which stores the new keys/values in the
sequences' blocks and returns the attention output (1, T, n_heads * head_dim). The model takes each
token's position from ``input_pos`` and the batch's longest context from ``cache.length``.
"""

from __future__ import annotations

import torch

from efficientml.core.errors import ConfigError, ShapeError


class KVCache:
    """Interface. ``length`` tokens are stored per row (all rows of a batch share it)."""

    max_length: int
    length: int = 0
    static_shapes: bool = False
    attends: bool = False  # True: attention goes through attend() (paged caches over ragged batches)
    key_mask: torch.Tensor | None = None  # (B, max_length) bool, False: a padding slot

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        raise NotImplementedError

    def next_positions(self, n: int) -> torch.Tensor:
        """For an ``attends`` cache of one sequence: start a step of ``n`` tokens, return their positions."""
        raise ShapeError("a paged cache needs input_pos: each token's position in its own sequence")

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
        if self.key_mask is not None:  # every slot real again; the same tensor, which a captured or
            self.key_mask.fill_(True)  # compiled decode step may read

    def mark_keys(self, input_pos: torch.Tensor, real: torch.Tensor) -> None:
        """Record which of the slots at ``input_pos`` (T,) receive real tokens: ``real`` (B, T) bool.
        All-real marks change nothing while no padding has been recorded (one host sync)."""
        if self.key_mask is None:
            if bool(real.all()):
                return
            with torch.inference_mode(False):  # a normal tensor: reset() refills it outside inference mode
                self.key_mask = torch.ones(real.shape[0], self.max_length, dtype=torch.bool, device=real.device)
        if real.shape[0] != self.key_mask.shape[0]:
            raise ShapeError(f"padding mask for {real.shape[0]} rows; the cache holds {self.key_mask.shape[0]}")
        self.key_mask.index_copy_(1, input_pos.to(real.device), real)

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise ShapeError(f"{self.length} cached + {n} new tokens exceed the cache's "
                             f"max_length {self.max_length}; use a shorter prompt or fewer new tokens")

    def nbytes(self) -> int:
        return 0


class StaticKVCache(KVCache):
    """Preallocated ``(layers, B, n_kv_heads, max_length, head_dim)`` buffers, written in place:
    no allocation per decoding step."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", static_shapes: bool = False) -> None:
        if max_length <= 0 or batch_size <= 0:
            raise ConfigError(f"cache needs positive batch_size and max_length, got {batch_size}, {max_length}")
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.static_shapes = static_shapes
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_length: int,
                  static_shapes: bool = False, dtype: torch.dtype | None = None) -> "StaticKVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.dim_per_head,
                   max_length, dtype or (p.dtype if p.is_floating_point() else torch.float32),
                   p.device, static_shapes)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.k[layer_idx], self.v[layer_idx]  # (B, n_kv, max_length, hd)
        if self.static_shapes:
            kb.index_copy_(2, input_pos, k)  # positions as a tensor: no host sync, graph-capturable
            vb.index_copy_(2, input_pos, v)
            return kb, vb
        start, end = self.length, self.length + k.shape[2]
        kb[:, :, start:end] = k
        vb[:, :, start:end] = v
        return kb[:, :, :end], vb[:, :, :end]  # (B, n_kv, start+T, hd)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
