"""LoRA and DoRA: a frozen linear plus a trainable low-rank update (Hu et al. 2021; Liu et al. 2024).

    y = base(x) + s · B(A(dropout(x)))            A: (r, in), B: (out, r), s = α/r (rsLoRA: α/√r)

DoRA splits the merged weight into a magnitude and a direction, W' = m · (W + s·BA) / ‖W + s·BA‖_c
(‖·‖_c: the L2 norm of each output row), with m (out,) trainable and initialised to ‖W‖_c. As in the
paper (§4.3) and PEFT, the norm is treated as a constant in backward, so::

    y = base(x) + (m/‖W + s·BA‖_c − 1) · (W x) + (m/‖W + s·BA‖_c) · s · B(A(x))

Its extra cost is the norm: one (out, in) weight plus update per forward (benchmarks/finetune.py
measures it).

    result = efficientml.apply(model, LoRAConfig(rank=16, alpha=32), inplace=True)
    result.report["trainable"]            # {"trainable": …, "total": …, "fraction": …}
    merge(model); unmerge(model)          # fold s·BA into the base weight and back
    model = merge_and_unload(model)       # plain nn.Linear layers again

Module names follow PEFT (``q_proj.base_layer``, ``q_proj.lora_A``, ``q_proj.lora_B``,
``q_proj.lora_magnitude_vector``), so an adapter's keys map onto PEFT's by a fixed prefix
(:mod:`efficientml.finetune.peft_io`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("kaiming", "gaussian")


@dataclass(frozen=True)
class LoRAConfig(Config):
    """Which linears get an adapter (``target_modules``: leaf names as PEFT spells them, e.g. "q_proj",
    or globs over dotted names, e.g. "model.layers.1*.mlp.*"; ``apply``'s ``filter`` narrows further by
    name or type), its rank and scale, and DoRA. ``init``: "kaiming" (A Kaiming-uniform, B zero: PEFT's
    default, the adapter starts as the identity), "gaussian" (A ~ N(0, 1/r), B zero)."""

    kind = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = BLOCK_LINEARS
    rslora: bool = False          # s = α/√r instead of α/r (Kalajdzievski 2023): rank-stable updates
    dora: bool = False
    init: str = "kaiming"
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        check_range("alpha", self.alpha, 0.0, 1e6, lo_open=True)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_choice("init", self.init, INITS)
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ConfigError(f"target_modules must be a non-empty tuple of names or globs, got "
                              f"{self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen base layer's float weight (out, in): a plain linear's, or a packed one dequantized."""
    deq = getattr(base, "dequantize", None)
    return deq() if deq is not None else base.weight


class LoRALinear(nn.Module):
    """A frozen ``base_layer`` (nn.Linear, or a packed linear with ``dequantize()``) plus LoRA / DoRA."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0, dora: bool = False,
                 init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling, self.merged = rank, scaling, False
        for p in base.parameters():
            p.requires_grad_(False)
        w = base_weight(base)
        dev, dt = w.device, (w.dtype if w.is_floating_point() else torch.float32)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            a = torch.empty(rank, self.in_features)
            if init == "kaiming":  # nn.Linear's default init (what PEFT uses): U(±1/√in)
                bound = 1.0 / math.sqrt(self.in_features)
                a.uniform_(-bound, bound, generator=generator)
            else:
                a.normal_(0.0, 1.0 / rank, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        self.lora_magnitude_vector = (nn.Parameter(w.detach().float().norm(dim=1).to(dt)) if dora
                                      else None)  # (out,) = ‖W‖_c: DoRA starts as the base layer

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def delta_weight(self) -> torch.Tensor:
        """s · B A, (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _norm_scale(self, w: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·BA‖_c, (out,); the norm is a constant for backward (DoRA §4.3)."""
        norm = (w + self.delta_weight().detach().to(w.dtype)).norm(dim=1).detach()
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        lora = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        if not self.dora:
            return y + lora
        w = base_weight(self.base_layer).to(x.dtype)
        scale = self._norm_scale(w)
        bias = getattr(self.base_layer, "bias", None)
        wx = y - bias if bias is not None else y  # W x without the bias
        if not isinstance(self.lora_dropout, nn.Identity):  # W x on the dropped-out input, as PEFT does
            wx = F.linear(self.lora_dropout(x), w)
        return y + (scale - 1) * wx + scale * lora

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into a float base weight (W ← W + s·BA, DoRA: W ← m·(W + s·BA)/‖·‖_c)."""
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise ConfigError(f"merge() folds the update into a float nn.Linear base, not a "
                              f"{type(self.base_layer).__name__}; use merge_and_unload() for a packed base")
        w = self.base_layer.weight
        new = w.float() + self.delta_weight().float()
        if self.dora:
            self._merged_norm = new.norm(dim=1)  # ‖W + s·BA‖_c, kept so unmerge divides it back out
            new = new * (self.lora_magnitude_vector.float() / self._merged_norm)[:, None]
        w.copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (W ← W − s·BA; DoRA divides the magnitude back out first)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        new = w.float()
        if self.dora:  # W' = m·V/‖V‖_c with V = W + s·BA: V = W'·‖V‖_c/m
            new = new * (self._merged_norm / self.lora_magnitude_vector.float())[:, None]
        w.copy_((new - self.delta_weight().float()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, dora={self.dora}, merged={self.merged}"
