"""Channel dependency graph: which channels of which layers must be removed together.

The model is traced with torch.fx and every tensor's channel dimension (dim 1) is followed through the
graph as a list of *channel ids*, one per channel. A conv/linear creates fresh ids for its outputs and
records that it *consumes* its input ids; BatchNorm, activations and pooling pass ids through; an
addition unifies the ids of its operands position by position (a union-find), so a residual stream
becomes one set of channels shared by every block that writes to it; a concatenation joins lists;
a depthwise conv passes ids through (its ``groups`` follow the channel count); flatten repeats each id
once per spatial position, so the next linear loses ``H·W`` columns per removed channel.

Option-A ResNet shortcuts (:class:`~efficientml.models.resnet_cifar.PadShortcut`) pad ``e//2`` zero
channels before and ``e - e//2`` after the input channels. The sum ``conv(x) + pad(x)`` couples
the middle channels to the previous stage's stream, and the zero channels to nothing. To keep the
padding symmetric after pruning (the module pads evenly on both sides), the i-th zero channel before
is tied to the i-th zero channel after: they are removed in pairs; an odd extra channel is kept.

Per-module behaviour is data: :data:`CHANNEL_OPS` maps a module type to how it moves channel ids
(``trace``) and how it is rebuilt smaller (``shrink``, in :mod:`efficientml.prune.surgery`). Ops the
graph does not know raise :class:`UnsupportedError` naming the op and the layer, or, with
``on_unsupported="skip"``, freeze every channel they touch and are listed in ``DependencyGraph.skipped``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import UnsupportedError


@dataclass(frozen=True)
class Member:
    """One place a channel lives: ``module``'s input or output channel ``index``."""

    module: str
    role: str      # "in" or "out"
    index: int


@dataclass
class ChannelGroup:
    """Channels that share layers. ``channels[i]`` lists the members of channel i (one channel id).

    ``partition[i]`` labels channels that live in exactly the same layers; ratios are applied per
    partition so a residual stream loses the same share of its stage-1, stage-2 and stage-3 channels.
    """

    id: int
    channels: list[list[Member]]
    frozen: list[bool]
    partition: list[int]

    @property
    def producers(self) -> list[str]:
        return sorted({m.module for ch in self.channels for m in ch if m.role == "out"})

    @property
    def consumers(self) -> list[str]:
        return sorted({m.module for ch in self.channels for m in ch if m.role == "in"})

    @property
    def name(self) -> str:
        prods = self.producers
        return prods[0] if prods else f"group{self.id}"

    @property
    def prunable(self) -> int:
        return sum(not f for f in self.frozen)

    def __len__(self) -> int:
        return len(self.channels)


# --------------------------------------------------------------------------------------------------
# union-find over channel ids


