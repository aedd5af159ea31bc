"""Linear (affine) quantization: r = S·(q − Z).

Symmetric (Z = 0, S = max|r| / q_max) or asymmetric (S = (r_max − r_min)/(q_max − q_min),
Z = round(q_min − r_min/S)); scales per tensor, per output channel (axis 0) or per group of
``group_size`` consecutive inputs; VS-Quant two-level scales (small unsigned integer scales per
vector of inputs under one float scale per channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError, ShapeError

GRANULARITIES = ("tensor", "channel", "group")


def qrange(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """(q_min, q_max) of a ``bits``-bit integer; ``narrow`` drops −2^(b−1) so the range is symmetric."""
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"linear quantization supports 1 to 16 bits, got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


@dataclass(frozen=True)
class LinearQuantSpec(Config):
    """How to quantize one tensor. ``group_size`` applies with granularity "group" (along dim 1)."""

    kind = "linear_quant"
    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    signed: bool = True
    narrow: bool = False        # symmetric range [−(2^(b−1)−1), 2^(b−1)−1]
    rounding: str = "nearest"   # "nearest" or "stochastic"

    def validate(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ConfigError(f"linear quantization supports 1 to 16 bits, got {self.bits!r}")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("rounding", self.rounding, ("nearest", "stochastic"))
        check_range("group_size", self.group_size, 1, 1 << 30)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[1]


def round_tensor(x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Round to integers: to nearest (ties to even) or stochastically (up with probability frac(x))."""
    if rounding == "nearest":
        return torch.round(x)
    if rounding == "stochastic":
        floor = torch.floor(x)
        return floor + (torch.rand(x.shape, generator=generator, dtype=x.dtype) < (x - floor)).to(x.dtype)
    raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def scale_zero_point(rmin: torch.Tensor, rmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [rmin, rmax] (widened to include 0) onto [qmin, qmax]."""
    rmin = torch.minimum(rmin.float(), torch.zeros_like(rmin, dtype=torch.float32))
    rmax = torch.maximum(rmax.float(), torch.zeros_like(rmax, dtype=torch.float32))
    tiny = torch.finfo(torch.float32).tiny * 2 ** 24
    if symmetric:
        amax = torch.maximum(rmax, -rmin)
        if qmin < 0:
            scale = amax / max(qmax, 1)
        else:                                 # unsigned symmetric: [0, amax] onto [0, qmax]
            scale = amax / qmax
        scale = torch.clamp(scale, min=tiny)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((rmax - rmin) / (qmax - qmin), min=tiny)
    zp = torch.clamp(torch.round(qmin - rmin / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def _grouped(w: torch.Tensor, spec: LinearQuantSpec) -> torch.Tensor:
    """View ``w`` as (rows, groups, group) for the granularity (tensor: 1×1×N; channel: C×1×K)."""
    if spec.granularity == "tensor":
        return w.reshape(1, 1, -1)
    flat = w.reshape(w.shape[0], -1)
    if spec.granularity == "channel":
        return flat.unsqueeze(1)
    cols = flat.shape[1]
    if w.dim() < 2 or cols % spec.group_size:
        raise ShapeError(f"group size {spec.group_size} does not divide the {cols} inputs per output "
                         f"channel of a tensor of shape {tuple(w.shape)}")
    return flat.reshape(w.shape[0], cols // spec.group_size, spec.group_size)


@dataclass
class QTensor:
    """Integer codes plus the scale/zero point that give them meaning (shapes broadcast to ``q``)."""

    q: torch.Tensor              # integer codes, the original tensor's shape
    scale: torch.Tensor          # (rows, groups) — one per scaling unit
    zero_point: torch.Tensor     # same shape as scale, int32
    spec: LinearQuantSpec
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        g = _grouped(self.q.float(), self.spec)
        return ((g - self.zero_point.unsqueeze(-1)) * self.scale.unsqueeze(-1)).reshape(self.shape)

    def storage_bits(self) -> int:
        n_scales = self.scale.numel()
        zp_bits = 0 if self.spec.symmetric else n_scales * self.spec.bits
        return self.q.numel() * self.spec.bits + 32 * n_scales + zp_bits


def quantize_tensor(w: torch.Tensor, spec: LinearQuantSpec | None = None, *,
                    rmin: torch.Tensor | None = None, rmax: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> QTensor:
    """Quantize ``w`` per ``spec``; ranges default to each unit's min/max (pass clipped ones to clip)."""
    spec = spec or LinearQuantSpec()
    g = _grouped(w.detach().float(), spec)                  # (rows, groups, n)
    lo = g.amin(-1) if rmin is None else rmin.reshape(g.shape[:2]).float()
    hi = g.amax(-1) if rmax is None else rmax.reshape(g.shape[:2]).float()
    scale, zp = scale_zero_point(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    q = round_tensor(g / scale.unsqueeze(-1), spec.rounding, generator) + zp.unsqueeze(-1)
    q = torch.clamp(q, spec.qmin, spec.qmax)
    dtype = torch.int8 if spec.bits <= 8 and spec.signed else torch.int32
    return QTensor(q.reshape(w.shape).to(dtype), scale, zp, spec, tuple(w.shape))


def fake_quantize(w: torch.Tensor, spec: LinearQuantSpec | None = None, **kw: object) -> torch.Tensor:
    """Quantize then dequantize (no gradient path; see :mod:`efficientml.quant.qat` for STE)."""
    return quantize_tensor(w, spec, **kw).dequantize().to(w.dtype)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# VS-Quant: two-level scales
# ------------------------------------------------------------------------------------------------
@dataclass
class VSQuantTensor:
    q: torch.Tensor              # (C, K) int codes, symmetric
    vector_scale: torch.Tensor   # (C, K/V) unsigned integers in [1, 2^scale_bits − 1]
    channel_scale: torch.Tensor  # (C,) float
    bits: int
    scale_bits: int
    vector_size: int
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        c = self.q.shape[0]
        qv = self.q.float().reshape(c, -1, self.vector_size)
        s = self.vector_scale.float().unsqueeze(-1) * self.channel_scale.view(c, 1, 1)
        return (qv * s).reshape(self.shape)

    def storage_bits(self) -> int:
        return self.q.numel() * self.bits + self.vector_scale.numel() * self.scale_bits + 32 * self.channel_scale.numel()


def vsquant(w: torch.Tensor, bits: int = 4, vector_size: int = 16, scale_bits: int = 4) -> VSQuantTensor:
    """Per-vector scales quantized to ``scale_bits``-bit unsigned integers under a per-channel float scale
    (Dai et al. 2021): s_v = s_int[v] · γ_c with γ_c = max_v(s_v) / (2^scale_bits − 1)."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    if flat.shape[1] % vector_size:
        raise ShapeError(f"vector size {vector_size} does not divide the {flat.shape[1]} inputs per output "
                         f"channel of a tensor of shape {tuple(w.shape)}")
    _, qmax = qrange(bits, True, narrow=True)
    v = flat.reshape(flat.shape[0], -1, vector_size)                  # (C, K/V, V)
    s_vec = v.abs().amax(-1) / qmax                                    # ideal float scale per vector
    smax = 2 ** scale_bits - 1
    gamma = torch.clamp(s_vec.amax(-1) / smax, min=1e-12)             # (C,)
    s_int = torch.clamp(torch.ceil(s_vec / gamma.unsqueeze(-1)), 1, smax)  # ceil: never clip
    s = s_int * gamma.unsqueeze(-1)
    q = torch.clamp(torch.round(v / s.unsqueeze(-1)), -qmax, qmax)
    return VSQuantTensor(q.reshape(flat.shape).to(torch.int8), s_int.to(torch.uint8), gamma, bits,
                         scale_bits, vector_size, tuple(w.shape))
