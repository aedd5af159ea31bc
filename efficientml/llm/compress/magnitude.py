"""Sparsity masks (unstructured and N:M) and magnitude pruning, the baseline Wanda and SparseGPT beat.

A mask is a bool tensor shaped like the weight, True = keep. ``n_m=(2, 4)`` keeps the 2 largest of every
4 consecutive input weights of each row (the layout sparse tensor cores accelerate): the N:M mask is
:func:`efficientml.prune.masks.nm_mask`, the same one the CNN pruner uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.prune.masks import nm_mask


@dataclass(frozen=True)
class LLMPruneConfig(Config):
    """LLM pruning. ``method``: magnitude | wanda | sparsegpt. ``n_m=(N, M)`` for N:M (then
    ``sparsity`` is 1 − N/M and need not be given); otherwise unstructured at ``sparsity``. Applied by
    ``efficientml.apply`` (handler in llm/compress/apply.py); the CNN one is efficientml.prune.PruneConfig."""

    kind = "llm_prune"
    method: str = "wanda"
    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    damp: float = 0.01              # SparseGPT
    block_size: int = 128           # SparseGPT
    propagate: str = "pruned"       # next block's inputs from the pruned block, or "fp"

    def validate(self) -> None:
        check_choice("method", self.method, ("magnitude", "wanda", "sparsegpt"))
        check_choice("propagate", self.propagate, ("pruned", "fp"))
        if self.n_m is not None:
            n, m = self.n_m
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
                raise ConfigError(f"n_m must be (N, M) with 0 < N < M, got {self.n_m!r}")
        else:
            check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)

    @property
    def effective_sparsity(self) -> float:
        return 1 - self.n_m[0] / self.n_m[1] if self.n_m else self.sparsity


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Drop the lowest ``sparsity`` fraction of scores, in each row (``per_row``) or in the whole matrix."""
    if per_row:
        k = int(score.shape[1] * sparsity)
        keep = torch.ones_like(score, dtype=torch.bool)
        if k:
            keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
        return keep
    k = int(score.numel() * sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[torch.topk(score.flatten(), k, largest=False).indices] = False
    return keep.reshape(score.shape)


def mask_from_score(score: torch.Tensor, cfg: LLMPruneConfig, per_row: bool) -> torch.Tensor:
    if cfg.n_m is not None:
        return nm_mask(score, *cfg.n_m)
    return unstructured_mask(score, cfg.sparsity, per_row)


def magnitude_mask(w: torch.Tensor, cfg: LLMPruneConfig) -> torch.Tensor:
    """|W|, thresholded over the whole layer (unstructured) or per M-group (N:M)."""
    return mask_from_score(w.abs().float(), cfg, per_row=False)


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, cfg: LLMPruneConfig) -> dict[str, float]:
    """Prune every decoder-block linear in place (no calibration); returns each layer's sparsity."""
    from efficientml.llm.compress.mappings import BLOCK_LINEARS

    stats = {}
    for i, block in enumerate(model.model.layers):
        for name in BLOCK_LINEARS:
            lin = block.get_submodule(name)
            keep = magnitude_mask(lin.weight, cfg)
            lin.weight.mul_(keep.to(lin.weight.dtype))
            stats[f"model.layers.{i}.{name}"] = 1 - keep.float().mean().item()
    return stats