class _Ids:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.members: dict[int, set[Member]] = {}
        self.frozen: set[int] = set()

    def fresh(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def add(self, cid: int, member: Member) -> None:
        self.members.setdefault(cid, set()).add(member)

    def freeze(self, ids: list[int]) -> None:
        self.frozen.update(ids)


@dataclass
class TraceContext:
    """What a channel op's ``trace`` sees: the id table and shapes of its input/output."""

    ids: _Ids
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class ChannelOp:
    """How a module type moves channel ids (``trace``) and is rebuilt with fewer (``shrink``)."""

    trace: Callable[[TraceContext, nn.Module, list[int]], list[int]]
    shrink: Callable[[nn.Module, list[int] | None, list[int] | None], nn.Module] | None = None


CHANNEL_OPS: dict[type, ChannelOp] = {}


def register_channel_op(module_type: type, trace: Callable, shrink: Callable | None = None) -> None:
    """Teach the graph (and surgery) a module type: ``trace(ctx, module, in_ids) -> out_ids`` and
    ``shrink(module, keep_in, keep_out) -> new module`` (``None`` keeps that side whole)."""
    CHANNEL_OPS[module_type] = ChannelOp(trace, shrink)


def _passthrough(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    return ids


def _norm_trace(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    for i, c in enumerate(ids):
        ctx.ids.add(c, Member(ctx.name, "out", i))
    return ids


def _conv_trace(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    g, cin, cout = module.groups, module.in_channels, module.out_channels
    if g == 1:
        for i, c in enumerate(ids):
            ctx.ids.add(c, Member(ctx.name, "in", i))
        out = ctx.ids.fresh(cout)
        for j, c in enumerate(out):
            ctx.ids.add(c, Member(ctx.name, "out", j))
        return out
    if g == cin == cout:  # depthwise: output channel i is computed from input channel i only
        for i, c in enumerate(ids):
            ctx.ids.add(c, Member(ctx.name, "in", i))
            ctx.ids.add(c, Member(ctx.name, "out", i))
        return ids
    raise UnsupportedError(
        f"layer {ctx.name!r} is a grouped conv (groups={g}, {cin}→{cout} channels); channel pruning "
        f"handles ordinary (groups=1) and depthwise (groups=in=out) convs only")


def _linear_trace(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    if len(ctx.in_shape) != 2:
        raise UnsupportedError(
            f"layer {ctx.name!r} is a Linear applied to a {len(ctx.in_shape)}-D tensor; channel "
            f"pruning follows Linear layers on (batch, features) inputs only")
    for i, c in enumerate(ids):
        ctx.ids.add(c, Member(ctx.name, "in", i))
    out = ctx.ids.fresh(module.out_features)
    for j, c in enumerate(out):
        ctx.ids.add(c, Member(ctx.name, "out", j))
    return out


def _flatten_ids(ids: list[int], shape: tuple[int, ...]) -> list[int]:
    spatial = math.prod(shape[2:])
    return [c for c in ids for _ in range(spatial)]  # channel-major: C·H·W order


def _flatten_trace(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    start = module.start_dim % len(ctx.in_shape)
    if start == 1:
        return _flatten_ids(ids, ctx.in_shape)
    if start >= 2:
        return ids
    raise UnsupportedError(f"layer {ctx.name!r} flattens the batch dimension; cannot follow channels")


def _pad_shortcut_trace(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    extra = module.out_channels - module.in_channels
    before = ctx.ids.fresh(extra // 2)
    after = ctx.ids.fresh(extra - extra // 2)
    for a, b in zip(before, after):  # removed in pairs so the padding stays even on both sides
        ctx.ids.union(a, b)
    if len(after) > len(before):
        ctx.ids.freeze(after[len(before):])
    for i, c in enumerate(ids):
        ctx.ids.add(c, Member(ctx.name, "in", i))
    out = before + ids + after
    for j, c in enumerate(out):
        ctx.ids.add(c, Member(ctx.name, "out", j))
    return out


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.Softplus,
)


def _default_ops() -> None:
    from efficientml.prune import surgery

    for t in _ELEMENTWISE_MODULES:
        register_channel_op(t, _passthrough)
    for t in (nn.BatchNorm1d, nn.BatchNorm2d):
        register_channel_op(t, _norm_trace, surgery.shrink_batchnorm)
    for t in (nn.Conv1d, nn.Conv2d):
        register_channel_op(t, _conv_trace, surgery.shrink_conv)
    register_channel_op(nn.Linear, _linear_trace, surgery.shrink_linear)
    register_channel_op(nn.Flatten, _flatten_trace)
    try:
        from efficientml.models.resnet_cifar import PadShortcut
    except ImportError:  # the zoo is optional for user models
        return
    register_channel_op(PadShortcut, _pad_shortcut_trace, surgery.shrink_pad_shortcut)


# --------------------------------------------------------------------------------------------------
# functional ops met in forward() code

_UNARY_FUNCS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.dropout, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, torch.clamp, F.softplus,
    torch.nn.functional.relu_,
}
_BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                 operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clamp", "clamp_", "float", "to",
                  "clone", "detach", "sigmoid_", "tanh_", "hardtanh_", "type_as"}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    name = getattr(t, "__name__", None) or str(t)
    mod = (getattr(t, "__module__", None) or "").replace("_operator", "operator")
    return f"{mod}.{name}" if mod else name


def _layer_of(node: fx.Node, root: nn.Module) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        if path:
            return path
    return f"{type(root).__name__}.forward"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in CHANNEL_OPS or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (modules in :data:`CHANNEL_OPS` stay leaves)."""
    if not CHANNEL_OPS:
        _default_ops()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError on data-dependent control flow)
        raise UnsupportedError(
            f"{type(model).__name__} cannot be traced with torch.fx ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); channel pruning needs a traceable forward") from None
    return fx.GraphModule(model, graph)


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(tm.shape)


def _dims(arg: Any, rank: int) -> list[int] | None:
    if arg is None:
        return None
    if isinstance(arg, int):
        arg = [arg]
    return [d % rank for d in arg]


@dataclass
class DependencyGraph:
    """Channel groups of ``model`` for inputs like ``example_inputs``.

    ``groups``: every set of coupled channels with at least one producing layer; ``shapes``: the input
    and output shape of each leaf layer (for MAC predictions); ``skipped``: ops left unpruned."""

    model: nn.Module
    groups: list[ChannelGroup]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    skipped: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)   # leaf layers in execution order

    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any, on_unsupported: str = "error") -> "DependencyGraph":
        from torch.fx.passes.shape_prop import ShapeProp

        gm = trace(model)
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*[a.detach().clone() if torch.is_tensor(a) else a for a in args])
        finally:
            model.train(was_training)
        return _Builder(model, gm, on_unsupported).run()


class _Builder:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, on_unsupported: str):
        self.model, self.gm, self.mode = model, gm, on_unsupported
        self.ids = _Ids()
        self.slots: dict[fx.Node, list[int] | None] = {}
        self.skipped: list[str] = []
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.memo: dict[str, tuple[list[int], list[int]]] = {}
        self.order: list[str] = []

    def run(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            self.slots[node] = self.visit(node)
        return DependencyGraph(self.model, self.groups(), self.shapes, self.skipped, self.order)

    # -- per node ---------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> list[int] | None:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            ids = self.ids.fresh(shape[1])
            self.ids.freeze(ids)  # the model's input channels are fixed
            return ids
        if node.op == "output":
            for a in node.all_input_nodes:
                s = self.slots.get(a)
                if s:
                    self.ids.freeze(s)  # the model's outputs (logits) are fixed
            return None
        if node.op == "get_attr":
            return None
        tensor_inputs = [a for a in node.all_input_nodes if self.slots.get(a) is not None]
        if shape is None or len(shape) < 2:
            if not tensor_inputs:
                return None
            if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
                return None
            if node.op == "call_function" and node.target is getattr:  # x.shape
                return None
            return self.unsupported(node, tensor_inputs, shape)
        try:
            if node.op == "call_module":
                return self.visit_module(node, shape)
            if node.op == "call_function":
                return self.visit_function(node, shape)
            if node.op == "call_method":
                return self.visit_method(node, shape)
        except _Unknown:
            return self.unsupported(node, tensor_inputs, shape)
        return self.unsupported(node, tensor_inputs, shape)

    def visit_module(self, node: fx.Node, shape: tuple[int, ...]) -> list[int]:
        name = str(node.target)
        module = self.gm.get_submodule(name)
        op = CHANNEL_OPS.get(type(module))
        if op is None or not node.args or not isinstance(node.args[0], fx.Node):
            raise _Unknown
        src = node.args[0]
        in_ids = self.slots.get(src)
        in_shape = _shape(src)
        if in_ids is None or in_shape is None:
            raise _Unknown
        if name in self.memo:  # a module called twice: tie its inputs, reuse its outputs
            prev_in, prev_out = self.memo[name]
            for a, b in zip(prev_in, in_ids):
                self.ids.union(a, b)
            return prev_out
        out = op.trace(TraceContext(self.ids, name, in_shape, shape), module, in_ids)
        self.memo[name] = (in_ids, out)
        self.shapes[name] = (in_shape, shape)
        self.order.append(name)
        return out

    def visit_function(self, node: fx.Node, shape: tuple[int, ...]) -> list[int]:
        t = node.target
        if t in _UNARY_FUNCS:
            return self.unary(node)
        if t in _BINARY_FUNCS:
            return self.binary(node, shape)
        if t is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, start)
        if t is torch.cat or t is torch.concat:
            return self.cat(node)
        if t in (torch.mean, torch.sum, torch.amax):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.reduce(node, dim)
        raise _Unknown

    def visit_method(self, node: fx.Node, shape: tuple[int, ...]) -> list[int]:
        t = node.target
        if t in _UNARY_METHODS:
            return self.unary(node)
        if t in _BINARY_METHODS:
            return self.binary(node, shape)
        if t in _REDUCE:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.reduce(node, dim)
        if t == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, start)
        if t in ("view", "reshape"):
            src = node.args[0]
            in_shape, ids = _shape(src), self.slots.get(src)
            if in_shape is None or ids is None:
                raise _Unknown
            if len(shape) == 2 and shape[0] == in_shape[0] and math.prod(shape) == math.prod(in_shape):
                return _flatten_ids(ids, in_shape)
            if shape[:2] == in_shape[:2]:
                return ids
        raise _Unknown

    # -- op kinds ---------------------------------------------------------------------------------
    def unary(self, node: fx.Node) -> list[int]:
        src = node.args[0]
        ids = self.slots.get(src) if isinstance(src, fx.Node) else None
        if ids is None:
            raise _Unknown
        return ids

    def binary(self, node: fx.Node, shape: tuple[int, ...]) -> list[int]:
        operands = [a for a in node.args if isinstance(a, fx.Node) and self.slots.get(a) is not None]
        if not operands:
            raise _Unknown
        full = [a for a in operands if _shape(a)[1] == shape[1]]
        if not full:
            raise _Unknown
        out = self.slots[full[0]]
        for other in full[1:]:
            for a, b in zip(out, self.slots[other]):
                self.ids.union(a, b)
        for a in operands:
            if _shape(a)[1] != shape[1]:  # broadcast along channels (a per-sample scalar): no coupling
                if _shape(a)[1] != 1:
                    raise _Unknown
        return out

    def flatten(self, node: fx.Node, start: int) -> list[int]:
        src = node.args[0]
        in_shape, ids = _shape(src), self.slots.get(src)
        if in_shape is None or ids is None:
            raise _Unknown
        start %= len(in_shape)
        if start == 1:
            return _flatten_ids(ids, in_shape)
        if start >= 2:
            return ids
        raise _Unknown

    def cat(self, node: fx.Node) -> list[int]:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [self.slots.get(t) for t in tensors]
        if any(p is None for p in parts):
            raise _Unknown
        rank = len(_shape(tensors[0]))
        if dim % rank == 1:
            return [c for p in parts for c in p]
        if dim % rank == 0:
            raise _Unknown
        for p in parts[1:]:
            for a, b in zip(parts[0], p):
                self.ids.union(a, b)
        return parts[0]

    def reduce(self, node: fx.Node, dim: Any) -> list[int]:
        src = node.args[0]
        in_shape, ids = _shape(src), self.slots.get(src)
        if in_shape is None or ids is None:
            raise _Unknown
        dims = _dims(dim, len(in_shape))
        if dims is None or 0 in dims or 1 in dims:
            raise _Unknown
        return ids

    def unsupported(self, node: fx.Node, tensor_inputs: list[fx.Node], shape: tuple[int, ...] | None) -> list[int] | None:
        op, layer = _op_name(node), (str(node.target) if node.op == "call_module" else _layer_of(node, self.model))
        if node.op == "call_module":
            op = type(self.gm.get_submodule(str(node.target))).__name__
        if self.mode != "skip":
            raise UnsupportedError(
                f"the channel dependency graph does not understand op {op!r} (node {node.name!r}) in "
                f"layer {layer!r}; register it with efficientml.prune.graph.register_channel_op or pass "
                f"on_unsupported='skip' to leave the channels it touches unpruned")
        for a in tensor_inputs:
            self.ids.freeze(self.slots[a])
        self.skipped.append(f"{op} in {layer} (node {node.name})")
        if shape is None or len(shape) < 2:
            return None
        out = self.ids.fresh(shape[1])
        self.ids.freeze(out)
        return out

    # -- groups -----------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        find = self.ids.find
        members: dict[int, set[Member]] = {}
        for cid, ms in self.ids.members.items():
            members.setdefault(find(cid), set()).update(ms)
        frozen_roots = {find(c) for c in self.ids.frozen}
        # channels that share an output layer belong to one group (union-find over roots)
        parent: dict[int, int] = {r: r for r in members}

        def gfind(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        by_out: dict[str, int] = {}
        for r, ms in members.items():
            for m in ms:
                if m.role == "out":
                    if m.module in by_out:
                        ra, rb = gfind(by_out[m.module]), gfind(r)
                        if ra != rb:
                            parent[max(ra, rb)] = min(ra, rb)
                    else:
                        by_out[m.module] = r
        grouped: dict[int, list[int]] = {}
        for r in sorted(members):
            grouped.setdefault(gfind(r), []).append(r)
        out: list[ChannelGroup] = []
        for roots in grouped.values():
            chans = [sorted(members[r], key=lambda m: (m.module, m.role, m.index)) for r in roots]
            if not any(m.role == "out" for ch in chans for m in ch):
                continue
            sigs: dict[frozenset, int] = {}
            part = [sigs.setdefault(frozenset(m.module for m in ch if m.role == "out"), len(sigs))
                    for ch in chans]
            # order channels by their first producer's index so "keep the first k" means what it says
            order = sorted(range(len(roots)), key=lambda i: _first_out(chans[i]))
            out.append(ChannelGroup(len(out), [chans[i] for i in order],
                                    [roots[i] in frozen_roots for i in order], [part[i] for i in order]))
        return out


def _first_out(ch: list[Member]) -> tuple[str, int]:
    outs = [(m.module, m.index) for m in ch if m.role == "out"]
    return min(outs) if outs else ("", 0)


class _Unknown(Exception):
    """Internal: an op this graph does not know (turned into UnsupportedError or a skip)."""
