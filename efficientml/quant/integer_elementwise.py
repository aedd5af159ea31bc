"""Integer steps for the elementwise and joining ops of modern CNNs: unary activations as lookup
tables (hard-swish, hard-sigmoid, SiLU, sigmoid, tanh, GELU, leaky ReLU, and ``x + c``-style
arithmetic with a constant), the elementwise product of squeeze-excite, concatenation, and the
shape arithmetic (``x.shape``, ``c // g``) that channel shuffles compute in forward.

- :class:`LutStep`: a unary f on uint8 codes has only 256 possible inputs, so the step is a table
  T[q] = clamp(round(f(S_in·(q − Z_in)) / S_out) + Z_out) built at conversion from the input and
  (calibrated) output qparams; at run time one gather, no float (TFLite's int8 sigmoid/hard-swish).
- :class:`MulStep`: (q_a − Z_a)(q_b − Z_b) in int64 (|·| < 2^16), requantized by the fixed-point
  multiplier of S_a·S_b / S_out, broadcasting as the float op does ([N,C,H,W] × [N,C,1,1]).
- :class:`CatStep`: each input requantized to the shared output grid (multiplier S_i / S_out; an
  input already on it is copied), then joined along ``dim``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from efficientml.quant.integer_ops import IntegerConfig, QParams, Step, fixed_point, rounding_shift

CODES = 256          # uint8 activation codes: the table covers every code the fast kernels can emit


def _requant(q: torch.Tensor, qp_in: QParams, qp_out: QParams, m0: torch.Tensor, shift: torch.Tensor
             ) -> torch.Tensor:
    out = rounding_shift(q.to(torch.int64) - qp_in.zero_point, m0, shift) + qp_out.zero_point
    return torch.clamp(out, qp_out.qmin, qp_out.qmax).to(torch.int32)


def _qtensor(codes: torch.Tensor, qp: QParams) -> torch.Tensor:
    return torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), qp.scale, qp.zero_point)


class LutStep(Step):
    """A unary elementwise op as a table over the input codes. ``op`` names it for the ONNX export
    (sigmoid, hardsigmoid, hardswish, silu, tanh, gelu, leaky_relu, or add/sub/mul/div with
    ``params["value"]`` and ``params["reverse"]`` for ``c − x`` and ``c / x``)."""

    kind = "lut"

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], op: str,
                 params: dict[str, Any] | None = None):
        super().__init__(name)
        self.fn, self.op, self.params = fn, op, dict(params or {})

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def finalize(self, cfg: IntegerConfig) -> None:
        codes = torch.arange(CODES)
        with torch.no_grad():                 # float64: the table is the exactly rounded f per code
            y = self.fn(self.in_qp[0].dequantize(codes).double())
        t = torch.round(y / self.out_qp.scale) + self.out_qp.zero_point
        self.table = torch.clamp(torch.nan_to_num(t), self.out_qp.qmin, self.out_qp.qmax).to(torch.int32)
        self._table_u8 = self.table.to(torch.uint8)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        return self.table[q.long()]

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        return _qtensor(self._table_u8[q.int_repr().long()], self.out_qp)


class MulStep(Step):
    """Elementwise product of two quantized tensors (broadcasting), requantized to its output grid."""

    kind = "mul"

    def float(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def finalize(self, cfg: IntegerConfig) -> None:
        qa, qb = self.in_qp
        self.m0, self.shift = fixed_point(qa.scale * qb.scale / self.out_qp.scale)

    def integer(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        za, zb, out = self.in_qp[0].zero_point, self.in_qp[1].zero_point, self.out_qp
        prod = (qa.to(torch.int64) - za) * (qb.to(torch.int64) - zb)        # |prod| ≤ 255²
        y = rounding_shift(prod, self.m0, self.shift) + out.zero_point
        return torch.clamp(y, out.qmin, out.qmax).to(torch.int32)

    def emulate(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        return self.out_qp.quantize(self.in_qp[0].dequantize(qa) * self.in_qp[1].dequantize(qb))

    def fast(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.mul(a, b, self.out_qp.scale, self.out_qp.zero_point)


class CatStep(Step):
    """``torch.cat(xs, dim)``: every input requantized to the one output grid, then joined."""

    kind = "cat"

    def __init__(self, name: str, dim: int):
        super().__init__(name)
        self.dim = dim

    def float(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(xs), self.dim)

    def finalize(self, cfg: IntegerConfig) -> None:
        self.mults = [fixed_point(qp.scale / self.out_qp.scale) for qp in self.in_qp]
        self.same = [qp == self.out_qp for qp in self.in_qp]     # already on the output grid: a copy

    def integer(self, qs: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [q.to(torch.int32) if same else _requant(q, qp, self.out_qp, *m)
                 for q, qp, m, same in zip(qs, self.in_qp, self.mults, self.same)]
        return torch.cat(parts, self.dim)

    def emulate(self, qs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.out_qp.quantize(torch.cat([qp.dequantize(q) for q, qp in zip(qs, self.in_qp)], self.dim))

    def fast(self, qs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.ops.quantized.cat(list(qs), self.dim, self.out_qp.scale, self.out_qp.zero_point)


class ShapeStep(Step):
    """Shape arithmetic in forward (``x.shape``, ``x.size(1)``, ``c // groups``): plain Python values,
    the same in every mode; no qparams of its own and nothing in the exported graph."""

    observe = False
    kind = "shape"

    def __init__(self, name: str, fn: Callable[..., Any]):
        super().__init__(name)
        self.fn = fn

    def float(self, *args: Any, **kw: Any) -> Any:
        return self.fn(*args, **kw)

    integer = fast = float
