"""Weight quantization primitives and round-to-nearest (RTN).

One integer grid is used everywhere (RTN, AWQ, GPTQ, packing, the W4A16 linear)::

    w (out, in) → groups (out, G, g) with g = group_size (per-channel: G = 1, g = in)
    codes u ∈ [0, 2^b − 1] (unsigned), zero z per group, scale s per group
    dequantized w = (u − z) · s

Asymmetric: ``s = (max − min) / (2^b − 1)``, ``z = round(−min / s)``. Symmetric: ``s = absmax /
(2^(b−1) − 1)`` and ``z = 2^(b−1)`` (signed levels −(2^(b−1)−1) … 2^(b−1)−1, no clipping at +absmax).
Scales are rounded to fp16 before the codes are computed, because the checkpoint stores fp16 scales:
fake-quantized weights then equal the packed checkpoint's weights bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class WeightQuantSpec(Config):
    """How one linear's weight is quantized. ``group_size=None``: one scale per output channel."""

    kind = "weight_quant"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def validate(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"weight bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ConfigError(f"group_size must be a positive integer or None (per channel), got {self.group_size!r}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def group_len(self, in_features: int, name: str = "layer") -> int:
        """Columns per group for a weight with ``in_features`` columns; checks that it divides."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size:
            raise ConfigError(f"group_size {self.group_size} does not divide {name}'s input dimension "
                              f"{in_features}; choose a divisor of {in_features} or group_size=None")
        return self.group_size

    def replace(self, **kw) -> "WeightQuantSpec":
        return dataclasses.replace(self, **kw)


def _grouped(w: torch.Tensor, spec: WeightQuantSpec, name: str = "layer") -> torch.Tensor:
    if w.dim() != 2:
        raise ShapeError(f"{name}: expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    g = spec.group_len(w.shape[1], name)
    return w.reshape(w.shape[0], w.shape[1] // g, g)  # (out, G, g)


def compute_qparams(w: torch.Tensor, spec: WeightQuantSpec, max_abs: torch.Tensor | None = None,
                    name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (out, G) fp32 holding fp16-representable values, and zero (out, G) int32 in [0, qmax].

    ``max_abs`` (out, G): clip each group to ±max_abs before taking its range (AWQ's clip search)."""
    wg = _grouped(w.float(), spec, name)
    if max_abs is not None:
        wg = torch.maximum(torch.minimum(wg, max_abs[..., None]), -max_abs[..., None])
    if spec.symmetric:
        half = (1 << (spec.bits - 1)) - 1
        scale = wg.abs().amax(-1) / half
        scale = scale.clamp(min=1e-5).half().float()
        zero = torch.full_like(scale, 1 << (spec.bits - 1), dtype=torch.int32)
    else:
        hi, lo = wg.amax(-1), wg.amin(-1)
        scale = ((hi - lo) / spec.qmax).clamp(min=1e-5).half().float()
        zero = (-torch.round(lo / scale)).clamp(0, spec.qmax).to(torch.int32)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Codes u (out, in) uint8 in [0, qmax] for the given qparams."""
    wg = _grouped(w.float(), spec)
    u = torch.round(wg / scale[..., None]) + zero[..., None]
    return u.clamp(0, spec.qmax).to(torch.uint8).reshape(w.shape)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(u − z) · s, computed in fp32 and cast to ``dtype``; codes (out, in), scale/zero (out, G)."""
    out, n = codes.shape
    G = scale.shape[1]
    u = codes.reshape(out, G, n // G).float()
    w = (u - zero[..., None].float()) * scale[..., None].float()  # (out, G, g)
    return w.reshape(out, n).to(dtype)


@dataclass
class QuantizedWeight:
    """The result of quantizing one weight: what the packed checkpoint stores."""

    codes: torch.Tensor   # (out, in) uint8 in [0, 2^bits − 1]
    scale: torch.Tensor   # (out, G) fp32 (fp16-representable)
    zero: torch.Tensor    # (out, G) int32
    spec: WeightQuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero, dtype)


def quantize_weight(w: torch.Tensor, spec: WeightQuantSpec, max_abs: torch.Tensor | None = None,
                    name: str = "layer") -> QuantizedWeight:
    """Round-to-nearest on ``spec``'s grid (optionally after clipping to ±max_abs per group)."""
    scale, zero = compute_qparams(w, spec, max_abs, name)
    return QuantizedWeight(quantize_codes(w, scale, zero, spec), scale, zero, spec)


def fake_quantize(w: torch.Tensor, spec: WeightQuantSpec, max_abs: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize in one step (same dtype as ``w``)."""
    return quantize_weight(w, spec, max_abs).dequantize(w.dtype)


@dataclass(frozen=True)
class RTNConfig(Config):
    """Round-to-nearest weight-only quantization: no calibration data."""

    kind = "rtn"
    w_bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def validate(self) -> None:
        self.spec  # noqa: B018 — validates bits and group size

    @property
    def spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.w_bits, self.group_size, self.symmetric)


def check_bits(name: str, bits: int) -> None:
    check_range(name, bits, 2, 8)
