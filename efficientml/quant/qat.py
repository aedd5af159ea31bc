"""Quantization-aware training: fake quantization with the straight-through estimator (STE),
optional learned step size (LSQ, Esser et al. 2020), BatchNorm folded into the conv during training
(Jacob et al. 2018 / Krishnamoorthi 2018), and export that drops the float shadow weights.

    qat_model = prepare_qat(model, QATConfig(weight_bits=4))
    fit(qat_model, loader, TrainConfig(epochs=1, lr=0.01))
    deployed = export_qat(qat_model)          # int8 codes + scales only, BN gone
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError
from efficientml.core.modules import set_module


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                   ) -> torch.Tensor:
    """S·(clamp(round(x/S) + Z) − Z) with STE through round; gradients vanish outside the clamp."""
    q = torch.clamp(ste_round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def lsq_quant(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """LSQ: step size learned with its gradient scaled by 1/sqrt(N·q_max)."""
    g = 1.0 / math.sqrt(x.numel() / step.numel() * max(qmax, 1))
    s = step * g + (step - step * g).detach()              # value = step, gradient × g
    return torch.clamp(ste_round(x / s), qmin, qmax) * s


@dataclass(frozen=True)
class QATConfig(Config):
    kind = "qat"
    weight_bits: int = 8
    activation_bits: int = 8
    lsq: bool = False
    fold_bn: bool = True
    quantize_activations: bool = True
    ema_momentum: float = 0.01

    def validate(self) -> None:
        for b in (self.weight_bits, self.activation_bits):
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise ConfigError(f"QAT supports 2 to 8 bits, got {b!r}")
        check_range("ema_momentum", self.ema_momentum, 0.0, 1.0, lo_open=True)


class ActFakeQuant(nn.Module):
    """Asymmetric per-tensor activation fake-quant; range tracked by EMA while training."""

    def __init__(self, bits: int = 8, momentum: float = 0.01):
        super().__init__()
        self.qmin, self.qmax, self.momentum = 0, 2 ** bits - 1, momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.clamp(self.lo, max=0), torch.clamp(self.hi, min=0)
        scale = torch.clamp((hi - lo) / (self.qmax - self.qmin), min=1e-8)
        zp = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        return scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lo, hi = x.detach().min(), x.detach().max()
            if not bool(self.initialized):
                self.lo.copy_(lo), self.hi.copy_(hi), self.initialized.fill_(True)
            else:
                self.lo.add_(self.momentum * (lo - self.lo)), self.hi.add_(self.momentum * (hi - self.hi))
        if not self.enabled or not bool(self.initialized):
            return x
        scale, zp = self.qparams()
        return fake_quant_ste(x, scale, zp, self.qmin, self.qmax)


class QATLayer(nn.Module):
    """Conv2d/Linear (+ optional BN folded during training) with fake-quantized weights (symmetric,
    per channel) and a fake-quantized output."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, cfg: QATConfig,
                 act: str | None = None):
        super().__init__()
        self.layer, self.bn, self.act = layer, bn, act
        self.qmax = 2 ** (cfg.weight_bits - 1) - 1
        self.lsq = cfg.lsq
        if cfg.lsq:
            w = layer.weight.detach()
            init = 2 * w.reshape(w.shape[0], -1).abs().mean(1) / math.sqrt(self.qmax)
            self.step = nn.Parameter(init.clamp(min=1e-8))
        self.out_fq = ActFakeQuant(cfg.activation_bits, cfg.ema_momentum) if cfg.quantize_activations else None

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *[1] * (self.layer.weight.dim() - 1))

    def quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.lsq:
            return lsq_quant(w, self._shape(self.step), -self.qmax, self.qmax)
        scale = torch.clamp(w.detach().reshape(w.shape[0], -1).abs().amax(1) / self.qmax, min=1e-12)
        return fake_quant_ste(w, self._shape(scale), torch.zeros(()), -self.qmax, self.qmax)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) with BN folded using running statistics."""
        w, b = self.layer.weight, self.layer.bias
        if self.bn is None:
            return w, b
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        f = self.bn.weight / std
        b0 = b if b is not None else torch.zeros_like(std)
        return w * self._shape(f), (b0 - self.bn.running_mean) * f + self.bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            y = self._op(x, self.quant_weight(self.layer.weight), self.layer.bias)
        elif self.training:
            # quantize W·γ/σ_running, undo the factor on the output, then let BN use batch statistics
            std = torch.sqrt(self.bn.running_var + self.bn.eps)
            f = self.bn.weight / std
            wq = self.quant_weight(self.layer.weight * self._shape(f))
            y = self._op(x, wq, None) / f.view(1, -1, *[1] * (x.dim() - 2))
            if self.layer.bias is not None:
                y = y + self.layer.bias.view(1, -1, *[1] * (x.dim() - 2))
            y = self.bn(y)
        else:
            w, b = self.folded()
            y = self._op(x, self.quant_weight(w), b)
        if self.act == "relu":
            y = F.relu(y)
        elif self.act == "relu6":
            y = F.relu6(y)
        return self.out_fq(y) if self.out_fq is not None else y


def prepare_qat(model: nn.Module, config: QATConfig | None = None, skip: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` whose Conv2d (+ following BN, + ReLU in Sequentials) and Linear layers are
    :class:`QATLayer`. BN is found as the next sibling in an ``nn.Sequential`` or by the attribute
    naming ``convX``/``bnX`` (architectures as data: the pairs are listed in ``bn_pairs``)."""
    cfg = config or QATConfig()
    model = copy.deepcopy(model)
    pairs = bn_pairs(model) if cfg.fold_bn else {}
    mods = dict(model.named_modules())
    for name, m in list(mods.items()):
        if name in skip or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        bn_name = pairs.get(name)
        bn = mods[bn_name] if bn_name else None
        set_module(model, name, QATLayer(m, bn, cfg))
        if bn_name:
            set_module(model, bn_name, nn.Identity())
    return model


