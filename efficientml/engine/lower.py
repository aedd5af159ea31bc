"""Lowering an :class:`~efficientml.quant.integer.IntegerModel` into the engine's graph: a list of
kernel calls on views of flat uint8 buffers (NCHW, batch 1), ready for the memory planner and the C
generator.

Each program step becomes one :class:`Op` (conv2d / depthwise / pointwise, linear, maxpool, mean,
add, mul, clamp, lut, cat) writing a new buffer, except data movement: views, transposes, slices,
``chunk`` + ``getitem``, ``Identity``/``Dropout`` and padding are applied to *index tensors* (each
element's position in its source buffer). A result whose positions are one contiguous run is an alias
(a :class:`View` at an offset, no code, no memory); anything else (a channel shuffle, a strided slice,
a pad) becomes one ``gather`` op with a const index table (−1: the padding code). The shapes come
from one run of the Python integer reference on an example input; the constants (int8 weights, int32
biases, fixed-point multipliers and shifts, zero points, clamp bounds) are the reference's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from efficientml.engine.errors import EngineUnsupportedError
from efficientml.quant.integer import IntegerModel, _run
from efficientml.quant.integer_elementwise import CatStep, LutStep, MulStep, ShapeStep
from efficientml.quant.integer_ops import (AddStep, FloatStep, InputStep, MeanStep, PadStep, PassStep, _clamp_bounds,
                                           fixed_point)
from efficientml.quant.integer_weighted import ConvStep, LinearStep


@dataclass
class View:
    """A contiguous tensor of ``shape`` at byte ``offset`` of buffer ``buf``."""

    buf: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Op:
    """One kernel call: ``kind`` reads ``ins`` and writes ``out``; ``params`` are its constants."""

    kind: str
    name: str
    ins: list[View]
    out: View
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """The lowered model: ``buffers[i]`` is buffer i's size in bytes; buffer 0 holds the input codes."""

    ops: list[Op]
    buffers: list[int]
    input: View
    output: View

    def views(self) -> list[View]:
        """Every view object in the graph (ops share them; the planner rewrites them in place)."""
        seen: dict[int, View] = {id(self.input): self.input, id(self.output): self.output}
        for op in self.ops:
            for v in [*op.ins, op.out]:
                seen[id(v)] = v
        return list(seen.values())


