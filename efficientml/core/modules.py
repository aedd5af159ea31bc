"""Module surgery by dotted name: get, set and swap submodules, list layers of given types."""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

from efficientml.core.errors import ConfigError


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted path ``name`` ("" is the model itself)."""
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        layers = [n for n, _ in model.named_modules() if n]
        preview = ", ".join(layers[:12]) + (" …" if len(layers) > 12 else "")
        raise ConfigError(f"model has no layer named {name!r}; its layers are: {preview}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``name`` with ``new``; returns the old module."""
    if name == "":
        raise ConfigError("cannot replace the root module in place; assign the new model instead")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = get_module(model, name)
    setattr(parent, child, new)
    return old


def named_layers(model: nn.Module, types: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) for every submodule that is an instance of ``types``."""
    for n, m in model.named_modules():
        if isinstance(m, types):
            yield n, m