def bn_pairs(model: nn.Module) -> dict[str, str]:
    """conv name → the BatchNorm that consumes its output, found by tracing (torch.fx)."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable models simply get no BN folding
        return {}
    mods = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d) and len(node.users) == 1:
            nxt = next(iter(node.users))
            if nxt.op == "call_module" and isinstance(mods[nxt.target], nn.BatchNorm2d):
                out[str(node.target)] = str(nxt.target)
    return out


class QuantizedWeightLayer(nn.Module):
    """Deployed form of a QAT layer: int8 codes + per-channel scales + float bias (no shadow weight)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d | None,
                 out_fq: ActFakeQuant | None):
        super().__init__()
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.conv_args = None if conv is None else (conv.stride, conv.padding, conv.dilation, conv.groups)
        self.out_fq = out_fq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.float() * self.weight_scale.view(-1, *[1] * (self.weight_int8.dim() - 1))
        y = F.conv2d(x, w, self.bias, *self.conv_args) if self.conv_args else F.linear(x, w, self.bias)
        return self.out_fq(y) if self.out_fq is not None else y


@torch.no_grad()
def export_qat(model: nn.Module) -> nn.Module:
    """Replace each :class:`QATLayer` by a :class:`QuantizedWeightLayer`: BN folded, weights stored as
    int8 codes and scales; the fp32 shadow weights are gone from the state dict."""
    model = copy.deepcopy(model).eval()
    for name, m in list(model.named_modules()):
        if not isinstance(m, QATLayer):
            continue
        w, b = m.folded()
        if m.lsq:
            scale = m.step.detach().clone()
        else:
            scale = torch.clamp(w.reshape(w.shape[0], -1).abs().amax(1) / m.qmax, min=1e-12)
        q = torch.clamp(torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))), -m.qmax, m.qmax)
        conv = m.layer if isinstance(m.layer, nn.Conv2d) else None
        if m.act is not None:
            raise ConfigError("export of QAT layers with fused activations is not supported")
        set_module(model, name, QuantizedWeightLayer(q, scale, b, conv, m.out_fq))
    return model
