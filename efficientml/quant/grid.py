"""The integer grid: one spec, one quantize-to-codes / dequantize, one fake-quantize, for CNN and LLM code.

A grid maps a real value r to an integer q ∈ [q_min, q_max] with ``r ≈ S·(q − Z)``, one scale S and
zero point Z per unit of ``granularity``::

    w (rows, …) → units (rows, G, n): tensor: 1×1×numel; channel: rows×1×K; group: rows×(K/g)×g

(K = the inputs per output channel, the flattened trailing dimensions.) Symmetric: Z = 0, S = absmax /
q_max; asymmetric: S = (max − min)/(q_max − q_min), Z = round(q_min − min/S).

**Codes.** A :class:`QTensor` stores *codes* u = q + offset and zeros z = Z + offset, with offset =
2^(b−1) for signed grids and 0 for unsigned ones: the codes of every grid lie in [0, 2^b − 1], which is
what the packers (:mod:`efficientml.quant.packing`) and the compressed-tensors checkpoints store
("offset binary": compressed-tensors' signed q = u − 2^(b−1)). ``(u − z)·S == (q − Z)·S`` exactly.

Two knobs say how a range becomes a scale (defaults: the CNN observers' rule):

- ``zero_in_range``: widen [min, max] to include 0 first (True), or use the measured range (False).
- ``scale_dtype``: "float32"; or "float16": scales are rounded to fp16 before the codes are computed
  (floor 1e-5), because packed checkpoints store fp16 scales — fake-quantized weights then equal the
  packed checkpoint's weights bit for bit.

:func:`weight_grid` is the LLM weight grid (RTN/AWQ/GPTQ, the packed W{2..8}A16 linear): symmetric is
the signed full range (scale absmax/(2^(b−1)−1), codes 0 … 2^b − 1 around zero 2^(b−1)), asymmetric the
unsigned range; fp16 scales, measured ranges, ``group_size=None`` for one scale per output channel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError, ShapeError

GRANULARITIES = ("tensor", "channel", "group")
_TINY = torch.finfo(torch.float32).tiny * 2 ** 24     # fp32 scale floor
_FP16_FLOOR = 1e-5                                      # fp16 scale floor (packed checkpoints)


def qrange(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """(q_min, q_max) of a ``bits``-bit integer; ``narrow`` drops −2^(b−1) so the range is symmetric."""
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"linear quantization supports 1 to 16 bits, got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


@dataclass(frozen=True)
class GridSpec(Config):
    """How to quantize one tensor. ``group_size`` applies with granularity "group" (along dim 1, the
    flattened inputs); ``group_size=None`` means one group per output channel (granularity "channel")."""

    kind = "grid"
    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = 128
    signed: bool = True
    narrow: bool = False        # symmetric range [−(2^(b−1)−1), 2^(b−1)−1]
    rounding: str = "nearest"   # "nearest" or "stochastic"
    scale_dtype: str = "float32"  # "float16": scales rounded to fp16 (what packed checkpoints store)
    zero_in_range: bool = True    # widen each unit's [min, max] to include 0 before taking its scale

    def __post_init__(self) -> None:
        # one spelling per grid: group_size=None is per channel; a per-channel/tensor spec has no group size
        if self.granularity == "group" and self.group_size is None:
            object.__setattr__(self, "granularity", "channel")
        if self.granularity in ("tensor", "channel"):
            object.__setattr__(self, "group_size", None)
        super().__post_init__()

    def validate(self) -> None:
        qrange(self.bits)  # bits in [1, 16]
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("rounding", self.rounding, ("nearest", "stochastic"))
        check_choice("scale_dtype", self.scale_dtype, ("float32", "float16"))
        if self.group_size is not None:
            if not isinstance(self.group_size, int):
                raise ConfigError(f"group_size must be a positive integer or None (per channel), "
                                  f"got {self.group_size!r}")
            check_range("group_size", self.group_size, 1, 1 << 30)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[1]

    @property
    def offset(self) -> int:
        """code = q + offset: every grid's codes lie in [0, 2^bits − 1]."""
        return 1 << (self.bits - 1) if self.signed else 0

    @property
    def code_max(self) -> int:
        return (1 << self.bits) - 1

    def group_len(self, in_features: int, name: str = "layer") -> int:
        """Columns per scale for a weight with ``in_features`` columns; checks that the group divides."""
        if self.granularity != "group":
            return in_features
        if in_features % self.group_size:
            raise ConfigError(f"group_size {self.group_size} does not divide {name}'s input dimension "
                              f"{in_features}; choose a divisor of {in_features} or group_size=None")
        return self.group_size

    def replace(self, **kw) -> "GridSpec":
        return dataclasses.replace(self, **kw)


