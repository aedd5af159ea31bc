"""Binary and ternary networks.

- BWN (Rastegari et al. 2016): W ≈ α·sign(W), α = mean|W| per output channel.
- XNOR-Net: binary weights *and* activations, y = α·β·(sign(x) ⊛ sign(W)); the ±1 dot product runs
  as y = 2·popcount(xnor(w, x)) − n on packed bits (:func:`xnor_popcount_matmul`). The sign is taken of
  the pre-activation (the paper's block is BN → sign → binary conv → pool): a ReLU in front of an XNOR
  layer would make every sign +1, so :func:`binarize_model` removes it (:func:`xnor_preactivations`).
- Binarization: deterministic sign, or stochastic (+1 with probability hard_sigmoid(x)).
- TWN (Li et al. 2016): Δ = 0.7·E|W|, W ≈ α·sign(W)·[|W| > Δ], α = mean of |W| above Δ.
- TTQ (Zhu et al. 2017): learned positive and negative scales W_p, W_n, threshold Δ = t·max|W|.

Training uses straight-through estimators: the latent float weights get the gradient of the
quantized ones (clipped to |w| ≤ 1 for sign, as in BinaryConnect).
"""

from __future__ import annotations

import copy
import operator
from typing import Callable

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from efficientml.core.config import check_choice
from efficientml.core.errors import ShapeError, UnsupportedError
from efficientml.core.modules import named_layers, set_module
from efficientml.quant.packing import pack_int32

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


# ops between an activation and the layer it feeds that commute with sign() or only move elements:
# sign(maxpool(x)) = maxpool(sign(x)), and the others change no signs that matter for the choice below
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity,
                 nn.Flatten)
_PASS_FUNCTIONS = (torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout, operator.getitem)
_PASS_METHODS = ("flatten", "view", "reshape", "contiguous")
_ACT_MODULES = (nn.ReLU, nn.ReLU6)
_ACT_FUNCTIONS = (F.relu, torch.relu, F.relu6)


def _is_pass(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods[node.target], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def xnor_preactivations(model: nn.Module, xnor_layers: list[str]) -> list[str]:
    """Names of the ReLU modules whose outputs reach only ``xnor_layers`` (through pooling/reshapes).

    XNOR-Net binarizes the pre-activation: after a ReLU every input is ≥ 0 and sign() is +1
    everywhere, so these ReLUs must go. A ReLU that also feeds a full-precision op, or a functional
    ``F.relu`` (which cannot be swapped out), raises :class:`UnsupportedError` naming the layer.
    """
    targets = set(xnor_layers)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError on data-dependent control flow)
        raise UnsupportedError(f"{type(model).__name__} cannot be traced with torch.fx ({type(e).__name__}); "
                               "XNOR needs the graph to find the activation in front of each binary layer") from None
    mods = dict(gm.named_modules())

    def producer(node: fx.Node) -> fx.Node:       # walk up through sign-preserving ops
        while _is_pass(node, mods) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    def only_xnor_consumers(node: fx.Node) -> bool:
        for user in node.users:
            if user.op == "call_module" and user.target in targets:
                continue
            if not (_is_pass(user, mods) and only_xnor_consumers(user)):
                return False
        return True

    found: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in targets or not isinstance(node.args[0], fx.Node):
            continue
        act = producer(node.args[0])
        is_mod = act.op == "call_module" and isinstance(mods[act.target], _ACT_MODULES)
        is_fn = act.op == "call_function" and act.target in _ACT_FUNCTIONS
        if not (is_mod or is_fn):
            continue                                  # input is signed already (BN output, a sum, …)
        if is_fn:
            raise UnsupportedError(f"XNOR layer {node.target!r} reads a functional {act.target.__name__} output; "
                                   "its input would binarize to all +1. Use an nn.ReLU module so it can be removed")
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == act.target]
        if not all(only_xnor_consumers(c) for c in calls):
            raise UnsupportedError(f"ReLU {act.target!r} feeds XNOR layer {node.target!r} and also full-precision "
                                   "ops; it cannot be removed for the binary layer alone")
        if act.target not in found:
            found.append(act.target)
    return found


def binarize_model(model: nn.Module, mode: str, skip_first_last: bool = True, ttq_t: float = 0.05,
                   skip: tuple[str, ...] = ()) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with Conv2d/Linear wrapped in :class:`BinaryLayer`; the first and last
    layers stay full precision by default (as in the papers). Returns (model, wrapped layer names).

    For ``"xnor"`` the ReLUs that feed only binary layers become ``nn.Identity`` so that the sign is
    taken of the BatchNorm output (BN → sign → binary conv), as in XNOR-Net; see
    :func:`xnor_preactivations`.
    """
    check_choice("binary/ternary mode", mode, MODES)
    model = copy.deepcopy(model)
    layers = [n for n, _ in named_layers(model, (nn.Conv2d, nn.Linear))]
    keep = set(skip) | ({layers[0], layers[-1]} if skip_first_last and layers else set())
    wrap = [n for n in layers if n not in keep]
    if mode == "xnor":
        for act in xnor_preactivations(model, wrap):
            set_module(model, act, nn.Identity())
    for n in wrap:
        set_module(model, n, BinaryLayer(model.get_submodule(n), mode, ttq_t))
    return model, wrap


# ------------------------------------------------------------------------------------------------
# Packed-bit XNOR-popcount matmul
# ------------------------------------------------------------------------------------------------
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """(…, K) ±1 (or any reals: ≥ 0 → bit 1) → (…, ceil(K/32)) int32 words: 1-bit codes in the one
    packed layout of :func:`efficientml.quant.packing.pack_int32` (element i = bit i, zero-padded)."""
    k = x.shape[-1]
    bits = (x >= 0).reshape(-1, k).to(torch.uint8)                    # (rows, K)
    return pack_int32(bits, 1).reshape(*x.shape[:-1], -1)


def xnor_popcount_matmul(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int) -> torch.Tensor:
    """a (M, W), b (N, W) packed signs (int32 words of :func:`pack_signs`, or any integer words) →
    (M, N) int = Σ a_i·b_i over ±1 vectors of length k: 2·popcount(xnor(a, b)) − k, with the padding
    bits (which xnor to 1) subtracted."""
    nbits = a_packed.shape[-1] * a_packed.element_size() * 8
    if a_packed.shape[-1] != b_packed.shape[-1] or nbits < k:
        raise ShapeError(f"packed operands must have the same ≥ {k} bits, got {tuple(a_packed.shape)} "
                         f"and {tuple(b_packed.shape)}")
    xnor = ~(a_packed.unsqueeze(1) ^ b_packed.unsqueeze(0))          # (M, N, W)
    matches = _POPCOUNT[xnor.contiguous().view(torch.uint8).long()].sum(-1)  # (M, N) over the bytes
    pad = nbits - k
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
