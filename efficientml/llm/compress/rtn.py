"""Round-to-nearest (RTN) weight-only quantization: no calibration data.

The grid is :func:`efficientml.quant.grid.weight_grid` (the one integer grid of the project, with fp16
scales so fake-quantized weights equal the packed checkpoint's weights bit for bit)::

    w (out, in) → groups (out, G, g) with g = group_size (per-channel: G = 1, g = in)
    codes u ∈ [0, 2^b − 1], zero z per group, scale s per group; dequantized w = (u − z) · s

Number formats other than the integer grid (NF4, FP8, MX…) are
:class:`~efficientml.llm.compress.weight_format.WeightFormatConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.config import Config
from efficientml.quant.grid import GridSpec, QTensor, fake_quantize, quantize, weight_grid


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
    def spec(self) -> GridSpec:
        return weight_grid(self.w_bits, self.group_size, self.symmetric)


def quantize_weight(w: torch.Tensor, spec: GridSpec, max_abs: torch.Tensor | None = None,
                    name: str = "layer") -> QTensor:
    """Round-to-nearest on ``spec``'s grid (optionally after clipping to ±max_abs per group); ``name``
    names the layer when the group size does not divide its input dimension."""
    if w.dim() == 2:
        spec.group_len(w.shape[1], name)
    return quantize(w, spec, max_abs=max_abs)


__all__ = ["RTNConfig", "fake_quantize", "quantize_weight"]
