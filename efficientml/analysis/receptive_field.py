"""Receptive field and feature-map size of every conv and pool layer, in execution order.

Feature-map size per spatial axis: ``out = ⌊(in + 2p − d(k−1) − 1) / s⌋ + 1``.

Receptive field (in input pixels) and jump (input pixels between neighbouring outputs), per axis,
start at ``r = 1, j = 1`` for the model input and go through each window layer as
``r ← r + d(k−1)·j`` and ``j ← j·s``. On a sequential stack this is the textbook recursion; in a model
with branches each tensor carries its own ``(r, j)`` and an op that merges tensors (``add``, ``cat``)
takes the largest, so a residual block's 1×1 shortcut does not inflate the main path. Adaptive pools
are treated as windows of ``⌈in/out⌉`` with step ``⌊in/out⌋``; transposed convs are not handled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch.nn as nn

from efficientml.analysis.trace import Trace, trace_model
from efficientml.core.errors import ConfigError


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                     dilation: int = 1) -> int:
    """``⌊(size + 2·padding − dilation·(kernel−1) − 1) / stride⌋ + 1``; raises when it is < 1.

    >>> conv_output_size(224, 7, stride=2, padding=3)
    112
    """
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ConfigError(f"a {kernel}x{kernel} window (stride {stride}, padding {padding}, "
                          f"dilation {dilation}) does not fit a feature map of size {size}")
    return out


def receptive_field(layers: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """``(receptive field, jump)`` after each layer of a sequential 1-axis stack.

    Each layer is ``(kernel, stride)`` or ``(kernel, stride, dilation)``.

    >>> receptive_field([(3, 1), (3, 1), (3, 1)])   # three 3×3 convs see 7×7
    [(3, 1), (5, 1), (7, 1)]
    """
    r, j, out = 1, 1, []
    for layer in layers:
        k, s = layer[0], layer[1]
        d = layer[2] if len(layer) > 2 else 1
        r, j = r + d * (k - 1) * j, j * s
        out.append((r, j))
    return out


@dataclass(frozen=True)
class WindowLayer:
    """One executed conv/pool with its geometry, feature-map sizes and receptive field."""

    name: str
    op: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]
    receptive_field: tuple[int, ...]
    jump: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def receptive_fields_from_trace(trace: Trace) -> list[WindowLayer]:
    """Propagate ``(r, j)`` through the trace and list every window layer in execution order."""
    state: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # tensor id → (r, j)
    rows: list[WindowLayer] = []
    for step in trace.steps:
        known = [state[t.id] for t in step.inputs if t.id in state]
        if step.windows:
            first = step.inputs[0].id if step.inputs else None
            nd = len(step.windows[0].kernel)
            r, j = state.get(first, ((1,) * nd, (1,) * nd)) if first is not None \
                else ((1,) * nd, (1,) * nd)
            if len(r) != nd:
                r, j = (1,) * nd, (1,) * nd
            for w in step.windows:
                r = tuple(ri + di * (ki - 1) * ji for ri, di, ki, ji in zip(r, w.dilation, w.kernel, j))
                j = tuple(ji * si for ji, si in zip(j, w.stride))
                rows.append(WindowLayer(step.name, w.op, w.kernel, w.stride, w.padding, w.dilation,
                                        w.in_size, w.out_size, r, j))
            res = (r, j)
        elif known:
            nd = max(len(k[0]) for k in known)
            same = [k for k in known if len(k[0]) == nd]
            res = (tuple(max(k[0][a] for k in same) for a in range(nd)),
                   tuple(max(k[1][a] for k in same) for a in range(nd)))
        else:
            continue
        for t in step.outputs:
            state[t.id] = res
    return rows


def receptive_fields(model: nn.Module, input_shape: Any = None, *,
                     inputs: Any = None) -> list[WindowLayer]:
    """Trace ``model`` once and return its conv/pool layers with sizes and receptive fields."""
    return receptive_fields_from_trace(trace_model(model, input_shape, inputs=inputs))
