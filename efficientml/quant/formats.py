"""Number formats, emulated exactly: ``fmt.quantize(x)`` returns the nearest representable value.

Element formats (FP32/FP16/BF16, minifloats FP8/FP6/FP4, INT-n/UINT-n) round to nearest, ties to
even, and handle overflow as their spec says: E4M3FN saturates to ±448 like torch's cast (NaN stays
NaN), E5M2 overflows to ±inf (IEEE), the MX element formats FP6/FP4 (no inf, no NaN) saturate.
Block formats share one scale per block along the last dimension: NF4 (absmax per 64, 16 normal
quantiles, QLoRA) and OCP MX (an E8M0 power of two per 32 elements: MXFP8/MXFP6/MXFP4/MXINT8).

    FORMATS.get("fp8_e4m3").quantize(x)      # == x.to(torch.float8_e4m3fn).float()
    FORMATS.get("mxfp4").quantize(w)         # w.shape[-1] % 32 == 0

Weights (CNN or LLM, one output channel per row) are rounded to a format by :func:`quantize_to_format`:
INT-n on the integer grid of :mod:`efficientml.quant.grid`, minifloats under one scale per output
channel, NF4/MX with their own block scales along the flattened inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.core.registry import Registry
from efficientml.quant.grid import GridSpec, fake_quantize


@dataclass(frozen=True)
class NumberFormat:
    """A format: ``quantize`` (round to the format), ``info`` (range, normal, precision, bits)."""

    name: str
    bits: int

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid(self) -> torch.Tensor | None:
        """All finite representable values (sorted, float64), for formats of ≤ 8 bits."""
        return None

    def info(self) -> dict[str, float | int | str]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# IEEE-like floats
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FloatFormat(NumberFormat):
    """Sign, ``exp_bits`` exponent bits (bias 2^(E-1)−1 unless given), ``man_bits`` mantissa bits.

    ``special``: "ieee" (top exponent = inf/NaN), "fn" (only S.1111.111 is NaN: E4M3FN),
    "none" (every code is a finite number: FP6/FP4). ``overflow``: "saturate" or "inf".
    """

    exp_bits: int = 8
    man_bits: int = 23
    special: str = "ieee"
    overflow: str = "inf"
    bias: int | None = None
    torch_dtype: torch.dtype | None = field(default=None, compare=False)

    @property
    def exp_bias(self) -> int:
        return self.bias if self.bias is not None else 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:  # exponent of the smallest normal
        return 1 - self.exp_bias

    @property
    def max_value(self) -> float:
        top = 2 ** self.exp_bits - 1
        if self.special == "ieee":
            return (2 - 2.0 ** -self.man_bits) * 2.0 ** (top - 1 - self.exp_bias)
        if self.special == "fn":  # mantissa all ones at the top exponent is NaN
            return (2 - 2.0 ** (1 - self.man_bits)) * 2.0 ** (top - self.exp_bias)
        return (2 - 2.0 ** -self.man_bits) * 2.0 ** (top - self.exp_bias)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.torch_dtype is not None and self.bits >= 16:
            return x.to(self.torch_dtype).to(x.dtype if x.dtype.is_floating_point else torch.float32)
        out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        xd = x.double()
        mag = xd.abs()
        _, e = torch.frexp(mag)                                   # mag = m·2^e, m ∈ [0.5, 1)
        e = torch.clamp(e - 1, min=self.emin)                     # floor(log2|x|), subnormals share emin
        step = torch.pow(2.0, (e - self.man_bits).double())        # spacing of the binade
        q = torch.round(mag / step) * step                        # ties to even (exact in float64)
        vmax = self.max_value
        if self.overflow == "saturate":
            q = torch.where(q > vmax, torch.full_like(q, vmax), q)
        else:                                                     # IEEE: ≥ max + half ulp → inf
            q = torch.where(q > vmax, torch.full_like(q, math.inf), q)
        q = torch.where(torch.isinf(mag), torch.full_like(q, vmax if self.overflow == "saturate"
                                                           else math.inf), q)
        q = torch.copysign(q, xd)
        if self.special == "none":  # no NaN code: NaN inputs are an error of the caller; keep NaN
            pass
        q = torch.where(torch.isnan(xd), xd, q)
        return q.to(out_dtype)

    def grid(self) -> torch.Tensor | None:
        if self.bits > 8:
            return None
        vals = []
        for ef in range(2 ** self.exp_bits):
            for mf in range(2 ** self.man_bits):
                if self.special == "ieee" and ef == 2 ** self.exp_bits - 1:
                    continue
                if self.special == "fn" and ef == 2 ** self.exp_bits - 1 and mf == 2 ** self.man_bits - 1:
                    continue
                if ef == 0:
                    v = mf * 2.0 ** (self.emin - self.man_bits)
                else:
                    v = (1 + mf * 2.0 ** -self.man_bits) * 2.0 ** (ef - self.exp_bias)
                vals += [v, -v]
        return torch.tensor(sorted(set(vals)), dtype=torch.float64)

    def info(self) -> dict[str, float | int | str]:
        return {"format": self.name, "bits": self.bits, "layout": f"1.{self.exp_bits}.{self.man_bits}",
                "max": self.max_value, "min_normal": 2.0 ** self.emin,
                "min_subnormal": 2.0 ** (self.emin - self.man_bits) if self.man_bits else 2.0 ** self.emin,
                "epsilon": 2.0 ** -self.man_bits,
                "decimal_digits": round((self.man_bits + 1) * math.log10(2), 2),
                "special": {"ieee": "inf, NaN", "fn": "NaN only", "none": "none"}[self.special]}


# ------------------------------------------------------------------------------------------------
# Integers
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntFormat(NumberFormat):
    """Two's-complement INT-n or UINT-n on the unit grid; out-of-range values saturate."""

    signed: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x), self.qmin, self.qmax)

    def grid(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float64)

    def info(self) -> dict[str, float | int | str]:
        return {"format": self.name, "bits": self.bits, "layout": ("s" if self.signed else "u") + str(self.bits),
                "max": float(self.qmax), "min": float(self.qmin), "min_normal": 1.0, "min_subnormal": 1.0,
                "epsilon": 1.0, "decimal_digits": round(self.bits * math.log10(2), 2), "special": "none"}


