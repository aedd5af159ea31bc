"""The arithmetic of integer-only inference: fixed-point requantization, quantization parameters,
BatchNorm folding, the conversion config, and the program's steps without weights (each runs
``float``, ``integer``, ``emulate`` and ``fast``; Conv2d/Linear live in
:mod:`efficientml.quant.integer_weighted`). :mod:`efficientml.quant.integer` traces a model into
these steps, calibrates them and runs them; the scheme is described there.
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
    """Integer-only int8 conversion. ``observer``: minmax, ema, percentile, mse or kl.

    ``reduce_range`` keeps AVX2 kernels' int16 pair sums (u8·s8) from saturating by giving up one bit
    of ``reduce_range_of``: "weights" (default; |w| ≤ 63, activations keep the full uint8 range, as
    ONNX Runtime recommends — its Clip-free QDQ graph then fuses every conv into QLinearConv) or
    "activations" ([0, 127], PyTorch's fbgemm convention; the exported graph needs Clip nodes that
    stop ORT's fusion). With ``reduce_range=False`` the fast path packs 8-bit weights for an exact
    engine where the default one saturates (see :mod:`efficientml.quant.integer_weighted`)."""

    kind = "integer_int8"
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    observer: str = "minmax"
    reduce_range: bool = True
    reduce_range_of: str = "weights"
    calibration_batches: int = 8
    skip_unsupported: bool = False      # keep layers without an integer kernel in float (reported)
    warn_slow_layers: bool = True       # first fast call: warn if depthwise int8 layers lose to fp32

    def validate(self) -> None:
        if self.weight_bits not in range(2, 9):
            raise ConfigError(f"integer weights need 2 to 8 bits, got {self.weight_bits!r}")
        if self.activation_bits not in range(2, 9):
            raise ConfigError(f"integer activations need 2 to 8 bits, got {self.activation_bits!r}")
        check_choice("observer", self.observer, OBSERVERS.names())
        check_choice("reduce_range_of", self.reduce_range_of, ("weights", "activations"))
        check_range("calibration_batches", self.calibration_batches, 1, 10 ** 6)

    def act_range(self) -> tuple[int, int]:
        top = 2 ** self.activation_bits - 1
        if self.reduce_range and self.reduce_range_of == "activations" and self.activation_bits == 8:
            top = 127
        return 0, top

    def weight_qmax(self) -> int:
        """Largest |code| of the symmetric weights: 2^(b−1) − 1, or 63 for reduced 8-bit weights."""
        if self.reduce_range and self.reduce_range_of == "weights" and self.weight_bits == 8:
            return 63
        return 2 ** (self.weight_bits - 1) - 1


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
    clamps, and data movement (flatten, view, transpose, slicing, chunk/split into tuples, picking
    from a tuple) applied to q − Z; padding is :class:`PadStep`. ``op`` names a movement's function,
    method or module for the export."""

    observe = False

    def __init__(self, name: str, fn: Callable[..., Any], mode: str, kind: str, op: str = ""):
        super().__init__(name)
        self.fn, self.mode, self.kind, self.op = fn, mode, kind, op   # mode: "max", "relu", "relu6", "move"

    def float(self, *xs: Any, **kw: Any) -> Any:
        return self.fn(*xs, **kw)

    def integer(self, q: Any, *rest: Any, **kw: Any) -> Any:
        qp = self.in_qp[0]
        if self.mode == "max":                         # data movement only: exact on float-held ints
            return self.fn(q.float(), *rest, **kw).to(torch.int32)
        if self.mode in ("relu", "relu6"):
            lo, hi = _clamp_bounds(qp, self.mode)
            return torch.clamp(q, lo, hi)
        if not isinstance(q, torch.Tensor):            # picking from a tuple of code tensors
            return self.fn(q, *rest, **kw)
        out = self.fn(q - qp.zero_point, *rest, **kw)  # zeros stay zeros in the centred domain
        if isinstance(out, (tuple, list)):             # chunk / split
            return type(out)(o + qp.zero_point for o in out)
        return out + qp.zero_point if isinstance(out, torch.Tensor) else out

    def fast(self, q: Any, *rest: Any, **kw: Any) -> Any:
        if self.mode == "relu":
            return torch.relu(q)
        if self.mode == "relu6":
            return torch.clamp(q, 0.0, 6.0)
        return self.fn(q, *rest, **kw)


class PadStep(Step):
    """Padding (``nn.ZeroPad2d``, ``nn.ConstantPad2d``, reflection/replication pads, ``F.pad``): data
    movement that keeps the input's qparams. A constant pads with its code round(v/S) + Z (the real
    zero is exactly Z; another value is rounded to the grid and clamped to its range)."""

    observe = False
    kind = "pad"

    def __init__(self, name: str, pad: tuple[int, ...], mode: str = "constant", value: float = 0.0):
        super().__init__(name)
        if mode not in ("constant", "reflect", "replicate"):
            raise UnsupportedError(f"layer {name!r} pads with mode {mode!r}; integer padding supports "
                                   "constant, reflect and replicate")
        self.pad, self.mode, self.value = tuple(int(p) for p in pad), mode, float(value or 0.0)

    def code(self) -> int:
        """The padding constant's integer code in the input's grid."""
        return int(self.in_qp[0].quantize(torch.tensor(self.value)))

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, self.mode, self.value if self.mode == "constant" else None)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":
            return F.pad(q, self.pad, value=self.code())
        return F.pad(q.float(), self.pad, self.mode).to(q.dtype)      # copies codes: exact

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":      # quantized pad rounds the value like quantize(): the same code
            return F.pad(q, self.pad, value=self.in_qp[0].dequantize(torch.tensor(self.code())).item())
        return F.pad(q, self.pad, self.mode)


class MeanStep(Step):
    """Global average pooling: Σ(q − Z_in) in int64, times S_in / (n·S_out) as a fixed-point
    multiplier, plus Z_out. The mean has its own calibrated qparams: it spans a far narrower range
    than its input, whose grid would be coarse for it (EfficientNet-B0 at 224×224: squeeze-excite
    pools lost 10 dB on the input's grid, the logits fell from 20.8 to 18.9 dB vs fp32)."""

    kind = "mean"

    def __init__(self, name: str, dims: tuple[int, ...], keepdim: bool):
        super().__init__(name)
        self.dims, self.keepdim = dims, keepdim

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims, keepdim=self.keepdim)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        qi, qo = self.in_qp[0], self.out_qp
        n = math.prod(q.shape[d] for d in self.dims)
        m0, shift = fixed_point(qi.scale / (n * qo.scale))
        s = (q.to(torch.int64) - qi.zero_point).sum(dim=self.dims, keepdim=self.keepdim)   # |s| < 2^8·n
        return torch.clamp(rounding_shift(s, m0, shift) + qo.zero_point, qo.qmin, qo.qmax).to(torch.int32)

    def emulate(self, q: torch.Tensor) -> torch.Tensor:
        return self.out_qp.quantize(self.in_qp[0].dequantize(q).mean(dim=self.dims, keepdim=self.keepdim))

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        # PyTorch's quantized mean keeps the input's qparams; the integer sum is as cheap and exact
        codes = self.integer(q.int_repr()).to(torch.uint8)
        return torch._make_per_tensor_quantized_tensor(codes, self.out_qp.scale, self.out_qp.zero_point)


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
