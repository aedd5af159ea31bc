"""Frozen layers that keep (almost) nothing for backward — what makes bias-only training cheap in
memory (TinyTL, Cai et al. 2020, §3.1): a bias's gradient needs no activation, and the gradient that
flows *through* a frozen layer needs only its weight, yet PyTorch's conv and batch-norm save their
input and ReLU its output (fp32) whatever requires grad.

- :class:`FrozenConv2d`: weight frozen, saves no input (grad_x is the transposed conv of grad by W).
- :class:`FrozenBatchNorm2d`: running statistics as a per-channel affine y = s·x + (β − μ·s),
  s = γ/√(σ²+ε) frozen, β (the shift) trainable; saves only s (C values).
- :func:`mask_relu` / :class:`MaskReLU`: saves the mask x > 0 packed to 1 bit per element instead of
  the fp32 output (32× less).
- :func:`lean_activations`: a ``TorchFunctionMode`` under which the model's functional ReLUs
  (``F.relu``, ``torch.relu``: blocks that call them rather than an ``nn.ReLU``) take the mask path.

State-dict names are those of the modules they replace (``weight``, ``bias``, ``running_mean`` …).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from efficientml.core.errors import ConfigError


class _FrozenConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conf, ctx.shape = (stride, padding, dilation, groups), x.shape
        ctx.save_for_backward(weight)  # a parameter, not an activation: no input is kept
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(ctx.shape, weight, grad, stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, None, gb, None, None, None, None


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (…) → uint8 (⌈n/8⌉,): one bit per element."""
    m = mask.reshape(-1)
    m = torch.cat([m, m.new_zeros((-m.numel()) % 8)]).view(-1, 8).to(torch.uint8)  # (n/8, 8)
    return (m * _bit_weights(m.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = (packed[:, None] & _bit_weights(packed.device)) != 0  # (n/8, 8) bool
    return bits.reshape(-1)[:shape.numel()].view(shape)


class _MaskClampFn(torch.autograd.Function):
    """y = clamp(x, 0, hi) (ReLU: hi = None; ReLU6: hi = 6); the gradient passes where 0 < x < hi."""

    @staticmethod
    def forward(ctx, x, hi):
        y = x.clamp(0, hi)
        ctx.shape = y.shape
        inside = (y > 0) if hi is None else (y > 0) & (y < hi)
        ctx.save_for_backward(pack_mask(inside))  # 1 bit per element, not the fp32 output
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad * unpack_mask(packed, ctx.shape), None


def mask_relu(x: torch.Tensor, hi: float | None = None) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskClampFn.apply(x, hi)
    return F.relu(x) if hi is None else F.hardtanh(x, 0.0, hi)


class MaskReLU(nn.Module):
    """ReLU (``hi=None``) or ReLU6 (``hi=6``) keeping a 1-bit mask for backward."""

    def __init__(self, hi: float | None = None) -> None:
        super().__init__()
        self.hi = hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mask_relu(x, self.hi)

    def extra_repr(self) -> str:
        return "" if self.hi is None else f"max={self.hi:g}"


class FrozenConv2d(nn.Module):
    """A conv whose weight is frozen; its bias (if any) may train."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError(f"FrozenConv2d takes zero padding given as integers, got padding={conv.padding!r}, "
                              f"padding_mode={conv.padding_mode!r}")
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return _FrozenConvFn.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class FrozenBatchNorm2d(nn.Module):
    """Batch norm at its running statistics, as an affine map with a trainable shift β."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        c = bn.num_features
        w = bn.weight.detach() if bn.weight is not None else torch.ones(c)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(bn.bias.detach() if bn.bias is not None else torch.zeros(c))
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps, self.num_features = bn.eps, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (self.weight / torch.sqrt(self.running_var + self.eps)).detach()  # (C,) frozen scale
        shift = self.bias - self.running_mean * s
        return x * s[:, None, None] + shift[:, None, None]  # mul by a constant saves only s

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class lean_activations(TorchFunctionMode):
    """Within the block, functional ReLUs on tensors that need grad keep a mask, not their output."""

    _RELUS = (F.relu, torch.relu, torch.Tensor.relu)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._RELUS and not kwargs.get("inplace", False) and len(args) == 1 \
                and isinstance(args[0], torch.Tensor) and args[0].requires_grad and torch.is_grad_enabled():
            return _MaskClampFn.apply(args[0], None)
        return func(*args, **kwargs)


def make_lean(model: nn.Module, kinds: tuple[str, ...] = ("conv", "batchnorm", "relu")) -> dict[str, int]:
    """Swap every Conv2d / BatchNorm2d / ReLU / ReLU6 (those of ``kinds``) for its frozen, activation-free
    form (in place). ``kinds=("batchnorm",)`` alone fixes the batch-norm statistics for training."""
    counts = {"conv": 0, "batchnorm": 0, "relu": 0}
    for name, m in list(model.named_modules()):
        new, key = None, None
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            new, key = FrozenConv2d(m), "conv"
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            new, key = FrozenBatchNorm2d(m), "batchnorm"
        elif isinstance(m, (nn.ReLU, nn.ReLU6)):
            new, key = MaskReLU(6.0 if isinstance(m, nn.ReLU6) else None), "relu"
        if new is not None and name and key in kinds:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            counts[key] += 1
    return counts