# ------------------------------------------------------------------------------------------------
# Block formats
# ------------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, block: int, name: str) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % block:
        raise ShapeError(f"{name} needs the last dimension to be a multiple of its block size {block}, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def nf4_values() -> torch.Tensor:
    """The 16 NF4 levels (QLoRA): quantiles of N(0,1), asymmetric so that 0 is exact, scaled to [−1, 1]."""
    offset = 0.9677083                                           # tails cut as in QLoRA
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])   # 8 levels > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    return (v / v.abs().max()).sort().values


@dataclass(frozen=True)
class NF4Format(NumberFormat):
    block: int = 64

    def levels(self) -> torch.Tensor:
        return nf4_values().float()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        xb = _blocks(x.float(), self.block, self.name)
        absmax = xb.abs().amax(-1, keepdim=True)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        lv = self.levels()
        mid = (lv[1:] + lv[:-1]) / 2
        idx = torch.bucketize(xb / scale, mid)                   # nearest level (ties go up)
        return (lv[idx] * scale).reshape(x.shape).to(x.dtype if x.dtype.is_floating_point else torch.float32)

    def grid(self) -> torch.Tensor:
        return nf4_values()

    def info(self) -> dict[str, float | int | str]:
        lv = nf4_values()
        return {"format": self.name, "bits": self.bits, "layout": f"16 levels + fp32 absmax per {self.block}",
                "max": 1.0, "min_normal": float(lv[lv > 0].min()), "min_subnormal": float(lv[lv > 0].min()),
                "epsilon": float((lv[1:] - lv[:-1]).min()), "decimal_digits": 1.2, "special": "none",
                "bits_per_element": self.bits + 32 / self.block}


@dataclass(frozen=True)
class MXFormat(NumberFormat):
    """OCP Microscaling: 32 elements share X = 2^(floor(log2 amax) − emax_elem), stored as E8M0."""

    element: NumberFormat = field(default_factory=lambda: FP8_E4M3)
    block: int = 32

    @property
    def emax_elem(self) -> int:
        if isinstance(self.element, IntFormat):   # MXINT8: 1.6 fixed point, largest power of two is 1
            return 0
        return int(math.floor(math.log2(self.element.max_value)))

    def _element_quantize(self, v: torch.Tensor) -> torch.Tensor:
        if isinstance(self.element, IntFormat):   # values k/64, k ∈ [−128, 127]
            return torch.clamp(torch.round(v * 64), -128, 127) / 64
        el = self.element
        if isinstance(el, FloatFormat) and el.overflow != "saturate":   # MX conversion saturates
            el = FloatFormat(el.name, el.bits, el.exp_bits, el.man_bits, el.special, "saturate", el.bias)
        return el.quantize(v)

    def shared_exponent(self, x: torch.Tensor) -> torch.Tensor:
        """The E8M0 exponent per block (int, in [−127, 127]) for blocks along the last dimension."""
        xb = _blocks(x.double(), self.block, self.name)
        amax = xb.abs().amax(-1)
        _, e = torch.frexp(amax)
        e = torch.where(amax > 0, e - 1 - self.emax_elem, torch.full_like(e, -127))
        return torch.clamp(e, -127, 127)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        xb = _blocks(x.double(), self.block, self.name)
        scale = torch.pow(2.0, self.shared_exponent(x).double()).unsqueeze(-1)
        q = self._element_quantize(xb / scale) * scale
        return q.reshape(x.shape).to(x.dtype if x.dtype.is_floating_point else torch.float32)

    def info(self) -> dict[str, float | int | str]:
        inner = self.element.info()
        return {"format": self.name, "bits": self.bits,
                "layout": f"{inner['layout']} + E8M0 per {self.block}",
                "max": float(inner["max"]) * 2.0 ** 127 if not isinstance(self.element, IntFormat)
                else 127 / 64 * 2.0 ** 127,
                "min_normal": 2.0 ** -127, "min_subnormal": 2.0 ** -127,
                "epsilon": float(inner["epsilon"]) if not isinstance(self.element, IntFormat) else 1 / 64,
                "decimal_digits": inner["decimal_digits"], "special": "NaN scale",
                "bits_per_element": self.bits + 8 / self.block}


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
FORMATS: Registry[NumberFormat] = Registry("number format")

