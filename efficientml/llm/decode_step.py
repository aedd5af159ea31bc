"""The decode step, captured or compiled once per static cache (``generate`` picks it with
:func:`decode_step`): a CUDA graph over a static-shape cache (optionally ``torch.compile``-d inside
it), or on CPU one ``torch.compile``-d step. Either takes the token ids and the position and gives the
next logits; the caller tracks positions (``cache.length``)."""

from __future__ import annotations

import torch

from efficientml.llm.kv_cache import KVCache, StaticKVCache


class _StepCache(KVCache):
    """A decode step's view of a static cache: the same buffers, positions taken from ``input_pos``,
    no Python-int bookkeeping (``torch.compile`` would guard on the length and recompile every step)."""

    static_shapes = True

    def __init__(self, cache: StaticKVCache) -> None:
        self.inner, self.max_length, self.length = cache, cache.max_length, 0

    def update(self, layer_idx, k, v, input_pos):
        return self.inner.update(layer_idx, k, v, input_pos)

    def advance(self, n: int) -> None:
        pass

    @property
    def key_mask(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.inner.key_mask


class _GraphStep:
    """A decode step captured as a CUDA graph over a static-shape cache. Inputs are copied into fixed
    buffers, then the graph replays: no Python, no kernel launches per layer."""

    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, batch: int, use_compile: bool) -> None:
        dev = cache.k.device
        self.model, self.cache, self.view, self.batch = model, cache, _StepCache(cache), batch
        self.key_mask = cache.key_mask  # the padding mask the graph reads (None: no padding)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        # warm-up and capture write one slot; use the last one, which the mask hides until it is reached
        self.pos = torch.full((1,), cache.max_length - 1, dtype=torch.long, device=dev)
        self.fn = torch.compile(self._eager, fullgraph=True, dynamic=False) if use_compile else self._eager
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (allocations, rope tables, autotuning) off the capture
            for _ in range(3):
                self.out = self.fn()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.fn()

    def _eager(self) -> torch.Tensor:  # the caller tracks positions; the graph has no Python bookkeeping
        return self.model(self.ids, self.view, input_pos=self.pos, num_logits=1)[:, -1]  # (B, V)

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        self.ids.copy_(ids.view_as(self.ids))
        self.pos.fill_(pos)
        self.graph.replay()
        return self.out


class _CompiledStep:
    """CPU: the decode step compiled once per static cache (fused elementwise ops, no per-op dispatch);
    the caller tracks positions."""

    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, batch: int) -> None:
        self.model, self.view, self.batch = model, _StepCache(cache), batch
        self.key_mask = cache.key_mask
        self.fn = torch.compile(self._eager, fullgraph=True, dynamic=False)

    def _eager(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(ids, self.view, input_pos=pos, num_logits=1)[:, -1]  # (B, V)

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        return self.fn(ids, torch.tensor([pos], device=ids.device))


def decode_step(model: torch.nn.Module, cache: KVCache, B: int, cuda_graph: bool | None,
                use_compile: bool):
    """The captured (CUDA graph) or compiled (CPU) decode step for this cache, made once per cache and
    reused while batch, model and padding mask are the same (reuse the cache with reset()); on CPU
    without compile, the model's ``cpu_decode_step(model, cache, B)`` when one is installed (the native C
    step of ``kernels.prepare_cpu_decode``; it answers None where it cannot run); None: the step runs
    eagerly."""
    dev = next(model.parameters()).device
    # dynamic-NTK / LongRoPE past the trained context needs the sequence length on the host every step
    rope = getattr(getattr(model, "model", None), "rope", None)
    eager_only = bool(getattr(rope, "dynamic", False)) and cache.max_length > rope.initial
    static = isinstance(cache, StaticKVCache) and cache.static_shapes and not eager_only
    use_graph = (cuda_graph if cuda_graph is not None else dev.type == "cuda") and dev.type == "cuda" and static
    if not use_graph and not (use_compile and dev.type == "cpu" and static):
        factory = getattr(model, "cpu_decode_step", None)  # installed by kernels.prepare_cpu_decode
        if factory is not None and dev.type == "cpu" and not use_compile and not eager_only:
            return factory(model, cache, B)  # the whole step in C, or None (eager)
        return None
    attr = "_graph_step" if use_graph else "_compiled_step"
    step = getattr(cache, attr, None)
    if step is None or step.batch != B or step.model is not model or step.key_mask is not cache.key_mask:
        step = _GraphStep(model, cache, B, use_compile) if use_graph else _CompiledStep(model, cache, B)
        setattr(cache, attr, step)
    return step
