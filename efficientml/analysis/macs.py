"""Multiply-accumulate counts, per layer and in total.

A MAC is one multiply plus one add, the unit papers quote ("ResNet-18: 1.82 GMACs"). Only operations
that contract weights or activations against each other count as MACs:

- ``conv{1,2,3}d``: ``out.numel() · (C_in / groups) · ∏kernel`` (grouped and depthwise included; the
  weight's shape ``(C_out, C_in/groups, *k)`` already holds the per-group fan-in);
- ``conv_transpose{1,2,3}d``: ``in.numel() · (C_out / groups) · ∏kernel``;
- ``linear``: ``out.numel() · in_features``;
- matmuls (``matmul``/``@``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``mv``, ``dot``, ``einsum``):
  ``out.numel() · K`` for the contracted size K; with a sparse (CSR/COO) 2-D operand, as in
  ``torch.sparse.mm``, only stored nonzeros count: ``nnz · N`` for the other operand's N columns;
- ``scaled_dot_product_attention``: ``B·L·S·E`` for QKᵀ plus ``B·L·S·E_v`` for AV;
- ``multi_head_attention_forward`` (``nn.MultiheadAttention``): the q/k/v and output projections plus
  QKᵀ and AV;
- ``lstm``/``gru``/``rnn_*`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): every timestep of every layer and
  direction multiplies its input and hidden state by its weight matrices, so
  ``timesteps · batch · Σ weight-matrix sizes`` (gate nonlinearities not counted).

Biases are not counted. Elementwise operations (add, mul, activations, normalizations, softmax) are
counted separately as one op per output element, and pooling and reductions (max/avg pools, adaptive
pools, ``mean``/``sum`` over dimensions) as one op per window element visited; neither is part of the
MAC total. Counting happens in :mod:`efficientml.analysis.trace`, which intercepts every torch function
the model calls, so functional matmuls inside attention are counted as well as ``nn.Conv2d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

# the formulas are public here (efficientml.analysis.macs.conv_macs …); they live in costs.py, which
# the tracer also imports, so that macs → trace → costs has no cycle
from efficientml.analysis.costs import (ZERO, OpCost, attention_macs, conv_macs,  # noqa: F401
                                        conv_transpose_macs, einsum_macs, linear_macs, matmul_macs,
                                        mha_macs, op_cost, op_name, pool_ops)
from efficientml.analysis.trace import trace_model


# --- public entry point ------------------------------------------------------------------------


@dataclass
class MacReport:
    """MACs, elementwise and pooling ops per executed layer (leaf module or functional op)."""

    layers: list[tuple[str, str, OpCost]]  # (name, kind, cost) in execution order

    @property
    def total(self) -> OpCost:
        tot = ZERO
        for _, _, c in self.layers:
            tot = tot + c
        return tot

    @property
    def macs(self) -> int:
        return self.total.macs

    def by_layer(self) -> dict[str, int]:
        return {name: c.macs for name, _, c in self.layers}

    def to_dict(self) -> dict[str, Any]:
        tot = self.total
        return {"macs": tot.macs, "elementwise_ops": tot.elementwise, "pool_ops": tot.pool,
                "layers": [{"name": n, "kind": k, **c.to_dict()} for n, k, c in self.layers]}


def count_macs(model: nn.Module, input_shape: Any = None, *, inputs: Any = None) -> MacReport:
    """Run ``model`` once on ``inputs`` (or random data of ``input_shape``) and count its ops.

    >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), (1, 3, 32, 32)).macs   # 32·32·8 · 3·3·3
    221184
    """
    tr = trace_model(model, input_shape, inputs=inputs)
    return MacReport([(s.name, s.kind, s.cost) for s in tr.steps])