FP32 = FloatFormat("fp32", 32, 8, 23, torch_dtype=torch.float32)
FP16 = FloatFormat("fp16", 16, 5, 10, torch_dtype=torch.float16)
BF16 = FloatFormat("bf16", 16, 8, 7, torch_dtype=torch.bfloat16)
FP8_E4M3 = FloatFormat("fp8_e4m3", 8, 4, 3, special="fn", overflow="saturate",
                       torch_dtype=getattr(torch, "float8_e4m3fn", None))
FP8_E5M2 = FloatFormat("fp8_e5m2", 8, 5, 2, special="ieee", overflow="inf",
                       torch_dtype=getattr(torch, "float8_e5m2", None))
FP6_E2M3 = FloatFormat("fp6_e2m3", 6, 2, 3, special="none", overflow="saturate")
FP6_E3M2 = FloatFormat("fp6_e3m2", 6, 3, 2, special="none", overflow="saturate")
FP4_E2M1 = FloatFormat("fp4_e2m1", 4, 2, 1, special="none", overflow="saturate")
FP4_E1M2 = FloatFormat("fp4_e1m2", 4, 1, 2, special="none", overflow="saturate")
FP4_E3M0 = FloatFormat("fp4_e3m0", 4, 3, 0, special="none", overflow="saturate")

for _f in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1, FP4_E1M2, FP4_E3M0):
    FORMATS.register(_f.name, _f)
for _n in range(1, 9):
    FORMATS.register(f"int{_n}", IntFormat(f"int{_n}", _n, signed=True))
    FORMATS.register(f"uint{_n}", IntFormat(f"uint{_n}", _n, signed=False))
FORMATS.register("nf4", NF4Format("nf4", 4))
FORMATS.register("mxfp8_e4m3", MXFormat("mxfp8_e4m3", 8, FP8_E4M3))
FORMATS.register("mxfp8_e5m2", MXFormat("mxfp8_e5m2", 8, FP8_E5M2))
FORMATS.register("mxfp6_e2m3", MXFormat("mxfp6_e2m3", 6, FP6_E2M3))
FORMATS.register("mxfp6_e3m2", MXFormat("mxfp6_e3m2", 6, FP6_E3M2))
FORMATS.register("mxfp4", MXFormat("mxfp4", 4, FP4_E2M1))
FORMATS.register("mxint8", MXFormat("mxint8", 8, IntFormat("int8", 8)))
for _alias, _target in (("mxfp8", "mxfp8_e4m3"), ("mxfp6", "mxfp6_e2m3")):
    FORMATS.register(_alias, FORMATS.get(_target))


def get_format(name: str) -> NumberFormat:
    """The registered format ``name`` (ConfigError listing the known ones otherwise)."""
    return FORMATS.get(name)


def int_format(bits: int, signed: bool = True) -> IntFormat:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"integer formats have 1 to 8 bits, got {bits!r}")
    return FORMATS.get(f"{'' if signed else 'u'}int{bits}")  # type: ignore[return-value]


def quantize_to_format(w: torch.Tensor, fmt: NumberFormat, *, granularity: str = "channel", group_size: int = 128,
                       symmetric: bool = True) -> torch.Tensor:
    """``w`` (rows = output channels, …) rounded to ``fmt``, same shape and dtype (fake quantization).

    - INT-n / UINT-n: the integer grid (:func:`~efficientml.quant.grid.fake_quantize`) per
      ``granularity`` / ``group_size``; ``symmetric`` also narrows the range to ±(2^(b−1)−1).
    - NF4, MX: the format's own block scales (absmax per 64 / E8M0 per 32) along the flattened inputs.
    - Minifloats (FP8, FP6, FP4): one scale per output channel mapping its max |w| to the format's max.
    - 16/32-bit floats: a plain cast.
    """
    if isinstance(fmt, IntFormat):
        spec = GridSpec(bits=fmt.bits, symmetric=symmetric and fmt.bits > 1, granularity=granularity,
                        group_size=group_size, narrow=symmetric)
        return fake_quantize(w, spec)
    flat = w.reshape(w.shape[0], -1)                          # (out, in·kh·kw)
    if isinstance(fmt, (NF4Format, MXFormat)):
        return fmt.quantize(flat).reshape(w.shape)
    if not isinstance(fmt, FloatFormat):
        raise ConfigError(f"number format {fmt.name!r} has no weight quantizer")
    if fmt.bits >= 16:
        return fmt.quantize(w)
    amax = flat.abs().amax(1, keepdim=True).clamp(min=1e-12)  # (out, 1)
    scale = amax / fmt.max_value
    return (fmt.quantize(flat / scale) * scale).reshape(w.shape)
