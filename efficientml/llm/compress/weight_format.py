"""Weight-only quantization of an LLM to a number format of :mod:`efficientml.quant.formats`: NF4
(absmax per block of 64, QLoRA's 16 normal quantiles), FP8 (E4M3 / E5M2 with one scale per output
channel), MX (an E8M0 power of two per 32), FP6/FP4 or INT/UINT-n — the same rounding the CNN path's
``WeightOnlyConfig`` uses (:func:`efficientml.quant.formats.quantize_to_format`).

Path: **simulated**. Every decoder-block linear keeps a dense weight holding the rounded values (in the
weight's dtype); nothing is packed, so memory and speed are the float model's. The report gives the
bits per weight a packed layout would take (element bits + scale bits per element).

    apply_weight_format(model, WeightFormatConfig("nf4"))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from efficientml.core.config import Config, check_choice
from efficientml.core.errors import ShapeError
from efficientml.quant.formats import FORMATS, FloatFormat, MXFormat, NF4Format, NumberFormat, quantize_to_format


@dataclass(frozen=True)
class WeightFormatConfig(Config):
    """``format``: a registered number format (``efficientml formats`` lists them). The integer formats
    use ``granularity`` / ``group_size`` / ``symmetric`` (the integer grid's settings); the others
    carry their own scales (see the module docstring)."""

    kind = "weight_format"
    format: str = "nf4"
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True

    def validate(self) -> None:
        FORMATS.get(self.format)  # unknown → ConfigError listing the known formats
        check_choice("granularity", self.granularity, ("tensor", "channel", "group"))


def bits_per_weight(fmt: NumberFormat, cfg: WeightFormatConfig, in_features: int) -> float:
    """Storage a packed layout would take per weight: element bits + the scales' share."""
    if isinstance(fmt, NF4Format):
        return fmt.bits + 32 / fmt.block            # fp32 absmax per block
    if isinstance(fmt, MXFormat):
        return fmt.bits + 8 / fmt.block             # E8M0 per block
    if isinstance(fmt, FloatFormat):
        return fmt.bits + (32 / in_features if fmt.bits < 16 else 0)   # fp32 scale per output channel
    per = {"tensor": 0.0, "channel": 1 / in_features, "group": 1 / cfg.group_size}[cfg.granularity]
    return fmt.bits + (32 if cfg.symmetric else 32 + fmt.bits) * per  # scale (+ zero point) per unit


@torch.no_grad()
def apply_weight_format(model: nn.Module, cfg: WeightFormatConfig) -> dict:
    """Round every decoder-block linear's weight of ``model`` to ``cfg.format``, in place.

    Returns {"path": "simulated", "format", "config", "layers": {name: bits per weight}, "bits_per_weight"
    (the mean over those layers' weights)}. Embeddings, norms and the LM head stay in float."""
    from efficientml.llm.compress.mappings import BLOCK_LINEARS

    fmt = FORMATS.get(cfg.format)
    layers, total, weighted = {}, 0, 0.0
    for i, block in enumerate(model.model.layers):
        for name in BLOCK_LINEARS:
            lin = block.get_submodule(name)
            w = lin.weight
            full = f"model.layers.{i}.{name}"
            try:
                q = quantize_to_format(w.detach().float(), fmt, granularity=cfg.granularity,
                                       group_size=cfg.group_size, symmetric=cfg.symmetric)
            except ShapeError as e:
                raise ShapeError(f"{full}: {e}") from None
            w.copy_(q.to(w.dtype))
            layers[full] = bits_per_weight(fmt, cfg, w.shape[1])
            total += w.numel()
            weighted += layers[full] * w.numel()
    return {"path": "simulated", "format": fmt.name, "config": cfg.to_dict(), "layers": layers,
            "bits_per_weight": weighted / max(total, 1)}
