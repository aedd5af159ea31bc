"""CNN quantization configs and their handlers for :func:`efficientml.apply` (the registry lives in
efficientml.core.transform, whose docstring holds the one table of techniques and paths).

    res = efficientml.apply(model, IntegerConfig(observer="kl"), calib=loader)
    res = quantize(model, IntegerConfig(observer="kl"), calibration=loader)   # the same, older spelling

Layer filters: WeightOnlyConfig, AdaRoundConfig, QATConfig and BinaryConfig honour ``filter`` (default:
every Conv2d/Linear); IntegerConfig, KMeansConfig and DeepCompressionConfig convert the whole model
and refuse a filter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from efficientml.core.config import Config, check_choice
from efficientml.core.errors import ConfigError, ShapeError, UnsupportedError
from efficientml.core.modules import get_module, named_layers
from efficientml.core.transform import LayerFilter, TransformResult, apply, register_transform
from efficientml.quant.adaround import AdaRoundConfig, adaround
from efficientml.quant.binary import MODES, binarize_model
from efficientml.quant.deep_compression import DeepCompressionConfig, magnitude_prune
from efficientml.quant.formats import FORMATS, IntFormat, MXFormat, NF4Format, quantize_to_format
from efficientml.quant.integer import IntegerConfig, convert_integer
from efficientml.quant.kmeans import KMeansConfig, kmeans_quantize
from efficientml.quant.qat import QATConfig, prepare_qat

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


@dataclass(frozen=True)
class WeightOnlyConfig(Config):
    """Round the weights of every Conv2d/Linear to ``format`` (INT-n via linear quantization with
    ``granularity``/``group_size``; float formats with a per-channel scale that maps |W|max to the
    format's max; NF4/MX formats with their own block scales along the flattened input dimension).
    Which layers: ``apply``'s ``filter``. Other layers with weights raise unless ``skip_unsupported``."""

    kind = "weight_only"
    format: str = "int8"
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True
    skip_unsupported: bool = False
    strict_groups: bool = False

    def validate(self) -> None:
        FORMATS.get(self.format)                         # unknown format → ConfigError listing the known
        check_choice("granularity", self.granularity, ("tensor", "channel", "group"))


@dataclass(frozen=True)
class BinaryConfig(Config):
    kind = "binary"
    mode: str = "twn"
    skip_first_last: bool = True
    ttq_threshold: float = 0.05

    def validate(self) -> None:
        check_choice("binary/ternary mode", self.mode, MODES)


QuantizeResult = TransformResult           # the older name of the one result type


def fit_group(cols: int, size: int) -> int:
    """The group (block) length for rows of ``cols`` inputs when ``size`` is asked for: ``size`` if
    it divides; ``cols`` (one group per row, i.e. per channel) if the row is shorter; else the largest
    divisor of ``cols`` below ``size`` if it is at least ``size/4`` (finer, never coarser), else ``cols``."""
    if cols % size == 0:
        return size
    if cols > size:
        best = max(d for d in range(1, size + 1) if cols % d == 0)
        if 4 * best >= size:
            return best
    return cols


def _layer_plan(w: torch.Tensor, cfg: WeightOnlyConfig) -> tuple[dict[str, Any], str | None]:
    """quantize_to_format arguments for ``w`` and, if the group/block had to change, why."""
    fmt = FORMATS.get(cfg.format)
    kw: dict[str, Any] = {"fmt": fmt, "granularity": cfg.granularity, "group_size": cfg.group_size}
    cols = w[0].numel() if w.dim() > 1 else 0
    size = getattr(fmt, "block", None) if isinstance(fmt, (NF4Format, MXFormat)) else (
        cfg.group_size if cfg.granularity == "group" and isinstance(fmt, IntFormat) else None)
    if cfg.strict_groups or size is None or cols == 0 or cols % size == 0:
        return kw, None
    g = fit_group(cols, size)
    what = "block" if isinstance(fmt, (NF4Format, MXFormat)) else "group"
    if isinstance(fmt, (NF4Format, MXFormat)):
        kw["fmt"] = dataclasses.replace(fmt, block=g)
    elif g == cols:
        kw["granularity"] = "channel"
    else:
        kw["group_size"] = g
    used = "per channel" if g == cols else f"{what} {g}"
    return kw, f"{what} {size} does not divide the {cols} inputs per output channel; {used}"


def quantize_weight(w: torch.Tensor, cfg: WeightOnlyConfig) -> torch.Tensor:
    """``w`` rounded to ``cfg.format`` (see :func:`efficientml.quant.formats.quantize_to_format`),
    with the per-layer group fallback of :func:`fit_group` unless ``cfg.strict_groups``."""
    kw, _ = _layer_plan(w, cfg)
    return quantize_to_format(w, kw.pop("fmt"), symmetric=cfg.symmetric, **kw)


def _whole_model(filt: LayerFilter, what: str) -> None:
    if filt != LayerFilter():
        raise UnsupportedError(f"{what} converts every Conv2d/Linear of the model; it takes no layer filter "
                               "(WeightOnlyConfig, AdaRoundConfig, QATConfig and BinaryConfig choose layers)")


def _skip_list(model: nn.Module, filt: LayerFilter) -> tuple[str, ...]:
    """Conv2d/Linear names the filter leaves out (for functions that take ``skip=``)."""
    chosen = set(filt.select(model, SUPPORTED_LAYERS))
    return tuple(n for n, _ in named_layers(model, SUPPORTED_LAYERS) if n not in chosen)


def _weight_only_targets(model: nn.Module, cfg: WeightOnlyConfig, filt: LayerFilter) -> tuple[list[str], list[str]]:
    """(layers to round, layers left in float): unsupported layer types raise unless skip_unsupported."""
    known = {t.__name__ for t in SUPPORTED_LAYERS}
    bad = [t for t in (t if isinstance(t, str) else t.__name__ for t in filt.types) if t not in known]
    if bad and not cfg.skip_unsupported:
        raise UnsupportedError(f"layer type {bad[0]!r} has no quantized implementation; supported "
                               f"types are {sorted(known)} (or pass skip_unsupported=True)")
    chosen = filt.select(model, SUPPORTED_LAYERS)
    done = [n for n in chosen if isinstance(get_module(model, n), SUPPORTED_LAYERS)]
    scope = chosen if filt.explicit else [n for n, _ in model.named_modules()]
    skipped = []
    for name in scope:
        m = get_module(model, name)
        if isinstance(m, SUPPORTED_LAYERS) or isinstance(m, _NORMS) or filt.excluded(name, m):
            continue
        if any(isinstance(p, nn.Parameter) for p in m.parameters(recurse=False)):
            if not cfg.skip_unsupported:
                raise UnsupportedError(f"layer {name!r} ({type(m).__name__}) has no quantized "
                                       "implementation; pass skip_unsupported=True to keep it in float")
            skipped.append(f"{name} ({type(m).__name__})")
    return done, skipped


@register_transform(WeightOnlyConfig)
def _weight_only(model: nn.Module, cfg: WeightOnlyConfig, *, calib: Any, filter: LayerFilter) -> TransformResult:
    done, skipped = _weight_only_targets(model, cfg, filter)
    layers: dict[str, Any] = {}
    fallbacks: dict[str, str] = {}
    with torch.no_grad():
        for name in done:
            m = get_module(model, name)
            kw, note = _layer_plan(m.weight, cfg)
            try:
                m.weight.copy_(quantize_to_format(m.weight, kw.pop("fmt"), symmetric=cfg.symmetric, **kw))
            except ShapeError as e:
                raise ShapeError(f"layer {name!r}: {e}") from None
            layers[name] = cfg.format if note is None else f"{cfg.format} ({note})"
            if note is not None:
                fallbacks[name] = note
    return TransformResult(model, cfg, "simulated", layers,
                           {"quantized_layers": done, "float_layers": skipped, "fallbacks": fallbacks})


@register_transform(IntegerConfig)
def _integer(model: nn.Module, cfg: IntegerConfig, *, calib: Any, filter: LayerFilter) -> TransformResult:
    _whole_model(filter, "IntegerConfig")
    if calib is None:
        raise ConfigError("integer quantization needs calibration data: pass calib=<batches or loader>")
    im = convert_integer(model, calib, cfg)
    return TransformResult(im, cfg, "real", {}, im.report())


@register_transform(KMeansConfig)
def _kmeans(model: nn.Module, cfg: KMeansConfig, *, calib: Any, filter: LayerFilter) -> TransformResult:
    _whole_model(filter, "KMeansConfig")
    books = kmeans_quantize(model, cfg)
    bits = {n: cb.bits for n, cb in books.items()}
    return TransformResult(model, cfg, "simulated", dict(bits),
                           {"layers": bits, "storage_bits": sum(cb.storage_bits() for cb in books.values())})


@register_transform(AdaRoundConfig)
def _adaround(model: nn.Module, cfg: AdaRoundConfig, *, calib: Any, filter: LayerFilter) -> TransformResult:
    batches = _batches(calib)
    done = adaround(model, batches, cfg, skip=_skip_list(model, filter))
    return TransformResult(model, cfg, "simulated", {n: "adaround" for n in done}, {"quantized_layers": done})


@register_transform(QATConfig)
def _qat(model: nn.Module, cfg: QATConfig, *, calib: Any, filter: LayerFilter) -> TransformResult:
    skip = _skip_list(model, filter)
    done = [n for n, _ in named_layers(model, SUPPORTED_LAYERS) if n not in skip]
    return TransformResult(prepare_qat(model, cfg, skip=skip), cfg, "simulated", {n: "qat" for n in done}, {})


@register_transform(BinaryConfig)
def _binary(model: nn.Module, cfg: BinaryConfig, *, calib: Any, filter: LayerFilter) -> TransformResult:
    skip = _skip_list(model, filter)
    m, done = binarize_model(model, cfg.mode, cfg.skip_first_last, cfg.ttq_threshold, skip=skip)
    return TransformResult(m, cfg, "simulated", {n: cfg.mode for n in done}, {"quantized_layers": done})


@register_transform(DeepCompressionConfig)
def _deep(model: nn.Module, cfg: DeepCompressionConfig, *, calib: Any, filter: LayerFilter) -> TransformResult:
    _whole_model(filter, "DeepCompressionConfig")
    masks = magnitude_prune(model, cfg)
    bits = {n: cfg.conv_bits if isinstance(m, nn.Conv2d) else cfg.linear_bits
            for n, m in named_layers(model, SUPPORTED_LAYERS)}
    kmeans_quantize(model, KMeansConfig(bits=cfg.conv_bits, layer_bits=bits, prune_aware=True))
    density = {n: float(m.float().mean()) for n, m in masks.items()}
    layers = {n: {"bits": b, "density": density.get(n)} for n, b in bits.items()}
    return TransformResult(model, cfg, "simulated", layers, {"density": density, "bits": bits})


def _batches(calibration: Any) -> list[torch.Tensor]:
    if calibration is None:
        raise ConfigError("this method needs calibration data: pass calib=<batches or loader>")
    out = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    if not out:
        raise ConfigError("calibration got no data: the calibration loader yielded no batches")
    return out


QUANT_CONFIGS = (WeightOnlyConfig, IntegerConfig, KMeansConfig, AdaRoundConfig, QATConfig, BinaryConfig,
                 DeepCompressionConfig)


def quantize(model: nn.Module, config: Config, calibration: Iterable[Any] | None = None, *,
             filter: Any = None) -> TransformResult:
    """``apply(model, config, calib=calibration, filter=filter)`` for a CNN quantization config: the
    input model is not modified (the older spelling, kept)."""
    if not isinstance(config, QUANT_CONFIGS):
        raise ConfigError(f"{type(config).__name__} is not a quantization config; expected one of "
                          f"{sorted(c.__name__ for c in QUANT_CONFIGS)}")
    return apply(model, config, calib=calibration, filter=filter)
