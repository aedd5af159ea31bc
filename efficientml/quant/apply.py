"""One entry point: ``quantize(model, config, calibration=None)`` → :class:`QuantizeResult`.

The config's type selects the technique (a registry, not an if-chain):

==========================  =====================================================  ==========
config                      technique                                              path
==========================  =====================================================  ==========
IntegerConfig               integer-only int8 (BN folded, calibrated activations)  real
WeightOnlyConfig            weights rounded to any registered number format         simulated
KMeansConfig                per-layer k-means codebooks (fine-tunable)              simulated
AdaRoundConfig              learned rounding, layer-wise reconstruction             simulated
QATConfig                   fake-quant modules for training (STE, LSQ, BN folding)  simulated
BinaryConfig                BWN / XNOR / TWN / TTQ                                  simulated
DeepCompressionConfig       prune + k-means (then fine-tune, then save_compressed)  real file
==========================  =====================================================  ==========
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from efficientml.core.config import Config, check_choice
from efficientml.core.errors import ConfigError, ShapeError, UnsupportedError
from efficientml.core.modules import named_layers
from efficientml.quant.adaround import AdaRoundConfig, adaround
from efficientml.quant.binary import MODES, binarize_model
from efficientml.quant.deep_compression import DeepCompressionConfig, magnitude_prune
from efficientml.quant.formats import FORMATS, quantize_to_format
from efficientml.quant.integer import IntegerConfig, convert_integer
from efficientml.quant.kmeans import KMeansConfig, kmeans_quantize
from efficientml.quant.qat import QATConfig, prepare_qat

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class WeightOnlyConfig(Config):
    """Round the weights of every Conv2d/Linear to ``format`` (INT-n via linear quantization with
    ``granularity``/``group_size``; float formats with a per-channel scale that maps |W|max to the
    format's max; NF4/MX formats with their own block scales along the flattened input dimension).
    ``layer_types`` names the module types to quantize; others raise unless ``skip_unsupported``."""

    kind = "weight_only"
    format: str = "int8"
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True
    layer_types: tuple = ("Conv2d", "Linear")
    skip_unsupported: bool = False

    def validate(self) -> None:
        FORMATS.get(self.format)                         # unknown format → ConfigError listing the known
        check_choice("granularity", self.granularity, ("tensor", "channel", "group"))
        known = {"Conv2d", "Linear"}
        bad = [t for t in self.layer_types if t not in known]
        if bad and not self.skip_unsupported:
            raise UnsupportedError(f"layer type {bad[0]!r} has no quantized implementation; supported "
                                   f"types are {sorted(known)} (or pass skip_unsupported=True)")


@dataclass(frozen=True)
class BinaryConfig(Config):
    kind = "binary"
    mode: str = "twn"
    skip_first_last: bool = True
    ttq_threshold: float = 0.05

    def validate(self) -> None:
        check_choice("binary/ternary mode", self.mode, MODES)


@dataclass
class QuantizeResult:
    model: nn.Module
    path: str                                # "real" (integer kernels / packed file) or "simulated"
    config: Config
    report: dict[str, Any] = field(default_factory=dict)


def quantize_weight(w: torch.Tensor, cfg: WeightOnlyConfig) -> torch.Tensor:
    """``w`` rounded to ``cfg.format`` (see :func:`efficientml.quant.formats.quantize_to_format`)."""
    return quantize_to_format(w, FORMATS.get(cfg.format), granularity=cfg.granularity,
                              group_size=cfg.group_size, symmetric=cfg.symmetric)


def _weight_only(model: nn.Module, cfg: WeightOnlyConfig, calibration: Any) -> QuantizeResult:
    model = copy.deepcopy(model)
    types = tuple(t for t in SUPPORTED_LAYERS if t.__name__ in cfg.layer_types)
    done, skipped = [], []
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, types):
                try:
                    m.weight.copy_(quantize_weight(m.weight, cfg))
                except ShapeError as e:
                    raise ShapeError(f"layer {name!r}: {e}") from None
                done.append(name)
            elif any(isinstance(p, nn.Parameter) for p in m.parameters(recurse=False)) and \
                    not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                if not cfg.skip_unsupported:
                    raise UnsupportedError(f"layer {name!r} ({type(m).__name__}) has no quantized "
                                           "implementation; pass skip_unsupported=True to keep it in float")
                skipped.append(f"{name} ({type(m).__name__})")
    return QuantizeResult(model, "simulated", cfg, {"quantized_layers": done, "float_layers": skipped})


def _integer(model: nn.Module, cfg: IntegerConfig, calibration: Any) -> QuantizeResult:
    if calibration is None:
        raise ConfigError("integer quantization needs calibration data: pass calibration=<batches or loader>")
    im = convert_integer(model, calibration, cfg)
    return QuantizeResult(im, "real", cfg, im.report())


def _kmeans(model: nn.Module, cfg: KMeansConfig, calibration: Any) -> QuantizeResult:
    model = copy.deepcopy(model)
    books = kmeans_quantize(model, cfg)
    return QuantizeResult(model, "simulated", cfg,
                          {"layers": {n: cb.bits for n, cb in books.items()},
                           "storage_bits": sum(cb.storage_bits() for cb in books.values())})


def _adaround(model: nn.Module, cfg: AdaRoundConfig, calibration: Any) -> QuantizeResult:
    batches = _batches(calibration)
    model = copy.deepcopy(model)
    done = adaround(model, batches, cfg)
    return QuantizeResult(model, "simulated", cfg, {"quantized_layers": done})


def _qat(model: nn.Module, cfg: QATConfig, calibration: Any) -> QuantizeResult:
    return QuantizeResult(prepare_qat(model, cfg), "simulated", cfg, {})


def _binary(model: nn.Module, cfg: BinaryConfig, calibration: Any) -> QuantizeResult:
    m, done = binarize_model(model, cfg.mode, cfg.skip_first_last, cfg.ttq_threshold)
    return QuantizeResult(m, "simulated", cfg, {"quantized_layers": done})


def _deep(model: nn.Module, cfg: DeepCompressionConfig, calibration: Any) -> QuantizeResult:
    model = copy.deepcopy(model)
    masks = magnitude_prune(model, cfg)
    bits = {n: cfg.conv_bits if isinstance(m, nn.Conv2d) else cfg.linear_bits
            for n, m in named_layers(model, SUPPORTED_LAYERS)}
    kmeans_quantize(model, KMeansConfig(bits=cfg.conv_bits, layer_bits=bits, prune_aware=True))
    density = {n: float(m.float().mean()) for n, m in masks.items()}
    return QuantizeResult(model, "simulated", cfg, {"density": density, "bits": bits})


def _batches(calibration: Any) -> list[torch.Tensor]:
    if calibration is None:
        raise ConfigError("this method needs calibration data: pass calibration=<batches or loader>")
    out = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    if not out:
        raise ConfigError("calibration got no data: the calibration loader yielded no batches")
    return out


METHODS: dict[type, Callable[[nn.Module, Any, Any], QuantizeResult]] = {
    WeightOnlyConfig: _weight_only, IntegerConfig: _integer, KMeansConfig: _kmeans,
    AdaRoundConfig: _adaround, QATConfig: _qat, BinaryConfig: _binary, DeepCompressionConfig: _deep,
}


def quantize(model: nn.Module, config: Config, calibration: Iterable[Any] | None = None) -> QuantizeResult:
    """Apply the technique selected by ``config``'s type; the input model is not modified."""
    fn = METHODS.get(type(config))
    if fn is None:
        raise ConfigError(f"{type(config).__name__} is not a quantization config; expected one of "
                          f"{sorted(c.__name__ for c in METHODS)}")
    return fn(model, config, calibration)