def weight_grid(bits: int = 4, group_size: int | None = 128, symmetric: bool = False) -> GridSpec:
    """The LLM weight grid (RTN, AWQ, GPTQ, the packed linear): see the module docstring."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"weight bits must be an integer from 2 to 8, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ConfigError(f"group_size must be a positive integer or None (per channel), got {group_size!r}")
    return GridSpec(bits, symmetric, "channel" if group_size is None else "group", group_size,
                    signed=symmetric, scale_dtype="float16", zero_in_range=False)


def round_tensor(x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Round to integers: to nearest (ties to even) or stochastically (up with probability frac(x))."""
    if rounding == "nearest":
        return torch.round(x)
    if rounding == "stochastic":
        floor = torch.floor(x)
        return floor + (torch.rand(x.shape, generator=generator, dtype=x.dtype) < (x - floor)).to(x.dtype)
    raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def scale_zero_point(rmin: torch.Tensor, rmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool, *,
                     zero_in_range: bool = True, scale_dtype: str = "float32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32) and zero point Z (int32, in [qmin, qmax]) that map [rmin, rmax] onto [qmin, qmax]."""
    rmin, rmax = rmin.float(), rmax.float()
    if zero_in_range:
        rmin = torch.minimum(rmin, torch.zeros_like(rmin))
        rmax = torch.maximum(rmax, torch.zeros_like(rmax))
    fp16 = scale_dtype == "float16"
    floor = _FP16_FLOOR if fp16 else _TINY
    if symmetric:
        # signed: absmax onto qmax (1-bit signed has qmax 0: use 1); unsigned: [0, absmax] onto [0, qmax]
        # (1-bit narrow signed has the one level 0 and q_min = 0: absmax / 0, as it always had)
        scale = torch.clamp(torch.maximum(rmax, -rmin) / (max(qmax, 1) if qmin < 0 else qmax), min=floor)
        scale = scale.half().float() if fp16 else scale
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((rmax - rmin) / (qmax - qmin), min=floor)
    scale = scale.half().float() if fp16 else scale
    zp = torch.clamp(torch.round(qmin - rmin / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def grouped(w: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """View ``w`` as (rows, groups, n) for the granularity (tensor: 1×1×numel; channel: C×1×K)."""
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


def qparams(w: torch.Tensor, spec: GridSpec, *, rmin: torch.Tensor | None = None,
            rmax: torch.Tensor | None = None, max_abs: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rows, G) fp32 and zero (rows, G) int32 *in code units* (Z + offset) for ``w``.

    Ranges default to each unit's min/max; ``rmin``/``rmax`` replace them (calibrated or clipped
    ranges); ``max_abs`` (rows, G) clips each unit's range to ±max_abs (AWQ's clip search)."""
    g = grouped(w.detach().float(), spec)                  # (rows, G, n)
    lo = g.amin(-1) if rmin is None else rmin.reshape(g.shape[:2]).float()
    hi = g.amax(-1) if rmax is None else rmax.reshape(g.shape[:2]).float()
    if max_abs is not None:  # == the range of the unit clipped to ±max_abs
        m = max_abs.reshape(g.shape[:2]).float()
        lo, hi = torch.maximum(torch.minimum(lo, m), -m), torch.maximum(torch.minimum(hi, m), -m)
    scale, zp = scale_zero_point(lo, hi, spec.qmin, spec.qmax, spec.symmetric,
                                 zero_in_range=spec.zero_in_range, scale_dtype=spec.scale_dtype)
    return scale, zp + spec.offset


def qparams_mse(w: torch.Tensor, spec: GridSpec, *, norm: float = 2.4, steps: int = 20,
                max_shrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qparams` with each unit's range shrunk by the factor p ∈ {1, 1 − 1/steps, …, 1 − max_shrink}
    that minimizes Σ |Q(w) − w|^norm over the unit (weights only: no calibration data, so it does not
    favour any text). ``norm`` 2.4 and the shrink range as in GPTQ's reference quantizer (its ``mse``
    option); ``steps`` 20 (p in steps of 0.05) keeps it a few seconds per model."""
    g = grouped(w.detach().float(), spec)                  # (rows, G, n)
    lo0, hi0 = g.amin(-1), g.amax(-1)
    best = torch.full(lo0.shape, float("inf"), device=g.device)
    best_s = best_z = None
    for i in range(max(1, int(max_shrink * steps))):
        p = 1.0 - i / steps
        s, z = scale_zero_point(lo0 * p, hi0 * p, spec.qmin, spec.qmax, spec.symmetric,
                                zero_in_range=spec.zero_in_range, scale_dtype=spec.scale_dtype)
        z = z + spec.offset
        u = torch.clamp(torch.round(g / s.unsqueeze(-1)) + z.unsqueeze(-1), spec.qmin + spec.offset,
                        spec.qmax + spec.offset)
        err = ((u - z.unsqueeze(-1)) * s.unsqueeze(-1) - g).abs_().pow_(norm).sum(-1)
        if best_s is None:
            best, best_s, best_z = err, s, z
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: GridSpec,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes u = clamp(round(w/S) + z) in [q_min, q_max] + offset, shaped like ``w``; uint8 for ≤ 8 bits
    (int32 above). ``scale``/``zero`` (rows, G) as :func:`qparams` returns them."""
    g = grouped(w.detach().float(), spec)
    u = round_tensor(g / scale.unsqueeze(-1), spec.rounding, generator) + zero.unsqueeze(-1)
    u = torch.clamp(u, spec.qmin + spec.offset, spec.qmax + spec.offset)
    return u.reshape(w.shape).to(torch.uint8 if spec.bits <= 8 else torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(u − z)·S in fp32, cast to ``dtype``: codes (rows, …), scale/zero (rows, G), or (1, 1) per tensor."""
    shape = codes.shape
    rows = scale.shape[0]
    u = codes.reshape(rows, scale.shape[1], -1).float()     # (rows, G, n)
    w = (u - zero.unsqueeze(-1).float()) * scale.unsqueeze(-1).float()
    return w.reshape(shape).to(dtype)


@dataclass
class QTensor:
    """Codes plus the scale and zero that give them meaning: ``w ≈ (codes − zero)·scale`` per unit."""

    codes: torch.Tensor          # the original tensor's shape; in [0, 2^bits − 1] (offset binary)
    scale: torch.Tensor          # (rows, G) fp32 — one per scaling unit
    zero: torch.Tensor           # (rows, G) int32, code units (Z + offset)
    spec: GridSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def q(self) -> torch.Tensor:
        """The grid integers q = u − offset ∈ [q_min, q_max] (int8 for signed ≤ 8 bits, else int32)."""
        dtype = torch.int8 if self.spec.bits <= 8 and self.spec.signed else torch.int32
        return (self.codes.to(torch.int32) - self.spec.offset).to(dtype)

    @property
    def zero_point(self) -> torch.Tensor:
        """Z = zero − offset (int32), the grid's zero point."""
        return self.zero - self.spec.offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero, dtype)

    def storage_bits(self) -> int:
        n_scales = self.scale.numel()
        zp_bits = 0 if self.spec.symmetric else n_scales * self.spec.bits
        return self.codes.numel() * self.spec.bits + 32 * n_scales + zp_bits


def quantize(w: torch.Tensor, spec: GridSpec | None = None, *, rmin: torch.Tensor | None = None,
             rmax: torch.Tensor | None = None, max_abs: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> QTensor:
    """Quantize ``w`` on ``spec``'s grid (ranges: see :func:`qparams`)."""
    spec = spec or GridSpec()
    scale, zero = qparams(w, spec, rmin=rmin, rmax=rmax, max_abs=max_abs)
    return QTensor(quantize_codes(w, scale, zero, spec, generator), scale, zero, spec)


def fake_quantize(w: torch.Tensor, spec: GridSpec | None = None, **kw) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype (no gradient path; see :mod:`efficientml.quant.qat`
    for STE). Keywords as :func:`quantize`."""
    return quantize(w, spec, **kw).dequantize(w.dtype)