@dataclass
class _Index:
    """A pending move: element positions ``idx`` (int64, the value's shape) in buffer ``buf``; −1 is
    a padding element whose code is ``fill``."""

    buf: int
    idx: torch.Tensor
    fill: int = 0


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Lowering:
    """One pass over the program; ``vals`` maps a value name to a View, an _Index or a tuple of them."""

    def __init__(self, im: IntegerModel, example: torch.Tensor):
        self.program = im.program
        self.recorded: dict[str, Any] = {}
        _run(self.program, "integer", (example[:1],), lambda ins, out, args: self.recorded.__setitem__(ins.out, out))
        self.ops: list[Op] = []
        self.buffers: list[int] = []
        self.vals: dict[str, Any] = {}

    def new_view(self, shape: tuple[int, ...]) -> View:
        self.buffers.append(math.prod(shape))
        return View(len(self.buffers) - 1, 0, tuple(int(s) for s in shape))

    def emit(self, kind: str, name: str, ins: list[View], shape: tuple[int, ...], **params: Any) -> View:
        out = self.new_view(shape)
        self.ops.append(Op(kind, name, ins, out, params))
        return out

    def run(self) -> Graph:
        inp: View | None = None
        for ins in self.program.instrs:
            step, out = ins.step, self.recorded[ins.out]
            if isinstance(step, InputStep):
                inp = self.vals[ins.out] = self.new_view(tuple(out.shape))
            elif isinstance(step, ShapeStep):
                continue
            elif isinstance(step, (PadStep, PassStep)) and (isinstance(step, PadStep) or step.mode == "move"):
                self.vals[ins.out] = self.move(ins)
            else:
                self.vals[ins.out] = self.compute(ins, step, out)
        if not isinstance(self.program.output, str):
            raise EngineUnsupportedError("multiple outputs", str(self.program.output))
        output = self.tensor(self.program.output, "output")
        assert inp is not None
        return Graph(self.ops, self.buffers, inp, output)

    # -- data movement -------------------------------------------------------------------------
    def index_of(self, v: Any) -> Any:
        if isinstance(v, View):
            return torch.arange(v.offset, v.offset + v.numel, dtype=torch.int64).view(v.shape)
        if isinstance(v, _Index):
            return v.idx
        return type(v)(self.index_of(e) for e in v)

    def move(self, ins: Any) -> Any:
        step = ins.step
        src = next(self.vals[a] for a in _names(ins.args) if a in self.vals)
        first = src if not isinstance(src, (tuple, list)) else src[0]
        fill = first.fill if isinstance(first, _Index) else 0
        if isinstance(step, PadStep):
            (a,) = _names(ins.args)
            idx = self.index_of(self.vals[a])
            if step.mode == "constant":
                if isinstance(first, _Index) and bool((idx < 0).any()) and fill != step.code():
                    raise EngineUnsupportedError("pad", step.name, "a pad of a pad with another constant")
                res = F.pad(idx, step.pad, value=-1)
                fill = step.code()
            else:
                res = F.pad(idx.double(), step.pad, step.mode).to(torch.int64)
            return _Index(first.buf, res, fill)
        args = fx.node.map_aggregate(ins.args, lambda a: self.arg(a))
        kwargs = fx.node.map_aggregate(ins.kwargs, lambda a: self.arg(a))
        res = step.fn(*args, **kwargs)
        if isinstance(res, torch.Tensor):
            return _Index(first.buf, res, fill)
        if isinstance(res, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in res):
            return tuple(_Index(first.buf, r, fill) for r in res)
        raise EngineUnsupportedError(step.op or "move", step.name, "its result is not a tensor of codes")

    def arg(self, a: Any) -> Any:
        if isinstance(a, str) and a in self.vals:
            return self.index_of(self.vals[a])
        if isinstance(a, str) and a in self.recorded:
            return self.recorded[a]
        return a

    def tensor(self, name: str, user: str) -> View:
        """The value ``name`` as a View: an alias when its positions are one run, else a gather."""
        v = self.vals[name]
        if isinstance(v, View):
            return v
        if not isinstance(v, _Index):
            raise EngineUnsupportedError("tuple input", user, f"{name!r} is a tuple of tensors")
        flat = v.idx.reshape(-1)
        start = int(flat[0]) if flat.numel() else 0
        shape = tuple(v.idx.shape)
        if flat.numel() and bool((flat == torch.arange(start, start + flat.numel())).all()):
            view = View(v.buf, start, shape)
        else:
            src = View(v.buf, 0, (self.buffers[v.buf],))
            view = self.emit("gather", name, [src], shape, idx=flat.to(torch.int32), fill=v.fill)
        self.vals[name] = view
        return view

    # -- compute ops ---------------------------------------------------------------------------
    def compute(self, ins: Any, step: Any, out: Any) -> View:
        if not isinstance(out, torch.Tensor):
            raise EngineUnsupportedError(step.kind, step.name, "its output is not a tensor")
        xs = [self.tensor(a, step.name) for a in _names(ins.args)]
        shape = tuple(out.shape)
        for kind, fn in _KERNELS:
            if isinstance(step, kind):
                return fn(self, step, xs, shape)
        if isinstance(step, FloatStep):          # kept in float by skip_unsupported: name what it runs
            fn = step.fn
            what = type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", "a function")
            raise EngineUnsupportedError(what, step.name, "the integer model keeps it in float (a float fallback), "
                                                          "and the engine runs integer kernels only")
        raise EngineUnsupportedError(step.kind, step.name)


