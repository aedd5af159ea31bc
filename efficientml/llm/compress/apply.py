"""The LLM compression handlers for :func:`efficientml.apply`: RTN / AWQ / GPTQ / SmoothQuant
quantization and magnitude / Wanda / SparseGPT pruning (``LLMPruneConfig``).

    from efficientml import apply
    from efficientml.llm.compress import AWQConfig, CalibConfig, calibration_tokens, save_compressed
    calib = calibration_tokens(tok, CalibConfig(n_samples=128, seq_len=512))
    apply(model, AWQConfig(w_bits=4, group_size=128), calib=calib, inplace=True)  # linears → QuantLinear
    save_compressed(model, tok, "smollm2-awq-w4g128")

``inplace=True`` is what a large model wants (the default copies it first, see core/transform.py).
``pack=True`` (default) ends in real storage (packed QuantLinear / W8A8Linear modules, path "real");
``pack=False`` leaves plain nn.Linear layers holding the fake-quantized weights (path "simulated",
for search and for checking the packed path). Calibration runs one block at a time (calib.py).

Layers: the default selection is every decoder-block linear (``BLOCK_LINEARS`` in every block).
RTN quantizes whatever nn.Linear the filter selects; the calibrated methods and pruning transform
whole blocks (AWQ/SmoothQuant scale groups of linears together) and refuse another selection.
``result.report`` holds the method, config, seconds and per-block search results (quantization) or
the reached sparsity (pruning); ``result.layers`` what each linear became.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.llm.compress.awq import AWQConfig, awq_processor, awq_transform
from efficientml.llm.compress.calib import check_calib, run_blockwise
from efficientml.llm.compress.gptq import GPTQConfig, gptq_processor, gptq_transform
from efficientml.llm.compress.magnitude import LLMPruneConfig, magnitude_prune
from efficientml.llm.compress.mappings import BLOCK_LINEARS, scaling_groups
from efficientml.llm.kernels.qlinear import install_quantized
from efficientml.llm.compress.rtn import RTNConfig, quantize_weight
from efficientml.llm.compress.smoothquant import SmoothQuantConfig, smoothquant_processor
from efficientml.llm.compress.sparsegpt import sparsegpt_processor
from efficientml.llm.compress.stats import CalibStats, apply_with_stats
from efficientml.llm.compress.wanda import wanda_processor


def _check_model(model: nn.Module) -> None:
    scaling_groups(model)  # UnsupportedError for a family without a mapping
    spec = getattr(getattr(model, "model", None), "layers", None)
    if spec is None:
        raise UnsupportedError(f"{type(model).__name__} has no model.layers; expected an efficientml LlamaForCausalLM")


DEFAULT_LINEARS = tuple(f"model.layers.*.{name}" for name in BLOCK_LINEARS)  # the default selection


def _selection(model: nn.Module, filt: LayerFilter, whole_blocks: str | None) -> list[str]:
    """Full names of the selected linears; ``whole_blocks`` (a method name) refuses a partial one."""
    chosen = filt.select(model, (nn.Linear,), DEFAULT_LINEARS)
    if whole_blocks is not None and chosen != LayerFilter().select(model, (nn.Linear,), DEFAULT_LINEARS):
        raise UnsupportedError(f"{whole_blocks} transforms every decoder-block linear together; a layer filter "
                               "that selects other layers is supported by RTNConfig only")
    return chosen


def _check_groups(model: nn.Module, config: Any) -> None:
    spec = getattr(config, "spec", None)
    if spec is None:
        return
    block = model.model.layers[0]
    for name in BLOCK_LINEARS:
        spec.group_len(block.get_submodule(name).in_features, f"model.layers.0.{name}")


@register_transform(RTNConfig)
@register_transform(AWQConfig)
@register_transform(GPTQConfig)
@register_transform(SmoothQuantConfig)
@torch.no_grad()
def _quantize(model: nn.Module, config: RTNConfig | AWQConfig | GPTQConfig | SmoothQuantConfig, *,
              calib: torch.Tensor | None, filter: LayerFilter, pack: bool = True, batch_size: int = 8,
              device: str | torch.device | None = None, progress: bool | None = None,
              search_cache: dict | None = None, stats: CalibStats | None = None,
              keep_stats: bool = False) -> TransformResult:
    """Quantize the selected linears (every decoder-block linear by default). Knobs: ``pack``,
    ``batch_size`` (calibration sequences per forward), ``device`` (where each block runs),
    ``progress``, and ``search_cache`` (AWQ): a dict in which searched scales and
    clip thresholds are kept and reused by a later run with the same calibration and bits/group.

    ``keep_stats``: the report's ``"stats"`` holds the calibration statistics (:class:`CalibStats`);
    ``stats``: quantize from such statistics instead of ``calib`` — no pass over the calibration set.
    Both need fp propagation (AWQ; GPTQ with ``propagate="fp"``), where the statistics do not depend
    on the setting."""
    _check_model(model)
    chosen = _selection(model, filter, None if isinstance(config, RTNConfig) else type(config).__name__)
    _check_groups(model, config)
    model.eval()
    t0 = time.perf_counter()
    log: dict = {}
    if isinstance(config, RTNConfig):
        for full in chosen:
            w = model.get_submodule(full).weight.detach().float()
            install_quantized(model, full, quantize_weight(w, config.spec, name=full.rpartition(".")[2]), pack)
    elif stats is not None or keep_stats:
        stats = _quantize_reusable(model, config, calib, stats, pack, log, search_cache, batch_size, device, progress)
    else:
        method = type(config).kind
        tokens = check_calib(calib, method)
        if isinstance(config, AWQConfig):
            proc = awq_processor(model, config, pack, log, search_cache)
        else:
            proc = {GPTQConfig: gptq_processor,
                    SmoothQuantConfig: smoothquant_processor}[type(config)](model, config, pack, log)
        run_blockwise(model, tokens, proc, batch_size, device, desc=method, progress=progress)
    report = {"method": type(config).kind, "config": config.to_dict(), "pack": pack,
              "seconds": time.perf_counter() - t0, "blocks": log}
    if keep_stats:
        report["stats"] = stats
    what = {"bits": 8, "act_bits": 8} if isinstance(config, SmoothQuantConfig) else \
        {"bits": config.spec.bits, "group_size": config.spec.group_size}
    return TransformResult(model, config, "real" if pack else "simulated", {n: dict(what) for n in chosen}, report)


def _quantize_reusable(model: nn.Module, config: Any, calib: torch.Tensor | None, stats: CalibStats | None,
                       pack: bool, log: dict, search_cache: dict | None, batch_size: int,
                       device: str | torch.device | None, progress: bool | None) -> CalibStats:
    """AWQ / GPTQ(propagate='fp') from stored statistics, or a calibration run that keeps them."""
    reusable = isinstance(config, AWQConfig) or (isinstance(config, GPTQConfig) and config.propagate == "fp")
    if not reusable:
        raise ConfigError("calibration statistics are reusable for AWQ and for GPTQ with propagate='fp' only "
                          f"(their block inputs are the fp model's); got {type(config).__name__}"
                          + (f"(propagate={config.propagate!r})" if isinstance(config, GPTQConfig) else ""))
    if stats is not None:
        _check_stats(config, stats)
        transform = (awq_transform(model, config, pack, log, search_cache, consume=False)
                     if isinstance(config, AWQConfig) else gptq_transform(model, config, pack, consume=False))
        apply_with_stats(model, stats, transform, batch_size, device)
        return stats
    tokens = check_calib(calib, type(config).kind)
    kept: list = []
    proc = (awq_processor(model, config, pack, log, search_cache, keep=kept) if isinstance(config, AWQConfig)
            else gptq_processor(model, config, pack, log, keep=kept))
    ctx = run_blockwise(model, tokens, proc, batch_size, device, desc=type(config).kind, progress=progress)
    return CalibStats(kept, ctx, int(tokens.numel()), *_sink(config))


def _sink(config: AWQConfig | GPTQConfig) -> tuple[float, str]:
    """(sink share, sink rule) the config's Hessians are weighted with."""
    if isinstance(config, GPTQConfig):
        return config.sink_share, config.sink_rule
    return config.gptq_sink_share, config.gptq_sink_rule


