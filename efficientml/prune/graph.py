"""Channel dependency graph: which channels of which layers must be removed together.

The model is traced with torch.fx and every tensor's channel dimension (dim 1) is followed through the
graph as a list of *channel ids*, one per channel. What a module does to the ids is its channel op
(:mod:`efficientml.prune.channel_ops` for PyTorch's modules: a conv/linear creates fresh ids for its
outputs and *consumes* its input ids, BatchNorm, activations and pooling pass them through, flatten
repeats them per position). Between modules, an addition unifies the ids of its operands position by
position (a union-find), so a residual stream becomes one set of channels shared by every block that
writes to it, and a concatenation joins lists.

Per-module behaviour is data: :data:`~efficientml.core.channels.CHANNEL_OPS` maps a module type to how
it moves channel ids (``trace``) and how it is rebuilt smaller (``shrink``); a model describes its own
modules with :func:`register_channel_op` (the CIFAR ResNets' option-A shortcut does, in
:mod:`efficientml.models.resnet_cifar`). Ops the graph does not know raise :class:`UnsupportedError`
naming the op and the layer, or, with ``on_unsupported="skip"``, freeze every channel they touch and
are listed in ``DependencyGraph.skipped``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from efficientml.core.channels import (CHANNEL_OPS, FUNCTION_OPS, ChannelIds, ChannelOp,  # noqa: F401
                                       FunctionCall, Member, TensorArg, TraceContext, register_channel_op)
from efficientml.core.errors import UnsupportedError
from efficientml.prune.channel_ops import (BINARY_FUNCS, BINARY_METHODS, NON_TENSOR_METHODS, REDUCE,
                                          UNARY_FUNCS, UNARY_METHODS, flatten_ids)
from efficientml.prune.groups import ChannelGroup, build_groups  # noqa: F401 - ChannelGroup re-exported


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
        self.ids = ChannelIds()
        self.slots: dict[fx.Node, list[int] | None] = {}
        self.skipped: list[str] = []
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.memo: dict[str, tuple[list[int], list[int]]] = {}
        self.order: list[str] = []

    def run(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            self.slots[node] = self.visit(node)
        return DependencyGraph(self.model, build_groups(self.ids), self.shapes, self.skipped, self.order)

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
            if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
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
        except (_Unknown, UnsupportedError) as e:  # a known module it cannot follow (a grouped conv)
            if isinstance(e, UnsupportedError) and self.mode != "skip":
                raise
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
        # a module with weights called twice: tie inputs, reuse outputs; a stateless one is retraced
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if stateful and name in self.memo:
            prev_in, prev_out = self.memo[name]
            for a, b in zip(prev_in, in_ids):
                self.ids.union(a, b)
            return prev_out
        out = op.trace(TraceContext(self.ids, name, in_shape, shape), module, in_ids)
        if name not in self.memo:
            self.shapes[name] = (in_shape, shape)
            self.order.append(name)
        self.memo[name] = (in_ids, out)
        return out

    def visit_function(self, node: fx.Node, shape: tuple[int, ...]) -> list[int]:
        t = node.target
        if t in UNARY_FUNCS:
            return self.unary(node)
        if t in BINARY_FUNCS:
            return self.binary(node, shape)
        if t is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, start)
        if t is torch.cat or t is torch.concat:
            return self.cat(node)
        if t in (torch.mean, torch.sum, torch.amax):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.reduce(node, dim)
        if t in FUNCTION_OPS:
            return self.registered_function(node, FUNCTION_OPS[t], shape)
        raise _Unknown

    def registered_function(self, node: fx.Node, op: ChannelOp, shape: tuple[int, ...]) -> list[int]:
        src = next((a for a in node.args if isinstance(a, fx.Node)), None)
        ids = self.slots.get(src) if src is not None else None
        if ids is None or _shape(src) is None:
            raise _Unknown
        arg = lambda n: TensorArg(_shape(n))  # noqa: E731 - tensors as their shapes
        call = FunctionCall(node.target, fx.node.map_arg(node.args, arg), fx.node.map_arg(node.kwargs, arg))
        return op.trace(TraceContext(self.ids, _layer_of(node, self.model), _shape(src), shape), call, ids)

    def visit_method(self, node: fx.Node, shape: tuple[int, ...]) -> list[int]:
        t = node.target
        if t in UNARY_METHODS:
            return self.unary(node)
        if t in BINARY_METHODS:
            return self.binary(node, shape)
        if t in REDUCE:
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
                return flatten_ids(ids, in_shape)
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
            return flatten_ids(ids, in_shape)
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
                f"layer {layer!r}; register it (module type or function) with efficientml.prune."
                f"register_channel_op or pass "
                f"on_unsupported='skip' to leave the channels it touches unpruned")
        for a in tensor_inputs:
            self.ids.freeze(self.slots[a])
        self.skipped.append(f"{op} in {layer} (node {node.name})")
        if shape is None or len(shape) < 2:
            return None
        out = self.ids.fresh(shape[1])
        self.ids.freeze(out)
        return out

class _Unknown(Exception):
    """Internal: an op this graph does not know (turned into UnsupportedError or a skip)."""
