"""Bottleneck adapters: Houlsby et al. 2019 (after attention and after the MLP) and Pfeiffer et al.
2021 (after the MLP only), everything else frozen.

    a(h) = h + W_up · act(W_down · h)          W_down: (d/r, d), W_up: (d, d/r), r = reduction_factor

An adapter sits on a sublayer's output before the residual add: here it wraps the sublayer's output
projection (``o_proj`` for attention, ``down_proj`` for the MLP), so the block's code is unchanged.
``W_up`` starts at zero, so the adapted model computes exactly the base model until it trains.

    result = efficientml.apply(model, AdapterConfig(style="houlsby", reduction_factor=16), inplace=True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_choice
from efficientml.core.errors import ConfigError
from efficientml.core.modules import set_module
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.inject import trainable_parameters
from efficientml.finetune.targets import check_fresh, drop_packed, freeze, select_linears

STYLES = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
SITES = {"attn": "o_proj", "mlp": "down_proj"}  # the output projection of each sublayer
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass(frozen=True)
class AdapterConfig(Config):
    """``style`` picks the placement ("houlsby": after attention and MLP; "pfeiffer": after the MLP);
    ``placement`` overrides it (a tuple of "attn" / "mlp"). Bottleneck width = d // reduction_factor.
    ``train_norms``: also train the normalization layers' scales, as Houlsby et al. do (§2.1)."""

    kind = "adapter"
    style: str = "houlsby"
    reduction_factor: int = 16
    placement: tuple[str, ...] | None = None
    activation: str = "relu"
    init_std: float = 1e-2          # W_down ~ N(0, init_std²); W_up = 0
    train_norms: bool = False
    seed: int = 0

    def validate(self) -> None:
        check_choice("style", self.style, tuple(STYLES))
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if self.placement is not None:
            if isinstance(self.placement, str) or not self.placement or set(self.placement) - set(SITES):
                raise ConfigError(f"placement must be a non-empty tuple of 'attn' and/or 'mlp', got "
                                  f"{self.placement!r}")

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.placement) if self.placement is not None else STYLES[self.style]


class BottleneckAdapter(nn.Module):
    """``base_layer`` (a frozen output projection) followed by h + up(act(down(h)))."""

    def __init__(self, base: nn.Module, bottleneck: int, activation: str, init_std: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer, self.activation = base, activation
        d = base.out_features
        self.in_features, self.out_features = base.in_features, d
        w = base.weight
        self.adapter_down = nn.Linear(d, bottleneck, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(bottleneck, d, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.adapter_down.weight.copy_(torch.randn(bottleneck, d, generator=generator) * init_std)
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()  # the adapter starts as the identity
            self.adapter_up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (…, d)
        return h + self.adapter_up(ACTIVATIONS[self.activation](self.adapter_down(h)))

    def extra_repr(self) -> str:
        return f"bottleneck={self.adapter_down.out_features}, activation={self.activation}"


@register_transform(AdapterConfig)
def apply_adapters(model: nn.Module, config: AdapterConfig, *, calib=None, filter: LayerFilter) -> TransformResult:
    """Bottleneck adapters after the chosen sublayers (calib is not used)."""
    check_fresh(model, BottleneckAdapter, "bottleneck adapter")
    names = select_linears(model, tuple(SITES[s] for s in config.sites), filter, "adapter")
    freeze(model)
    g = torch.Generator().manual_seed(config.seed)
    layers = {}
    for n in names:
        base = model.get_submodule(n)
        width = base.out_features // config.reduction_factor
        if width < 1:
            raise ConfigError(f"reduction_factor {config.reduction_factor} leaves no bottleneck for layer {n!r} "
                              f"of width {base.out_features}; expected at most {base.out_features}")
        set_module(model, n, BottleneckAdapter(base, width, config.activation, config.init_std, g))
        layers[n] = {"width": base.out_features, "bottleneck": width}
    drop_packed(model, BottleneckAdapter)
    if config.train_norms:  # RMSNorm / LayerNorm (not batch norm): their scales (and shifts) train
        for m in model.modules():
            if type(m).__name__ in ("RMSNorm", "LayerNorm"):
                for p in m.parameters():
                    p.requires_grad_(True)
    return TransformResult(model, config, "real", layers, {"trainable": trainable_parameters(model)})
