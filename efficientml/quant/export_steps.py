"""ONNX QDQ export of the elementwise, joining and data-movement steps of an integer program (the
convolutions, sums and pools are in :mod:`efficientml.quant.export`).

- a table activation (:class:`~efficientml.quant.integer_elementwise.LutStep`) is written as
  DequantizeLinear → its float op (Sigmoid, HardSwish, x·Sigmoid(x) for SiLU, GELU from Erf …) →
  QuantizeLinear: ORT runs it as QLinearSigmoid / QLinearLeakyRelu where it has one, else in float
  between the integer kernels;
- a product and a concatenation as DQ → Mul / Concat → Q (ORT: QLinearMul, QLinearConcat);
- movements (reshape, view, flatten, transpose, permute, chunk/split, slicing) run on the uint8
  codes themselves: Reshape, Transpose, Split, Slice; shape arithmetic writes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from efficientml.core.errors import UnsupportedError
from efficientml.quant.integer import CatStep, Instr, LutStep, MulStep, PassStep

_PLAIN = {"sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}
_ARITH = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}
_INT64_MAX = np.iinfo(np.int64).max


def _scalar(g: Any, tag: str, v: float) -> str:
    return g.const(tag, np.array(v, dtype=np.float32))


def _gelu(g: Any, x: str, approximate: str, tag: str) -> str:
    """0.5·x·(1 + erf(x/√2)), or with ``approximate="tanh"`` 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    if approximate == "tanh":
        cube = g.node("Mul", [x, g.node("Mul", [x, x])])
        inner = g.node("Add", [x, g.node("Mul", [cube, _scalar(g, tag + "_c", 0.044715)])])
        t = g.node("Tanh", [g.node("Mul", [inner, _scalar(g, tag + "_k", math.sqrt(2 / math.pi))])])
    else:
        t = g.node("Erf", [g.node("Mul", [x, _scalar(g, tag + "_k", 1 / math.sqrt(2))])])
    half_x = g.node("Mul", [x, _scalar(g, tag + "_half", 0.5)])
    return g.node("Mul", [half_x, g.node("Add", [t, _scalar(g, tag + "_one", 1.0)])])


def _unary(g: Any, st: LutStep, x: str, tag: str) -> str:
    op, p = st.op, st.params
    if op in _PLAIN:
        return g.node(_PLAIN[op], [x])
    if op == "hardsigmoid":                               # torch: relu6(x + 3) / 6
        return g.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if op == "leaky_relu":
        return g.node("LeakyRelu", [x], alpha=float(p["slope"]))
    if op == "silu":
        return g.node("Mul", [x, g.node("Sigmoid", [x])])
    if op == "gelu":
        return _gelu(g, x, p.get("approximate", "none"), tag)
    if op in _ARITH:
        c = _scalar(g, tag + "_const", p["value"])
        return g.node(_ARITH[op], [c, x] if p["reverse"] else [x, c])
    raise UnsupportedError(f"step {st.name!r} is a table of op {op!r}, which has no ONNX export")


def elementwise(g: Any, st: LutStep | MulStep | CatStep, args: list[str], tag: str) -> str:
    """DQ → float op → Q for a table activation, a product or a concatenation."""
    xs = [g.dq(a, qp, f"{tag}_in{i}") for i, (a, qp) in enumerate(zip(args, st.in_qp))]
    if isinstance(st, LutStep):
        y = _unary(g, st, xs[0], tag)
    elif isinstance(st, MulStep):
        y = g.node("Mul", xs)
    else:
        y = g.node("Concat", xs, axis=st.dim)
    return g.q(y, st.out_qp, tag, st.out_qp.qmin, st.out_qp.qmax)


def _arg(ins: Instr, vals: list[Any], i: int, key: str, default: Any) -> Any:
    return ins.kwargs.get(key, vals[i] if len(vals) > i else default)


def _perm(ins: Instr, vals: list[Any], op: str, rank: int) -> list[int]:
    if op == "transpose":
        a, b = (_arg(ins, vals, 1, "dim0", 0) % rank, _arg(ins, vals, 2, "dim1", 1) % rank)
        perm = list(range(rank))
        perm[a], perm[b] = b, a
        return perm
    dims = ins.kwargs.get("dims", vals[1:])
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return [int(d) % rank for d in dims]


def _slice(g: Any, ins: Instr, index: Any, x: str, tag: str) -> str:
    """Basic slicing ``x[:, a:b, ::s]`` as one ONNX Slice on the codes."""
    idx = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(s, slice) for s in idx):
        raise UnsupportedError(f"step {ins.step.name!r} indexes with {index!r}; the ONNX export "
                               "handles slices (x[:, a:b]) only, not integers, None or ...")
    axes = [i for i, s in enumerate(idx) if s != slice(None)]
    starts = [idx[i].start or 0 for i in axes]
    ends = [_INT64_MAX if idx[i].stop is None else idx[i].stop for i in axes]
    steps = [idx[i].step or 1 for i in axes]
    if not axes:
        return x
    consts = [g.const(f"{tag}_{k}", np.array(v, dtype=np.int64))
              for k, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
    return g.node("Slice", [x, *consts])


def move(g: Any, ins: Instr, args: list[Any], shapes: dict[str, Any], tag: str, vals: list[Any]) -> Any:
    """A data-movement step on the uint8 codes; returns its output name (a list of names for
    chunk/split, whose picks by index then write nothing). ``vals``: its arguments in the example
    run (sizes and indices that forward computed from shapes are numbers there)."""
    st: PassStep = ins.step
    op, src = st.op, ins.args[0]
    if isinstance(args[0], list):                          # picking one output of a split
        return args[0][vals[1]]
    in_shape, out_shape = shapes.get(src, ()), shapes.get(ins.out, ())
    if op in ("chunk", "split"):
        axis = _arg(ins, vals, 2, "dim", 0) % len(in_shape)
        sizes = g.const(f"{tag}_split", np.array([s[axis] for s in out_shape], dtype=np.int64))
        return g.multi("Split", [args[0], sizes], len(out_shape), axis=axis)
    if op in ("transpose", "permute"):
        return g.node("Transpose", [args[0]], perm=_perm(ins, vals, op, len(in_shape)))
    if op == "getitem":
        return _slice(g, ins, vals[1], args[0], tag)
    if out_shape == in_shape:
        return args[0]                                     # identity, dropout, contiguous
    if len(out_shape) == 2 and out_shape[0] == in_shape[0]:
        return g.node("Flatten", [args[0]], axis=1)        # (B, …) → (B, K): flatten/view
    if op in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "Flatten"):
        target = [0 if i == 0 and d == in_shape[0] else d for i, d in enumerate(out_shape)]   # 0: keep batch
        return g.node("Reshape", [args[0], g.const(f"{tag}_shape", np.array(target, dtype=np.int64))])
    raise UnsupportedError(f"step {st.name!r} ({op}) has no ONNX QDQ export")
