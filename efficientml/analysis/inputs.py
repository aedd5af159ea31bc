"""Example inputs for a one-off forward pass: from given tensors or random data of a shape.

Shared by the tracer, the profiler and output comparisons; :func:`expected_input` words the input
layout a model implies, for error messages.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def make_inputs(model: nn.Module, input_shape: Any = None,
                inputs: Any = None) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword inputs from example ``inputs`` or random data of ``input_shape``.

    ``input_shape`` is one shape ``(1, 3, 32, 32)`` or a list of shapes for several inputs;
    ``inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    """
    if inputs is not None:
        if isinstance(inputs, torch.Tensor):
            return (inputs,), {}
        if isinstance(inputs, dict):
            return (), dict(inputs)
        if isinstance(inputs, (tuple, list)):
            return tuple(inputs), {}
        raise ConfigError(f"inputs must be a tensor, a tuple of tensors or a dict, "
                          f"got {type(inputs).__name__}")
    if input_shape is None:
        raise ConfigError("give either input_shape (e.g. (1, 3, 32, 32)) or example inputs")
    shapes = list(input_shape) if _is_shape_list(input_shape) else [input_shape]
    device = model_device(model)
    out = []
    for shp in shapes:
        shp = tuple(int(d) for d in shp)
        if not shp or any(d <= 0 for d in shp):
            raise ShapeError(f"input shape {shp} must be a non-empty list of positive sizes, "
                             f"e.g. (1, 3, 32, 32)")
        out.append(torch.randn(shp, device=device))
    return tuple(out), {}


def _is_shape_list(s: Any) -> bool:
    return isinstance(s, (list, tuple)) and len(s) > 0 and all(
        isinstance(x, (list, tuple, torch.Size)) for x in s)


def expected_input(model: nn.Module) -> str | None:
    """The input layout the model's first weighted layer implies, e.g. ``(N, 3, H, W)``."""
    declared = getattr(model, "input_shape", None)
    if declared is not None:
        return str(tuple(declared))
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[m.weight.dim() - 2]
            return f"(N, {m.in_channels}, {spatial}) because its first layer {name or 'model'!r} " \
                   f"is a {type(m).__name__} with {m.in_channels} input channels"
        if isinstance(m, nn.Linear):
            return f"(…, {m.in_features}) because its first layer {name or 'model'!r} is a Linear " \
                   f"with {m.in_features} input features"
        if isinstance(m, nn.Embedding):
            return "(N, T) integer token ids because its first layer is an Embedding"
    return None