def _check_stats(config: AWQConfig | GPTQConfig, stats: CalibStats) -> None:
    b = stats.blocks[0] if stats.blocks else None
    need_h = isinstance(config, GPTQConfig) or config.use_gptq
    if b is None or (need_h and not b.hessian):
        raise ConfigError(f"{type(config).__name__} needs Hessians in the calibration statistics; "
                          "collect them with a GPTQ (propagate='fp') or AWQ use_gptq=True run")
    if need_h and (stats.sink_share, stats.sink_rule) != _sink(config):
        raise ConfigError(f"the statistics' Hessians were collected with sink_share {stats.sink_share} "
                          f"(rule {stats.sink_rule!r}); {type(config).__name__} asks for {_sink(config)[0]} "
                          f"(rule {_sink(config)[1]!r}); collect them again")
    if isinstance(config, AWQConfig) and (not b.x_mean or not b.samples):
        raise ConfigError("AWQConfig needs mean |x| and search samples in the calibration statistics; "
                          "collect them with an AWQ run (keep_stats=True)")
    if isinstance(config, AWQConfig) and next(iter(b.samples.values())).shape[0] < config.search_samples:
        raise ConfigError(f"AWQConfig(search_samples={config.search_samples}) needs that many sample sequences; "
                          f"the statistics hold {next(iter(b.samples.values())).shape[0]}")


@register_transform(LLMPruneConfig)
@torch.no_grad()
def _prune(model: nn.Module, config: LLMPruneConfig, *, calib: torch.Tensor | None, filter: LayerFilter,
           batch_size: int = 8, device: str | torch.device | None = None,
           progress: bool | None = None) -> TransformResult:
    """Prune every decoder-block linear (zeros in the dense weights: path "simulated")."""
    _check_model(model)
    chosen = _selection(model, filter, f"LLMPruneConfig(method={config.method!r})")
    model.eval()
    t0 = time.perf_counter()
    if config.n_m is not None:
        for name in BLOCK_LINEARS:
            n = model.model.layers[0].get_submodule(name).in_features
            if n % config.n_m[1]:
                raise ConfigError(f"N:M sparsity with M={config.n_m[1]} needs {name}'s input dimension ({n}) to be a multiple of M")
    if config.method == "magnitude":
        magnitude_prune(model, config)
    else:
        tokens = check_calib(calib, config.method)
        proc = {"wanda": wanda_processor, "sparsegpt": sparsegpt_processor}[config.method](model, config)
        run_blockwise(model, tokens, proc, batch_size, device, desc=config.method, progress=progress)
    report = {"method": config.method, "config": config.to_dict(), "seconds": time.perf_counter() - t0,
              "sparsity": sparsity_of(model)}
    layers = {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in chosen}
    return TransformResult(model, config, "simulated", layers, report)


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros over all decoder-block linear weights."""
    zeros = total = 0
    for block in model.model.layers:
        for name in BLOCK_LINEARS:
            w = block.get_submodule(name).weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)