def _names(args: Any) -> list[str]:
    names: list[str] = []
    fx.node.map_aggregate(args, lambda a: names.append(a) if isinstance(a, str) else None)
    return names


def _conv(lw: _Lowering, s: ConvStep, xs: list[View], shape: tuple[int, ...]) -> View:
    (x,) = xs
    _, c, h, w = x.shape
    o, _, kh, kw = s.w_q.shape
    ph, pw = s.padding
    p = dict(c=c, h=h, w=w, o=o, kh=kh, kw=kw, sh=s.stride[0], sw=s.stride[1], ph=ph, pw=pw,
             dh=s.dilation[0], dw=s.dilation[1], groups=s.groups, ho=shape[2], wo=shape[3],
             zin=s.in_qp[0].zero_point, zout=s.out_qp.zero_point, lo=s.lo, hi=s.hi)
    kind = "conv2d"
    if s.depthwise and c == s.groups:
        kind = "depthwise"
    elif (kh, kw, s.groups) == (1, 1, 1) and tuple(s.stride) == (1, 1) and (ph, pw) == (0, 0):
        kind = "pointwise"
    return lw.emit(kind, s.name, [x], shape, conv=p, w=s.w_q.to(torch.int8), bias=s.b_q.to(torch.int32),
                   m0=s.m0.to(torch.int32), shift=s.shift.to(torch.int8))


def _linear(lw: _Lowering, s: LinearStep, xs: list[View], shape: tuple[int, ...]) -> View:
    (x,) = xs
    o, f = s.w_q.shape
    return lw.emit("linear", s.name, [x], shape, rows=x.numel // f, f=f, o=o, w=s.w_q.to(torch.int8),
                   beff=s.b_eff.to(torch.int64), m0=s.m0.to(torch.int32), shift=s.shift.to(torch.int8),
                   zout=s.out_qp.zero_point, lo=s.lo, hi=s.hi)


def _pass(lw: _Lowering, s: PassStep, xs: list[View], shape: tuple[int, ...]) -> View:
    (x,) = xs
    if s.mode in ("relu", "relu6"):
        lo, hi = _clamp_bounds(s.in_qp[0], s.mode)
        return lw.emit("clamp", s.name, [x], shape, lo=lo, hi=hi)
    if s.mode == "max" and len(x.shape) == 4 and len(shape) == 4:
        k, st, pad, dil = _pool_params(s)
        if k is not None:
            p = dict(c=x.shape[1], h=x.shape[2], w=x.shape[3], kh=k[0], kw=k[1], sh=st[0], sw=st[1],
                     ph=pad[0], pw=pad[1], dh=dil[0], dw=dil[1], ho=shape[2], wo=shape[3])
            return lw.emit("maxpool", s.name, [x], shape, pool=p)
    raise EngineUnsupportedError(s.kind, s.name)


def _pool_params(s: PassStep) -> tuple[Any, Any, Any, Any]:
    """(kernel, stride, padding, dilation) of an nn.MaxPool2d; Nones when it is another max-pool."""
    m = s.fn
    if not isinstance(m, nn.MaxPool2d) or m.return_indices:
        return None, None, None, None
    k = _pair(m.kernel_size)
    return k, _pair(m.stride if m.stride is not None else k), _pair(m.padding), _pair(m.dilation)


def _mean(lw: _Lowering, s: MeanStep, xs: list[View], shape: tuple[int, ...]) -> View:
    (x,) = xs
    nd = len(x.shape)
    dims = sorted(d % nd for d in s.dims)
    if dims != list(range(dims[0], dims[-1] + 1)):
        raise EngineUnsupportedError("mean", s.name, f"dims {s.dims} are not adjacent")
    n = math.prod(x.shape[d] for d in dims)
    m0, shift = fixed_point(s.in_qp[0].scale / (n * s.out_qp.scale))
    qo = s.out_qp
    return lw.emit("mean", s.name, [x], shape, outer=math.prod(x.shape[:dims[0]]), n=n,
                   inner=math.prod(x.shape[dims[-1] + 1:]), zin=s.in_qp[0].zero_point, m0=int(m0),
                   shift=int(shift), zout=qo.zero_point, lo=qo.qmin, hi=qo.qmax)


