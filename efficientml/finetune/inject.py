"""Putting adapters into a model and taking them out: target selection, the LoRA transform handler,
merge / unmerge / merge_and_unload, the adapter's own tensors, and trainable-parameter accounting.

Target selection: ``apply``'s ``filter`` (a :class:`~efficientml.core.transform.LayerFilter`) names
the layers when it has an ``include``; otherwise the config's ``target_modules`` pick among the
filter's candidates (every ``nn.Linear`` of the allowed types), as PEFT does: a plain name matches the
last part(s) of a dotted name ("q_proj", "mlp.down_proj"), a glob matches the whole name.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.core.modules import get_module, set_module
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.lora import LoRAConfig, LoRALinear, base_weight

ADAPTER_KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def _matches(name: str, pattern: str) -> bool:
    if set("*?[") & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def select_targets(model: nn.Module, config: LoRAConfig, filter: LayerFilter) -> list[str]:
    """Dotted names of the linears that get an adapter (ConfigError for a pattern that matches none)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model already has LoRA adapters; merge_and_unload() it first or load the "
                          "adapter into a fresh base model")
    if filter.explicit:
        return filter.select(model, (nn.Linear,))
    candidates = filter.select(model, (nn.Linear,))
    for p in config.target_modules:
        if not any(_matches(n, p) for n in candidates):
            sample = ", ".join(_linears(model)[:6])
            raise ConfigError(f"LoRA target module {p!r} matches no linear layer of the model; expected a "
                              f"layer name such as q_proj or a glob over dotted names like {sample} …")
    return [n for n in candidates if any(_matches(n, p) for p in config.target_modules)]


def inject(model: nn.Module, config: LoRAConfig, filter: LayerFilter,
           make_base: Callable[[nn.Linear], nn.Module] = lambda lin: lin) -> TransformResult:
    """Freeze ``model``, replace each selected linear by a :class:`LoRALinear` over ``make_base(linear)``."""
    names = select_targets(model, config, filter)
    for n in names:
        lin = get_module(model, n)
        if config.rank > min(lin.in_features, lin.out_features):
            raise ConfigError(f"LoRA rank {config.rank} is larger than layer {n!r} allows: its weight is "
                              f"{lin.out_features}×{lin.in_features}, so the rank must be ≤ "
                              f"{min(lin.in_features, lin.out_features)}")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(config.seed)
    layers = {}
    for n in names:
        lin = get_module(model, n)
        wrapped = LoRALinear(make_base(lin), config.rank, config.scaling, config.dropout, config.dora,
                             config.init, g)
        set_module(model, n, wrapped)
        layers[n] = {"in": lin.in_features, "out": lin.out_features, "rank": config.rank,
                     "base": type(wrapped.base_layer).__name__}
    for m in model.modules():  # a fused q/k/v or gate/up buffer cannot stand for adapted layers: drop it
        if getattr(m, "packed", None) is not None and any(isinstance(getattr(m, f, None), LoRALinear)
                                                          for f in getattr(m, "fusable", ())):
            m.packed = None
    return TransformResult(model, config, "real", layers, {"trainable": trainable_parameters(model)})


@register_transform(LoRAConfig)
def apply_lora(model: nn.Module, config: LoRAConfig, *, calib=None, filter: LayerFilter) -> TransformResult:
    """LoRA / DoRA adapters on a float base (calib is not used)."""
    return inject(model, config, filter)


def adapters(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts (tied weights once; a packed base counts its weights)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for _, m in adapters(model):
        if not isinstance(m.base_layer, nn.Linear):  # packed weights are buffers, not parameters
            total += m.in_features * m.out_features
    return {"trainable": trainable, "total": total, "fraction": trainable / max(1, total)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its float base weight (forward then costs the base alone)."""
    for _, m in adapters(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, m in adapters(model):
        m.unmerge()
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain ``nn.Linear`` holding the merged weight (a packed base is
    dequantized to float first)."""
    for n, m in adapters(model):
        if isinstance(m.base_layer, nn.Linear):
            m.merge()
            set_module(model, n, m.base_layer)
            continue
        w = base_weight(m.base_layer).float()
        bias = getattr(m.base_layer, "bias", None)
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device)
        lin.weight.requires_grad_(False)
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.requires_grad_(False)
            lin.bias.copy_(bias)
        m.base_layer = lin
        m.merge()
        set_module(model, n, lin)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only, by our module names (``model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith(ADAPTER_KEYS)}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy adapter tensors into the model's adapters; every adapter tensor must be given, and fit."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{where} does not fit the model's adapters: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]} (was it made for another base model or other target modules?)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ConfigError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, the model's adapter "
                                  f"expects {tuple(own[k].shape)} (another rank or base model?)")
            params[k].copy_(v.to(params[k].dtype))
