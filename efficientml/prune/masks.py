"""Masks at every granularity, and the machinery that keeps them applied.

Each ``*_mask`` function turns an importance score shaped like the weight (larger = more important)
into a 0/1 mask of the same shape. Weight layouts: conv ``(C_out, C_in, kH, kW)``, linear
``(C_out, C_in)``.

- ``fine``: individual weights; exactly ``round(sparsity · numel)`` zeros.
- ``pattern``: each k×k kernel keeps ``keep`` positions chosen from a library of ``num_patterns``
  patterns (the most popular best-fitting patterns of this layer), so hardware sees few shapes.
- ``nm``: at most N nonzeros in every M consecutive weights along the input-channel dimension
  (for convs, per kernel position — the layout sparse tensor cores expect after im2col).
- ``vector``: rows of kernels (``kW`` weights; for a linear, a whole row = one neuron's fan-in).
- ``kernel``: whole k×k kernels ``(o, i)``.
- ``channel``: whole output channels (the simulated twin of :mod:`surgery`).

:class:`MaskSet` attaches masks with a forward pre-hook (weights are multiplied by the mask before
each forward) and is itself the ``after_step`` callback of ``train.fit``: calling it re-zeroes the
pruned weights after every optimizer step, so momentum can never bring them back.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError, UnsupportedError
from efficientml.core.modules import get_module


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``numel - round(sparsity · numel)`` highest scores (exact count; ties by position)."""
    _check_sparsity(sparsity)
    flat = scores.flatten()
    n_zero = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_zero:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_zero]] = False
    return mask.view_as(scores)


def fine_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    return topk_mask(scores, sparsity)


def _group_mask(scores: torch.Tensor, sparsity: float, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    group = scores.sum(dim=reduce_dims, keepdim=True)
    return topk_mask(group, sparsity).expand_as(scores)


def vector_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    return _group_mask(scores, sparsity, (scores.dim() - 1,))


def kernel_mask(scores: torch.Tensor, sparsity: float, layer: str = "") -> torch.Tensor:
    if scores.dim() < 3:
        raise UnsupportedError(f"kernel-level pruning needs a conv weight; layer {layer!r} has shape "
                               f"{tuple(scores.shape)}")
    return _group_mask(scores, sparsity, tuple(range(2, scores.dim())))


def channel_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    return _group_mask(scores, sparsity, tuple(range(1, scores.dim())))


def nm_mask(scores: torch.Tensor, n: int, m: int, layer: str = "") -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive input channels (dim 1), per output
    channel and kernel position. The one N:M mask: CNN pruning, sparse execution and the LLM pruners
    (magnitude, Wanda, SparseGPT) all use it."""
    if n > m:
        raise ConfigError(f"N:M sparsity needs N ≤ M, got N={n} > M={m}")
    c_in = scores.shape[1]
    if c_in % m:
        raise ShapeError(f"layer {layer!r} has {c_in} input channels, which is not divisible by M={m}; "
                         f"N:M sparsity groups M consecutive input channels")
    s = scores.movedim(1, -1)                                   # (C_out, [kH, kW,] C_in)
    groups = s.reshape(*s.shape[:-1], c_in // m, m)             # (..., C_in/M, M)
    idx = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(s.shape).movedim(-1, 1).contiguous()


def kernel_patterns(area: int, keep: int) -> torch.Tensor:
    """Every way to keep ``keep`` of ``area`` positions: a (P, area) 0/1 matrix."""
    combos = list(itertools.combinations(range(area), keep))
    pats = torch.zeros(len(combos), area)
    for i, c in enumerate(combos):
        pats[i, list(c)] = 1
    return pats


def pattern_mask(scores: torch.Tensor, keep: int = 4, num_patterns: int = 8, layer: str = "") -> torch.Tensor:
    """Each k×k kernel keeps ``keep`` positions, using one of ``num_patterns`` layer-wide patterns."""
    if scores.dim() != 4:
        raise UnsupportedError(f"pattern pruning needs a 2-D conv weight; layer {layer!r} has shape "
                               f"{tuple(scores.shape)}")
    area = scores.shape[2] * scores.shape[3]
    if area <= 1 or keep >= area:
        raise ConfigError(f"pattern pruning keeps {keep} of {area} kernel positions in layer {layer!r}; "
                          f"needs keep < kernel area (use 3×3 or larger kernels)")
    if math.comb(area, keep) > 20000:
        raise ConfigError(f"{math.comb(area, keep)} candidate patterns for {area} positions keep {keep}; "
                          f"too many to search")
    k = scores.reshape(-1, area).float()                         # (C_out·C_in, area)
    pats = kernel_patterns(area, keep).to(k.device)              # (P, area)
    fit = k @ pats.T                                             # retained importance per pattern
    best = fit.argmax(dim=1)
    counts = torch.bincount(best, minlength=pats.shape[0])
    library = counts.argsort(descending=True, stable=True)[:num_patterns]
    choice = library[(k @ pats[library].T).argmax(dim=1)]
    return pats[choice].bool().reshape(scores.shape)


def make_mask(scores: torch.Tensor, method: str, sparsity: float = 0.5, *, n: int = 2, m: int = 4,
              keep: int = 4, num_patterns: int = 8, layer: str = "") -> torch.Tensor:
    """The mask of ``method`` (one of config.GRANULARITIES) for one layer's importance scores."""
    if method == "fine":
        return fine_mask(scores, sparsity)
    if method == "vector":
        return vector_mask(scores, sparsity)
    if method == "kernel":
        return kernel_mask(scores, sparsity, layer)
    if method == "channel":
        return channel_mask(scores, sparsity)
    if method == "nm":
        return nm_mask(scores, n, m, layer)
    if method == "pattern":
        return pattern_mask(scores, keep, num_patterns, layer)
    raise ConfigError(f"unknown granularity {method!r}")


class MaskSet:
    """Masks keyed by layer name, kept applied by forward pre-hooks and by ``masks(model)`` calls.

        masks = MaskSet(model, {"conv1": m1})
        fit(model, loader, cfg, after_step=masks)   # re-zeroes after each optimizer step
        masks.remove()                              # bake the zeros in, drop the hooks
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}
        self._hooks = []
        for name, mask in masks.items():
            module = get_module(model, name)
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(mask.shape):
                raise ShapeError(f"mask for layer {name!r} has shape {tuple(mask.shape)}, its weight "
                                 f"{tuple(w.shape) if isinstance(w, torch.Tensor) else None}")
            self.masks[name] = mask.to(device=w.device, dtype=torch.bool)
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook(name)))
        self.apply()

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                mask = self.masks[name]
                if mask.device != module.weight.device:
                    self.masks[name] = mask = mask.to(module.weight.device)
                module.weight.mul_(mask)
        return hook

    @torch.no_grad()
    def apply(self, model: nn.Module | None = None) -> None:
        """Zero every masked weight now (the ``after_step`` callback)."""
        model = model if model is not None else self.model
        for name, mask in self.masks.items():
            w = get_module(model, name).weight
            w.mul_(mask.to(w.device))

    __call__ = apply

    def remove(self) -> nn.Module:
        """Apply once more, then detach the hooks: the model is plain again (zeros stay)."""
        self.apply()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return self.model

    def sparsity(self) -> dict[str, float]:
        return {n: 1.0 - m.float().mean().item() for n, m in self.masks.items()}

    def zeros(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())
