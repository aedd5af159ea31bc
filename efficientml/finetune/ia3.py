"""IA3: learned scaling vectors (Liu et al. 2022, "(IA)³"), initialised to ones.

    k = l_k ⊙ (W_k x)        v = l_v ⊙ (W_v x)        down(l_ff ⊙ h)   (h: the MLP intermediate)

A vector scales a layer's output (``k_proj``, ``v_proj``: ``ia3_l`` of shape (out, 1), as PEFT keeps
it) or, for the ``feedforward_modules``, its input (``down_proj``'s input is the MLP's gated
intermediate: ``ia3_l`` (1, in)). Both fold into the weight exactly: W ← diag(l) W (and b ← l ⊙ b),
or W ← W diag(l); unmerge divides back.

    result = efficientml.apply(model, IA3Config(), inplace=True)
    merge_ia3(model); unmerge_ia3(model); model = merge_ia3(model, unload=True)

Module names follow PEFT (``k_proj.base_layer``, ``k_proj.ia3_l``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.modules import set_module
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.inject import _matches, trainable_parameters
from efficientml.finetune.targets import check_fresh, drop_packed, freeze, select_linears


@dataclass(frozen=True)
class IA3Config(Config):
    """``target_modules``: the linears that get a vector; those also in ``feedforward_modules`` are
    scaled on their input (PEFT's convention), the others on their output."""

    kind = "ia3"
    target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple[str, ...] = ("down_proj",)

    def validate(self) -> None:
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ConfigError(f"target_modules must be a non-empty tuple of names or globs, got "
                              f"{self.target_modules!r}")
        if isinstance(self.feedforward_modules, str):
            raise ConfigError("feedforward_modules must be a tuple of names or globs, not one string")
        stray = [f for f in self.feedforward_modules if f not in self.target_modules]
        if stray:
            raise ConfigError(f"feedforward_modules {stray} are not among target_modules {self.target_modules}")


class IA3Linear(nn.Module):
    """A frozen ``base_layer`` whose output (or input, ``feedforward``) is scaled by ``ia3_l``."""

    def __init__(self, base: nn.Linear, feedforward: bool) -> None:
        super().__init__()
        self.base_layer, self.feedforward, self.merged = base, feedforward, False
        self.in_features, self.out_features = base.in_features, base.out_features
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        w = base.weight
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer(x * self.ia3_l.flatten())
        return self.base_layer(x) * self.ia3_l.flatten()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w, b = self.base_layer.weight, self.base_layer.bias
        w.mul_(self.ia3_l.to(w.dtype))  # (out, in) · (1, in) or (out, 1)
        if b is not None and not self.feedforward:
            b.mul_(self.ia3_l.flatten().to(b.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w, b = self.base_layer.weight, self.base_layer.bias
        if bool((self.ia3_l == 0).any()):
            raise ConfigError("an IA3 vector has a zero entry, so the merged weight cannot be divided back; "
                              "keep an unmerged copy instead")
        w.div_(self.ia3_l.to(w.dtype))
        if b is not None and not self.feedforward:
            b.div_(self.ia3_l.flatten().to(b.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"


@register_transform(IA3Config)
def apply_ia3(model: nn.Module, config: IA3Config, *, calib=None, filter: LayerFilter) -> TransformResult:
    """IA3 vectors on the selected linears (calib is not used)."""
    check_fresh(model, IA3Linear, "IA3")
    names = select_linears(model, config.target_modules, filter, "IA3")
    freeze(model)
    layers = {}
    for n in names:
        ff = any(_matches(n, p) for p in config.feedforward_modules)
        set_module(model, n, IA3Linear(model.get_submodule(n), ff))
        layers[n] = {"scales": "input" if ff else "output"}
    drop_packed(model, IA3Linear)
    return TransformResult(model, config, "real", layers, {"trainable": trainable_parameters(model)})


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def merge_ia3(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every vector into its weight; ``unload``: put the plain linears back."""
    for n, m in ia3_layers(model):
        m.merge()
        if unload:
            set_module(model, n, m.base_layer)
    return model


def unmerge_ia3(model: nn.Module) -> nn.Module:
    for _, m in ia3_layers(model):
        m.unmerge()
    return model