def _add(lw: _Lowering, s: AddStep, xs: list[View], shape: tuple[int, ...]) -> View:
    a, b = xs
    if a.shape != b.shape or a.shape != shape:
        raise EngineUnsupportedError("add", s.name, f"broadcasting {a.shape} + {b.shape}")
    return lw.emit("add", s.name, [a, b], shape, za=s.in_qp[0].zero_point, zb=s.in_qp[1].zero_point,
                   ma=int(s.ma), mb=int(s.mb), shift=int(s.shift), zout=s.out_qp.zero_point, lo=s.lo, hi=s.hi)


def _mul(lw: _Lowering, s: MulStep, xs: list[View], shape: tuple[int, ...]) -> View:
    (a, qa), (b, qb) = zip(xs, s.in_qp)
    if a.shape != shape:                          # the product is symmetric: broadcast the second
        (a, qa), (b, qb) = (b, qb), (a, qa)
    if a.shape != shape or len(shape) > 4 or len(b.shape) > len(shape):
        raise EngineUnsupportedError("mul", s.name, f"broadcasting {xs[0].shape} * {xs[1].shape}")
    full = (1,) * (4 - len(shape)) + shape
    bsh = (1,) * (4 - len(b.shape)) + b.shape
    if any(bd not in (1, d) for bd, d in zip(bsh, full)):
        raise EngineUnsupportedError("mul", s.name, f"broadcasting {a.shape} * {b.shape}")
    strides, acc = [0] * 4, 1
    for d in range(3, -1, -1):
        strides[d] = 0 if bsh[d] == 1 else acc
        acc *= bsh[d]
    qo = s.out_qp
    return lw.emit("mul", s.name, [a, b], shape, shape4=full, bstride=tuple(strides), za=qa.zero_point,
                   zb=qb.zero_point, m0=int(s.m0), shift=int(s.shift), zout=qo.zero_point, lo=qo.qmin, hi=qo.qmax)


def _lut(lw: _Lowering, s: LutStep, xs: list[View], shape: tuple[int, ...]) -> View:
    return lw.emit("lut", s.name, xs, shape, table=s.table.to(torch.uint8))


def _cat(lw: _Lowering, s: CatStep, xs: list[View], shape: tuple[int, ...]) -> View:
    d = s.dim % len(shape)
    outer, ystride = math.prod(shape[:d]), math.prod(shape[d:])
    parts, start = [], 0
    for x, qp, (m0, shift), same in zip(xs, s.in_qp, s.mults, s.same):
        block = math.prod(x.shape[d:])
        parts.append(dict(start=start, block=block, zin=qp.zero_point, m0=0 if same else int(m0),
                          shift=int(shift)))
        start += block
    qo = s.out_qp
    return lw.emit("cat", s.name, xs, shape, outer=outer, ystride=ystride, parts=parts, zout=qo.zero_point,
                   lo=qo.qmin, hi=qo.qmax)


_KERNELS = ((ConvStep, _conv), (LinearStep, _linear), (PassStep, _pass), (MeanStep, _mean), (AddStep, _add),
            (MulStep, _mul), (LutStep, _lut), (CatStep, _cat))


def lower(im: IntegerModel, example: torch.Tensor) -> Graph:
    """The engine graph of ``im`` for inputs shaped like ``example[:1]`` (batch 1, the C model's shape).

    Raises :class:`EngineUnsupportedError` naming the first step with no kernel (a float fallback,
    a broadcasting add, a non-2-D max-pool …)."""
    return _Lowering(im, example).run()
