"""The model zoo registry: ``build_model("vgg", width=0.5, in_channels=1)``."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from efficientml.core.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name; keyword arguments go to its builder (num_classes, in_channels, …)."""
    from efficientml.core.errors import ConfigError

    builder = MODELS.get(name)
    try:
        return builder(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r} does not accept these arguments: {e}") from None


def list_models() -> list[str]:
    return MODELS.names()
