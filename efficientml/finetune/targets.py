"""Which layers a PEFT method touches, shared by the methods that are not LoRA (BitFit, bottleneck
adapters, IA3): leaf names as PEFT spells them ("k_proj", "mlp.down_proj") or globs over dotted names,
narrowed by ``apply``'s ``filter`` exactly as :mod:`efficientml.finetune.inject` does for LoRA."""

from __future__ import annotations

import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.core.transform import LayerFilter
from efficientml.finetune.inject import _matches


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def select_linears(model: nn.Module, patterns: tuple[str, ...], filter: LayerFilter, method: str) -> list[str]:
    """Dotted names of the ``nn.Linear`` layers matching ``patterns`` (ConfigError for a pattern that
    matches none); a filter with an explicit ``include`` names the layers itself."""
    candidates = filter.select(model, (nn.Linear,))
    if filter.explicit:
        return candidates
    for p in patterns:
        if not any(_matches(n, p) for n in candidates):
            sample = ", ".join(n for n, m in list(model.named_modules()) if isinstance(m, nn.Linear))[:160]
            raise ConfigError(f"{method} target module {p!r} matches no linear layer of the model; expected a "
                              f"layer name such as k_proj or a glob over dotted names like {sample} …")
    return [n for n in candidates if any(_matches(n, p) for p in patterns)]


def check_fresh(model: nn.Module, cls: type, method: str) -> None:
    if any(isinstance(m, cls) for m in model.modules()):
        raise ConfigError(f"the model already has {method} modules; apply {method} to a fresh base model")


def drop_packed(model: nn.Module, cls: type) -> None:
    """A fused q/k/v or gate/up buffer cannot stand for wrapped layers: drop it (the layers run alone)."""
    for m in model.modules():
        if getattr(m, "packed", None) is not None and any(isinstance(getattr(m, f, None), cls)
                                                          for f in getattr(m, "fusable", ())):
            m.packed = None
