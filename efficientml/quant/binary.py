"""Binary and ternary networks.

- BWN (Rastegari et al. 2016): W ≈ α·sign(W), α = mean|W| per output channel.
- XNOR-Net: binary weights *and* activations, y = α·β·(sign(x) ⊛ sign(W)); the ±1 dot product runs
  as y = 2·popcount(xnor(w, x)) − n on packed bits (:func:`xnor_popcount_matmul`).
- Binarization: deterministic sign, or stochastic (+1 with probability hard_sigmoid(x)).
- TWN (Li et al. 2016): Δ = 0.7·E|W|, W ≈ α·sign(W)·[|W| > Δ], α = mean of |W| above Δ.
- TTQ (Zhu et al. 2017): learned positive and negative scales W_p, W_n, threshold Δ = t·max|W|.

Training uses straight-through estimators: the latent float weights get the gradient of the
quantized ones (clipped to |w| ≤ 1 for sign, as in BinaryConnect).
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import check_choice
from efficientml.core.errors import ShapeError
from efficientml.core.modules import named_layers, set_module

MODES = ("bwn", "xnor", "twn", "ttq")


def binarize(x: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """±1: sign (0 → +1), or +1 with probability clip((x + 1)/2, 0, 1)."""
    if stochastic:
        p = torch.clamp((x + 1) / 2, 0, 1)
        return torch.where(torch.rand(x.shape, generator=generator) < p, 1.0, -1.0).to(x.dtype)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign forward; gradient passes where |x| ≤ 1."""
    through = x * (x.detach().abs() <= 1)
    return binarize(x.detach()) + through - through.detach()


def _channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).mean(1).view(-1, *[1] * (w.dim() - 1))


def bwn_weight(w: torch.Tensor) -> torch.Tensor:
    """α·sign(W), α = mean|W| per output channel (STE through sign)."""
    return _channel_mean_abs(w).detach() * _ste_sign(w) if w.requires_grad else _channel_mean_abs(w) * binarize(w)


def twn_threshold(w: torch.Tensor) -> torch.Tensor:
    return 0.7 * w.abs().mean()


def twn_weight(w: torch.Tensor) -> torch.Tensor:
    """α·sign(W)·[|W| > Δ] with Δ = 0.7·E|W| and α = E[|W| : |W| > Δ] (STE)."""
    d = twn_threshold(w.detach())
    mask = (w.detach().abs() > d).float()
    alpha = (w.detach().abs() * mask).sum() / mask.sum().clamp(min=1)
    t = alpha * torch.sign(w.detach()) * mask
    return (t - w).detach() + w


class _TTQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, t: float) -> torch.Tensor:
        d = t * w.abs().max()
        pos, neg = (w > d).float(), (w < -d).float()
        ctx.save_for_backward(pos, neg, wp, wn)
        return wp * pos - wn * neg

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        pos, neg, wp, wn = ctx.saved_tensors
        mid = 1 - pos - neg
        gw = g * (wp * pos + wn * neg + mid)          # TTQ: scaled gradients to the latent weights
        return gw, (g * pos).sum().view_as(wp), -(g * neg).sum().view_as(wn), None


class BinaryLayer(nn.Module):
    """Wraps a Conv2d/Linear; its latent weight is binarized/ternarized in every forward."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, mode: str, ttq_t: float = 0.05):
        super().__init__()
        check_choice("binary/ternary mode", mode, MODES)
        self.layer, self.mode, self.ttq_t = layer, mode, ttq_t
        if mode == "ttq":
            w = layer.weight.detach()
            d = ttq_t * w.abs().max()
            self.wp = nn.Parameter(w[w > d].mean().reshape(1) if (w > d).any() else torch.ones(1))
            self.wn = nn.Parameter(-w[w < -d].mean().reshape(1) if (w < -d).any() else torch.ones(1))

    def quant_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if self.mode in ("bwn", "xnor"):
            return _channel_mean_abs(w).detach() * _ste_sign(w)
        if self.mode == "twn":
            return twn_weight(w)
        return _TTQFunction.apply(w, self.wp, self.wn, self.ttq_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "xnor":                       # binary activations scaled by β = mean|x| per sample
            beta = x.detach().abs().reshape(x.shape[0], -1).mean(1).view(-1, *[1] * (x.dim() - 1))
            x = _ste_sign(x) * beta
        w = self.quant_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    def ternary_values(self) -> torch.Tensor:
        """The distinct weight values (≤ 3 per channel for TWN/TTQ, 2 for BWN)."""
        with torch.no_grad():
            return torch.unique(self.quant_weight())


def binarize_model(model: nn.Module, mode: str, skip_first_last: bool = True, ttq_t: float = 0.05,
                   skip: tuple[str, ...] = ()) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with Conv2d/Linear wrapped in :class:`BinaryLayer`; the first and last
    layers stay full precision by default (as in the papers). Returns (model, wrapped layer names)."""
    check_choice("binary/ternary mode", mode, MODES)
    model = copy.deepcopy(model)
    layers = [n for n, _ in named_layers(model, (nn.Conv2d, nn.Linear))]
    keep = set(skip) | ({layers[0], layers[-1]} if skip_first_last and layers else set())
    done = []
    for n in layers:
        if n in keep:
            continue
        set_module(model, n, BinaryLayer(model.get_submodule(n), mode, ttq_t))
        done.append(n)
    return model, done


# ------------------------------------------------------------------------------------------------
# Packed-bit XNOR-popcount matmul
# ------------------------------------------------------------------------------------------------
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """(…, K) ±1 (or any reals: ≥ 0 → bit 1) → (…, ceil(K/8)) uint8, MSB first, zero-padded."""
    bits = (x >= 0).cpu().numpy().astype(np.uint8)
    return torch.from_numpy(np.packbits(bits, axis=-1))


def xnor_popcount_matmul(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int) -> torch.Tensor:
    """a (M, K/8), b (N, K/8) packed signs → (M, N) int32 = Σ a_i·b_i over ±1 vectors of length k:
    2·popcount(xnor(a, b)) − k, with the padding bits (which xnor to 1) subtracted."""
    if a_packed.shape[-1] != b_packed.shape[-1] or a_packed.shape[-1] * 8 < k:
        raise ShapeError(f"packed operands must have the same ≥ {k} bits, got {tuple(a_packed.shape)} "
                         f"and {tuple(b_packed.shape)}")
    xnor = ~(a_packed.unsqueeze(1) ^ b_packed.unsqueeze(0))          # (M, N, K/8) uint8
    matches = _POPCOUNT[xnor.long()].sum(-1)                           # (M, N)
    pad = a_packed.shape[-1] * 8 - k
    return 2 * (matches - pad) - k


def xnor_linear(x: torch.Tensor, layer: BinaryLayer) -> torch.Tensor:
    """Real XNOR-Net linear layer: packed-bit popcount on sign(x)·sign(W), scaled by α·β."""
    w = layer.layer.weight.detach()
    k = w.shape[1]
    dots = xnor_popcount_matmul(pack_signs(x), pack_signs(w), k).float()     # (B, N)
    alpha = w.abs().mean(1)                                                    # (N,)
    beta = x.abs().mean(1, keepdim=True)                                       # (B, 1)
    y = dots * alpha * beta
    return y + layer.layer.bias if layer.layer.bias is not None else y


def sign_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference: sign(a) @ sign(b)ᵀ with ±1 floats."""
    return binarize(a) @ binarize(b).t()


BINARY_WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"bwn": bwn_weight, "twn": twn_weight}
