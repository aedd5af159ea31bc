"""``profile(model, input_shape)``: every cost of a model from one traced forward pass.

    p = profile(build_model("resnet20"), (1, 3, 32, 32), latency=True)
    p.params, p.macs, p.peak_activation_bytes(8)
    p.print(); p.to_dict(); p.to_markdown()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from efficientml.analysis.latency import LatencyResult, measure_latency
from efficientml.analysis.memory import activation_memory_from_trace
from efficientml.analysis.params import count_parameters, model_size_bytes
from efficientml.analysis.receptive_field import WindowLayer, receptive_fields_from_trace
from efficientml.analysis.report import (format_bytes, format_count, format_shape, markdown_table,
                                         rich_table)
from efficientml.analysis.inputs import make_inputs
from efficientml.analysis.trace import trace_model


@dataclass
class LayerStats:
    """One executed step: a leaf module call or a functional op outside any leaf."""

    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    params: int
    macs: int
    elementwise_ops: int
    pool_ops: int
    output_elements: int     # activation size: elements of the tensors this step returns
    live_elements: int       # activation elements live while this step runs
    input_elements: int = 0  # elements of the activations this step reads

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind,
                "output_shape": list(self.output_shape) if self.output_shape else None,
                "params": self.params, "macs": self.macs, "elementwise_ops": self.elementwise_ops,
                "pool_ops": self.pool_ops, "output_elements": self.output_elements,
                "live_elements": self.live_elements, "input_elements": self.input_elements}


@dataclass
class ModelProfile:
    """Parameters, size, MACs, activation memory, receptive fields and (optionally) latency."""

    name: str
    input_shapes: list[tuple[int, ...]]
    params: int
    nonzero_params: int
    size_bytes: dict[str, float]         # "fp32", "int8" (+ "<bits>_<format>" when sparse)
    macs: int
    elementwise_ops: int
    pool_ops: int
    peak_activation_elements: int
    peak_activation_step: str
    layers: list[LayerStats] = field(default_factory=list)
    windows: list[WindowLayer] = field(default_factory=list)
    latency: LatencyResult | None = None

    def peak_activation_bytes(self, bits: int = 32) -> float:
        return self.peak_activation_elements * bits / 8

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.name, "input_shapes": [list(s) for s in self.input_shapes],
            "params": self.params, "nonzero_params": self.nonzero_params,
            "size_bytes": dict(self.size_bytes), "macs": self.macs,
            "elementwise_ops": self.elementwise_ops, "pool_ops": self.pool_ops,
            "peak_activation": {"elements": self.peak_activation_elements,
                                "fp32_bytes": self.peak_activation_bytes(32),
                                "int8_bytes": self.peak_activation_bytes(8),
                                "at": self.peak_activation_step}}
        d["latency"] = self.latency.to_dict() if self.latency is not None else None
        return d

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d["layers"] = [l.to_dict() for l in self.layers]
        d["receptive_fields"] = [w.to_dict() for w in self.windows]
        return d

    # --- tables ----------------------------------------------------------------------------

    def _summary_rows(self) -> list[tuple[str, str]]:
        rows = [("input", ", ".join(format_shape(s) for s in self.input_shapes)),
                ("parameters", f"{format_count(self.params)} ({self.params:,})"),
                ("nonzero parameters", f"{format_count(self.nonzero_params)}")]
        rows += [(f"size ({k})", format_bytes(v)) for k, v in self.size_bytes.items()]
        rows += [("MACs", f"{format_count(self.macs)} ({self.macs:,})"),
                 ("elementwise ops", format_count(self.elementwise_ops)),
                 ("pool/reduce ops", format_count(self.pool_ops)),
                 ("peak activation (fp32)", format_bytes(self.peak_activation_bytes(32))),
                 ("peak activation (int8)", format_bytes(self.peak_activation_bytes(8))),
                 ("peak at", self.peak_activation_step)]
        if self.latency is not None:
            rows.append(("latency", str(self.latency)))
        return rows

    _LAYER_HEADERS = ("layer", "kind", "output", "params", "MACs", "elementwise", "pool",
                      "live (int8)")
    _LAYER_RIGHT = (False, False, False, True, True, True, True, True)

    def _layer_rows(self) -> list[tuple]:
        return [(l.name, l.kind, format_shape(l.output_shape), format_count(l.params),
                 format_count(l.macs), format_count(l.elementwise_ops), format_count(l.pool_ops),
                 format_bytes(l.live_elements)) for l in self.layers]

    _RF_HEADERS = ("layer", "op", "kernel", "stride", "in", "out", "receptive field")

    def _rf_rows(self) -> list[tuple]:
        return [(w.name, w.op, format_shape(w.kernel), format_shape(w.stride),
                 format_shape(w.in_size), format_shape(w.out_size),
                 format_shape(w.receptive_field)) for w in self.windows]

    def to_markdown(self, layers: bool = True) -> str:
        parts = [f"## {self.name}", "", markdown_table(("metric", "value"), self._summary_rows())]
        if layers:
            parts += ["", "### Layers", "",
                      markdown_table(self._LAYER_HEADERS, self._layer_rows(), self._LAYER_RIGHT)]
            if self.windows:
                parts += ["", "### Receptive field", "",
                          markdown_table(self._RF_HEADERS, self._rf_rows())]
        return "\n".join(parts) + "\n"

    def print(self, console: Any = None, layers: bool = True) -> None:
        """Print rich tables (to ``console``, default a new ``rich.console.Console``)."""
        if console is None:
            from rich.console import Console

            console = Console()
        if layers:
            console.print(rich_table(f"{self.name}: layers", self._LAYER_HEADERS,
                                     self._layer_rows(), self._LAYER_RIGHT))
            if self.windows:
                console.print(rich_table(f"{self.name}: receptive field", self._RF_HEADERS,
                                         self._rf_rows()))
        console.print(rich_table(self.name, ("metric", "value"), self._summary_rows()))


def profile(model: nn.Module, input_shape: Any = None, *, inputs: Any = None,
            name: str | None = None, latency: bool = False, warmup: int = 10, runs: int = 50,
            threads: int | None = None, sparse_format: str = "dense",
            index_bits: int | None = None) -> ModelProfile:
    """Profile ``model`` on ``inputs`` or random data of ``input_shape`` (e.g. ``(1, 3, 32, 32)``).

    One traced forward pass (eval mode, no grad) gives MACs, shapes, activation memory and receptive
    fields; latency is measured only when ``latency=True``. A forward pass that fails on the given
    shape raises :class:`~efficientml.core.errors.ShapeError` naming it.
    ``sparse_format`` (``"csr"``, ``"bitmask"``, ``"relative"``) adds sparse sizes at fp32 and int8.
    """
    args, kwargs = make_inputs(model, input_shape, inputs)
    trace = trace_model(model, inputs=kwargs if kwargs else args)
    mem = activation_memory_from_trace(trace)
    tot = trace.total
    layers = [LayerStats(s.name, s.kind, s.output_shape, s.params, s.cost.macs, s.cost.elementwise,
                         s.cost.pool, sum(math.prod(r.shape) for r in s.outputs),
                         mem.live_elements[i], sum(math.prod(r.shape) for r in s.inputs))
              for i, s in enumerate(trace.steps)]
    sizes = {"fp32": model_size_bytes(model, 32), "int8": model_size_bytes(model, 8)}
    if sparse_format != "dense":
        for bits, tag in ((32, "fp32"), (8, "int8")):
            sizes[f"{tag}_{sparse_format}"] = model_size_bytes(
                model, bits, sparse_format=sparse_format, index_bits=index_bits)
    lat = measure_latency(model, kwargs if kwargs else args, warmup=warmup, runs=runs,
                          threads=threads) if latency else None
    return ModelProfile(
        name=name or type(model).__name__, input_shapes=[r.shape for r in trace.inputs],
        params=count_parameters(model), nonzero_params=count_parameters(model, nonzero_only=True),
        size_bytes=sizes, macs=tot.macs, elementwise_ops=tot.elementwise, pool_ops=tot.pool,
        peak_activation_elements=mem.peak_elements, peak_activation_step=mem.peak_step,
        layers=layers, windows=receptive_fields_from_trace(trace), latency=lat)
