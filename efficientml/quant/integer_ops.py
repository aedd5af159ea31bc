"""The arithmetic of integer-only inference: fixed-point requantization, quantization parameters,
BatchNorm folding, the conversion config, and the program's steps (each runs ``float``, ``integer``,
``emulate`` and ``fast``). :mod:`efficientml.quant.integer` traces a model into these steps,
calibrates them and runs them; the scheme is described there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.quant.observers import OBSERVERS


# ------------------------------------------------------------------------------------------------
# Fixed-point requantization
# ------------------------------------------------------------------------------------------------
def fixed_point(m: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Represent each multiplier m > 0 as M0·2^−shift with M0 ∈ [2^30, 2^31) (int64 tensors)."""
    m = torch.as_tensor(m, dtype=torch.float64).clamp(min=1e-30)
    mant, exp = torch.frexp(m)                                 # m = mant·2^exp, mant ∈ [0.5, 1)
    m0 = torch.round(mant * 2 ** 31).to(torch.int64)
    shift = (31 - exp).to(torch.int64)
    carry = m0 == 2 ** 31                                      # mant rounded up to 1.0
    m0 = torch.where(carry, m0 // 2, m0)
    shift = torch.where(carry, shift - 1, shift)
    return m0, shift


def rounding_shift(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(acc·M0 / 2^shift), half away from zero toward +inf, in int64 (acc·M0 < 2^62)."""
    prod = acc.to(torch.int64) * m0
    pos = shift > 0
    half = torch.where(pos, torch.ones_like(shift) << (shift - 1).clamp(min=0), torch.zeros_like(shift))
    right = (prod + half) >> shift.clamp(min=0)
    return torch.where(pos, right, prod << (-shift).clamp(min=0))


@dataclass
class QParams:
    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q.float() - self.zero_point) * self.scale


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | nn.BatchNorm1d
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W·γ/σ, b' = (b − μ)·γ/σ + β with σ = sqrt(var + eps) (eval-mode statistics)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    b = bias if bias is not None else torch.zeros_like(std)
    f = (gamma / std).detach()
    w = weight.detach() * f.view(-1, *([1] * (weight.dim() - 1)))
    return w, ((b.detach() - bn.running_mean) * f + beta.detach())


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntegerConfig(Config):
    """Integer-only int8 conversion. ``observer``: minmax, ema, percentile, mse or kl."""

    kind = "integer_int8"
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    observer: str = "minmax"
    reduce_range: bool = True
    calibration_batches: int = 8
    skip_unsupported: bool = False      # keep layers without an integer kernel in float (reported)

    def validate(self) -> None:
        if self.weight_bits not in range(2, 9):
            raise ConfigError(f"integer weights need 2 to 8 bits, got {self.weight_bits!r}")
        if self.activation_bits not in range(2, 9):
            raise ConfigError(f"integer activations need 2 to 8 bits, got {self.activation_bits!r}")
        check_choice("observer", self.observer, OBSERVERS.names())
        check_range("calibration_batches", self.calibration_batches, 1, 10 ** 6)

    def act_range(self) -> tuple[int, int]:
        top = 2 ** self.activation_bits - 1
        if self.reduce_range and self.activation_bits == 8:
            top = 127
        return 0, top


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
class Step:
    """One op of the integer program. ``observe``: whether its output gets its own qparams."""

    observe = True
    kind = "step"

    def __init__(self, name: str):
        self.name = name
        self.in_qp: list[QParams] = []
        self.out_qp: QParams | None = None

    def float(self, *xs: Any) -> Any:
        raise NotImplementedError

    def finalize(self, cfg: IntegerConfig) -> None:
        """Called once input and output qparams are known: quantize weights, build multipliers."""

    def integer(self, *qs: Any) -> Any:
        raise NotImplementedError

    def emulate(self, *qs: Any, **kw: Any) -> Any:
        return self.integer(*qs, **kw)

    def fast(self, *qs: Any) -> Any:
        raise NotImplementedError


class InputStep(Step):
    kind = "quantize_input"

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def integer(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_qp.quantize(x)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.out_qp
        return torch.quantize_per_tensor(x, qp.scale, qp.zero_point, torch.quint8)


def _clamp_bounds(qp: QParams, act: str | None) -> tuple[int, int]:
    lo, hi = qp.qmin, qp.qmax
    if act in ("relu", "relu6"):
        lo = max(lo, qp.zero_point)
    if act == "relu6":
        hi = min(hi, qp.zero_point + int(round(6.0 / qp.scale)))
    return lo, hi


def _act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    return y


class WeightedStep(Step):
    """Conv2d or Linear with BN folded in and an optional fused ReLU/ReLU6."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None):
        super().__init__(name)
        self.weight = weight.detach().float().clone()
        self.bias = (bias.detach().float().clone() if bias is not None
                     else torch.zeros(weight.shape[0]))
        self.act = act

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self._op(x, self.weight, self.bias), self.act)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, cfg: IntegerConfig) -> None:
        qmax = 2 ** (cfg.weight_bits - 1) - 1
        flat = self.weight.reshape(self.weight.shape[0], -1)
        amax = flat.abs().amax(1) if cfg.per_channel else flat.abs().max().expand(flat.shape[0])
        self.w_scale = torch.clamp(amax / qmax, min=1e-12)                           # (C_out,)
        self.w_q = torch.clamp(torch.round(self.weight / self.w_scale.view(-1, *[1] * (self.weight.dim() - 1))),
                               -qmax, qmax).to(torch.int32)
        s_in = self.in_qp[0].scale
        self.b_scale = (s_in * self.w_scale.double()).float()                        # S_bias = S_in·S_w
        self.b_q = torch.round(self.bias.double() / self.b_scale.double()).to(torch.int32)
        z_in = self.in_qp[0].zero_point
        # Σ_k q_w (per output channel): the cross term Z_in·Σ q_w folds into the bias
        self.w_sum = self.w_q.reshape(self.w_q.shape[0], -1).sum(1).to(torch.int64)
        self.b_eff = self.b_q.to(torch.int64) - z_in * self.w_sum
        m = s_in * self.w_scale.double() / self.out_qp.scale                          # per channel
        self.m0, self.shift = fixed_point(m)
        self.lo, self.hi = _clamp_bounds(self.out_qp, self.act)
        self._packed = None

    def _requant(self, acc: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        out = rounding_shift(acc, self.m0.view(shape), self.shift.view(shape)) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def emulate(self, q: torch.Tensor) -> torch.Tensor:
        x = self.in_qp[0].dequantize(q)
        w = self.w_q.float() * self.w_scale.view(-1, *[1] * (self.weight.dim() - 1))
        y = self._op(x, w, self.b_q.double().mul(self.b_scale.double()).float())
        out = torch.round(y / self.out_qp.scale) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def _qweight(self) -> torch.Tensor:
        return torch._make_per_channel_quantized_tensor(
            self.w_q.to(torch.int8), self.w_scale.double(), torch.zeros_like(self.w_scale, dtype=torch.int64), 0)

    def _fbias(self) -> torch.Tensor:
        return (self.b_q.double() * self.b_scale.double()).float()


class ConvStep(WeightedStep):
    kind = "conv2d"

    def __init__(self, name: str, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                 act: str | None):
        super().__init__(name, weight, bias, act)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedError(f"conv {name!r} uses padding {conv.padding!r}/{conv.padding_mode!r}; "
                                   "integer conv supports numeric zero padding only")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        z_in = self.in_qp[0].zero_point
        B, C, H, W = q.shape
        ph, pw = self.padding
        x = F.pad(q, (pw, pw, ph, ph), value=z_in) if (ph or pw) else q    # pad with the real zero
        kh, kw = self.w_q.shape[2:]
        # im2col moves integers only (exact in float32 for |q| ≤ 2^24); the products sum in int32
        cols = F.unfold(x.float(), (kh, kw), dilation=self.dilation, stride=self.stride).to(torch.int32)
        G, O = self.groups, self.w_q.shape[0]
        L = cols.shape[-1]
        cols = cols.view(B, G, -1, L)                                     # (B, G, C/G·kh·kw, L)
        w = self.w_q.view(G, O // G, -1)                                  # (G, O/G, C/G·kh·kw)
        acc = torch.matmul(w, cols).view(B, O, L)                         # int32 accumulation
        acc = acc.to(torch.int64) + self.b_eff.view(1, -1, 1)
        Ho = (H + 2 * ph - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        Wo = (W + 2 * pw - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return self._requant(acc, 1).view(B, O, Ho, Wo)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.quantized.conv2d_prepack(
                self._qweight(), self._fbias(), list(self.stride), list(self.padding),
                list(self.dilation), self.groups)
        op = torch.ops.quantized.conv2d_relu if self.act == "relu" else torch.ops.quantized.conv2d
        y = op(q, self._packed, self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y


class LinearStep(WeightedStep):
    kind = "linear"

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        acc = torch.matmul(q.to(torch.int32), self.w_q.t())              # (…, C_out) int32
        return self._requant(acc.to(torch.int64) + self.b_eff, -1)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.quantized.linear_prepack(self._qweight(), self._fbias())
        op = torch.ops.quantized.linear_relu if self.act == "relu" else torch.ops.quantized.linear
        y = op(q, self._packed, self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y


class AddStep(Step):
    kind = "add"

    def __init__(self, name: str, act: str | None):
        super().__init__(name)
        self.act = act

    def float(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _act(a + b, self.act)

    def finalize(self, cfg: IntegerConfig) -> None:
        ma = self.in_qp[0].scale / self.out_qp.scale
        mb = self.in_qp[1].scale / self.out_qp.scale
        e = math.frexp(max(ma, mb))[1]
        self.shift = torch.tensor(31 - e, dtype=torch.int64)               # common shift for both terms
        self.ma = torch.tensor(round(ma * 2.0 ** (31 - e)), dtype=torch.int64)
        self.mb = torch.tensor(round(mb * 2.0 ** (31 - e)), dtype=torch.int64)
        self.lo, self.hi = _clamp_bounds(self.out_qp, self.act)

    def integer(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        acc = (qa.to(torch.int64) - self.in_qp[0].zero_point) * self.ma + \
              (qb.to(torch.int64) - self.in_qp[1].zero_point) * self.mb
        out = rounding_shift(acc, torch.ones((), dtype=torch.int64), self.shift) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def emulate(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        y = self.in_qp[0].dequantize(qa) + self.in_qp[1].dequantize(qb)
        return torch.clamp(torch.round(y / self.out_qp.scale) + self.out_qp.zero_point, self.lo, self.hi).to(torch.int32)

    def fast(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        op = torch.ops.quantized.add_relu if self.act == "relu" else torch.ops.quantized.add
        y = op(a, b, self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y


class PassStep(Step):
    """Ops that keep the input's qparams: max-pool (commutes with the affine map), ReLU/ReLU6 as
    clamps, and data movement (flatten, view, slicing, zero padding) applied to q − Z."""

    observe = False

    def __init__(self, name: str, fn: Callable[..., Any], mode: str, kind: str):
        super().__init__(name)
        self.fn, self.mode, self.kind = fn, mode, kind    # mode: "max", "relu", "relu6", "move"

    def float(self, *xs: Any, **kw: Any) -> Any:
        return self.fn(*xs, **kw)

    def integer(self, q: Any, *rest: Any, **kw: Any) -> Any:
        qp = self.in_qp[0]
        if self.mode == "max":                         # data movement only: exact on float-held ints
            return self.fn(q.float(), *rest, **kw).to(torch.int32)
        if self.mode in ("relu", "relu6"):
            lo, hi = _clamp_bounds(qp, self.mode)
            return torch.clamp(q, lo, hi)
        out = self.fn(q - qp.zero_point, *rest, **kw)  # zeros stay zeros in the centred domain
        return out + qp.zero_point if isinstance(out, torch.Tensor) else out

    def fast(self, q: Any, *rest: Any, **kw: Any) -> Any:
        if self.mode == "relu":
            return torch.relu(q)
        if self.mode == "relu6":
            return torch.clamp(q, 0.0, 6.0)
        return self.fn(q, *rest, **kw)


class MeanStep(Step):
    """Global average pooling: Σ(q − Z) in int64, times 1/n as a fixed-point multiplier; the output
    keeps the input's qparams (a mean never leaves the input's range)."""

    observe = False
    kind = "mean"

    def __init__(self, name: str, dims: tuple[int, ...], keepdim: bool):
        super().__init__(name)
        self.dims, self.keepdim = dims, keepdim

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims, keepdim=self.keepdim)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        qp = self.in_qp[0]
        n = math.prod(q.shape[d] for d in self.dims)
        m0, shift = fixed_point(1.0 / n)
        s = (q.to(torch.int64) - qp.zero_point).sum(dim=self.dims, keepdim=self.keepdim)
        return torch.clamp(rounding_shift(s, m0, shift) + qp.zero_point, qp.qmin, qp.qmax).to(torch.int32)

    def emulate(self, q: torch.Tensor) -> torch.Tensor:
        qp = self.in_qp[0]
        y = qp.dequantize(q).mean(dim=self.dims, keepdim=self.keepdim)
        return qp.quantize(y)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        y = q.mean(dim=self.dims, keepdim=True)          # quantized mean keeps the input's qparams
        if not self.keepdim:
            y = y.reshape([n for d, n in enumerate(y.shape) if d not in {k % y.dim() for k in self.dims}])
        return y


class FloatStep(Step):
    """A layer without an integer kernel, kept in float on explicit request (listed in the report)."""

    kind = "float_fallback"

    def __init__(self, name: str, fn: Callable[..., Any]):
        super().__init__(name)
        self.fn = fn

    def float(self, *xs: Any) -> Any:
        return self.fn(*xs)

    def integer(self, *qs: Any) -> Any:
        xs = [qp.dequantize(q) for qp, q in zip(self.in_qp, qs)]
        return self.out_qp.quantize(self.fn(*xs))

    def fast(self, *qs: Any) -> Any:
        y = self.fn(*[q.dequantize() for q in qs])
        return torch.quantize_per_tensor(y, self.out_qp.scale, self.out_qp.zero_point, torch.quint8)
