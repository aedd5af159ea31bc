"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up.

W̃ = s·clamp(⌊W/s⌋ + h(V), q_min, q_max) with the rectified sigmoid h(V) = clip(σ(V)(ζ−γ)+γ, 0, 1),
ζ = 1.1, γ = −0.1. Per layer, minimize ‖W x − W̃ x‖² on calibration inputs plus
λ·Σ(1 − |2h(V) − 1|^β), with β annealed from 20 to 2 after a warm-up (no regularizer), which drives
every h to 0 or 1. Layers are reconstructed one by one on inputs captured from the float model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError
from efficientml.core.modules import named_layers

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig(Config):
    kind = "adaround"
    bits: int = 4
    iters: int = 500
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"AdaRound supports 2 to 8 weight bits, got {self.bits!r}")
        check_range("iters", self.iters, 1, 10 ** 6)
        check_range("warmup", self.warmup, 0.0, 1.0, hi_open=True)


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _layer_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


def adaround_layer(layer: nn.Conv2d | nn.Linear, inputs: torch.Tensor, config: AdaRoundConfig
                   ) -> torch.Tensor:
    """Learned-rounding quantized weight (dequantized, the layer's shape) for ``layer`` on ``inputs``."""
    if inputs.shape[0] == 0:
        raise ConfigError("AdaRound needs calibration inputs; got an empty batch")
    w = layer.weight.detach()
    qmax = 2 ** (config.bits - 1) - 1
    s = torch.clamp(w.reshape(w.shape[0], -1).abs().amax(1) / qmax, min=1e-12).view(-1, *[1] * (w.dim() - 1))
    w_floor = torch.floor(w / s)
    rest = w / s - w_floor                                   # ∈ [0, 1): initialise h(V) = rest
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
    opt = torch.optim.Adam([v], lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        targets = _layer_op(layer, inputs, w)
    warm = int(config.warmup * config.iters)
    for it in range(config.iters):
        idx = torch.randint(0, inputs.shape[0], (min(config.batch_size, inputs.shape[0]),), generator=g)
        w_soft = s * torch.clamp(w_floor + _h(v), -qmax, qmax)
        rec = (_layer_op(layer, inputs[idx], w_soft) - targets[idx]).pow(2).sum(1).mean()
        if it >= warm:
            frac = (it - warm) / max(1, config.iters - warm)
            beta = config.beta_end + (config.beta_start - config.beta_end) * (1 - frac)  # 20 → 2
            reg = (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()
            loss = rec + config.reg_weight * reg
        else:
            loss = rec
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return s * torch.clamp(w_floor + (_h(v) >= 0.5).float(), -qmax, qmax)


def capture_inputs(model: nn.Module, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs of the named layers on ``batches`` (concatenated along the batch dimension)."""
    mods = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach()))
             for n in names]
    try:
        with torch.no_grad():
            for xb in batches:
                model(xb)
    finally:
        for h in hooks:
            h.remove()
    if not batches:
        raise ConfigError("AdaRound calibration got no data: pass at least one batch")
    return {n: torch.cat(v) for n, v in seen.items()}


def adaround(model: nn.Module, batches: list[torch.Tensor], config: AdaRoundConfig | None = None,
             skip: tuple[str, ...] = ()) -> list[str]:
    """Quantize every Conv2d/Linear weight with AdaRound (in place); returns the layers done."""
    cfg = config or AdaRoundConfig()
    model.eval()
    names = [n for n, _ in named_layers(model, (nn.Conv2d, nn.Linear)) if n not in skip]
    inputs = capture_inputs(model, batches, names)
    mods = dict(model.named_modules())
    new = {n: adaround_layer(mods[n], inputs[n], cfg) for n in names}
    with torch.no_grad():
        for n in names:
            mods[n].weight.copy_(new[n])
    return names


def reconstruction_error(layer: nn.Module, inputs: torch.Tensor, w_q: torch.Tensor) -> float:
    """Mean squared output error of ``layer`` with weight ``w_q`` vs its own weight."""
    with torch.no_grad():
        return float((_layer_op(layer, inputs, w_q) - _layer_op(layer, inputs, layer.weight)).pow(2).mean())
