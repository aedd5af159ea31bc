"""Activation sizes and the peak activation memory of a model's sequential schedule.

Definition (the quantity MCUNet minimizes). The model runs its executed steps one after another
(:mod:`efficientml.analysis.trace`: each leaf-module call or functional op outside a leaf is one step).
Memory is counted per *storage buffer*, so a view (``flatten``, ``view``) or an in-place result
(``ReLU(inplace=True)``, ``out += identity``) occupies no new memory. A buffer is **live** at step
``i`` when it was produced at or before ``i`` (model inputs: before step 0) and is read at or after
``i`` (model outputs: until the last step; a buffer nobody reads is live only at the step that
writes it). The memory at step ``i`` is the sum of the sizes of the buffers live at ``i`` — the
inputs and outputs of the running op plus every tensor held for later (a residual's identity, a
U-Net's skip). The **peak** is the maximum over steps.

Sizes are counted in elements, then converted at a bit width (32 for fp32, 8 for int8) assuming every
activation is stored at that width. Parameters and buffers are not activations and are excluded;
temporaries inside one leaf module (e.g. inside ``nn.MultiheadAttention``) are not seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from efficientml.analysis.trace import Trace, trace_model


@dataclass
class ActivationMemory:
    """Live activation elements at each step and the peak, convertible to bytes at any width."""

    steps: list[str]                 # step names in execution order
    live_elements: list[int]         # elements live during each step
    new_elements: list[int]          # elements of the new buffers each step writes
    peak_elements: int
    peak_step: str

    def peak_bytes(self, bits: int = 32) -> float:
        return self.peak_elements * bits / 8

    def to_dict(self) -> dict[str, Any]:
        return {"peak_elements": self.peak_elements, "peak_step": self.peak_step,
                "peak_bytes_fp32": self.peak_bytes(32), "peak_bytes_int8": self.peak_bytes(8),
                "live_elements": dict(zip(self.steps, self.live_elements))}


def activation_memory_from_trace(trace: Trace) -> ActivationMemory:
    """Liveness of every activation buffer over the executed steps (see the module docstring)."""
    n = len(trace.steps)
    size: dict[int, int] = {}
    born: dict[int, int] = {}
    last: dict[int, int] = {}
    for r in trace.inputs:
        size[r.storage] = max(size.get(r.storage, 0), r.storage_elements)
        born.setdefault(r.storage, 0)
        last.setdefault(r.storage, 0)
    new_bufs = []
    for i, step in enumerate(trace.steps):
        for r in step.inputs:  # a buffer read here stays live at least until here
            size[r.storage] = max(size.get(r.storage, 0), r.storage_elements)
            born.setdefault(r.storage, i)  # a tensor the trace did not see made (a constant)
            last[r.storage] = max(last.get(r.storage, i), i)
        fresh = 0
        for r in step.outputs:
            if r.storage not in born:
                born[r.storage] = i
                fresh += r.storage_elements
            size[r.storage] = max(size.get(r.storage, 0), r.storage_elements)
            last[r.storage] = max(last.get(r.storage, i), i)
        new_bufs.append(fresh)
    for r in trace.outputs:
        if r.storage in born:
            last[r.storage] = max(n - 1, 0)
    live = [0] * n
    for buf, b in born.items():
        for i in range(b, last[buf] + 1):
            if i < n:
                live[i] += size[buf]
    if n == 0:  # a model with no ops holds its inputs
        total = sum(size.values())
        return ActivationMemory([], [], [], total, "")
    peak_i = max(range(n), key=lambda i: live[i])
    return ActivationMemory([s.name for s in trace.steps], live, new_bufs, live[peak_i],
                            trace.steps[peak_i].name)


def activation_memory(model: nn.Module, input_shape: Any = None, *,
                      inputs: Any = None) -> ActivationMemory:
    """Trace ``model`` once and return its activation liveness (see the module docstring)."""
    return activation_memory_from_trace(trace_model(model, input_shape, inputs=inputs))


def peak_activation_memory(model: nn.Module, input_shape: Any = None, *, inputs: Any = None,
                           bits: int = 32) -> float:
    """Peak activation memory in bytes at ``bits`` per element (32: fp32, 8: int8).

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1))
    >>> peak_activation_memory(net, (1, 3, 4, 4), bits=8)   # conv1's 8·16 in + conv2's 4·16 out
    192.0
    """
    return activation_memory(model, input_shape, inputs=inputs).peak_bytes(bits)
