"""Which integer step an fx node becomes: the node patterns of :mod:`efficientml.quant.integer`'s
program builder (activations fused as clamps, padding, data movement, means, lookup-table
activations in module / function / method form, products, concatenation, shape arithmetic).
Each matcher returns None when the node is not its kind.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import UnsupportedError
from efficientml.quant.integer_elementwise import LutStep
from efficientml.quant.integer_ops import PadStep

_RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
MOVE_FUNCS = {torch.flatten, operator.getitem, torch.reshape, torch.squeeze, torch.unsqueeze, torch.chunk,
              torch.split, torch.transpose, torch.permute}
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d,
                nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d)
_PAD_MODES = {"ReflectionPad": "reflect", "ReplicationPad": "replicate"}
MOVE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "permute", "transpose",
                "chunk", "split"}

# unary activations that become lookup tables: module type / function / method name → op name
_LUT_MODULES = {nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu",
                nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.GELU: "gelu", nn.LeakyReLU: "leaky_relu"}
_LUT_FUNCS = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid",
              F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu",
              F.leaky_relu: "leaky_relu"}
_LUT_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh"}
# binary arithmetic: with two tensors a product (mul) or sum (add); with one constant a table
_ARITH_FUNCS = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
                operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div"}
_ARITH_METHODS = ("add", "sub", "mul", "div")
_CAT_FUNCS = (torch.cat, torch.concat, torch.concatenate)
_SHAPE_FUNCS = (operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub,
                operator.truediv, operator.mod)


def pad_of(node: fx.Node, mod: nn.Module | None, name: str) -> PadStep | None:
    """The padding step of a pad module or an ``F.pad`` call with static amounts, else None."""
    if isinstance(mod, _PAD_MODULES):
        mode = next((m for k, m in _PAD_MODES.items() if type(mod).__name__.startswith(k)), "constant")
        return PadStep(name, mod.padding, mode, getattr(mod, "value", 0.0))
    if node.op != "call_function" or node.target is not F.pad:
        return None
    names = ("input", "pad", "mode", "value")
    a = {**dict(zip(names, node.args)), **node.kwargs}
    if not isinstance(a.get("pad"), (tuple, list)) or any(isinstance(p, fx.Node) for p in a["pad"]):
        raise UnsupportedError(f"layer {name!r} pads by an amount computed in forward; integer conversion "
                               "needs static padding (compute it in __init__, or use nn.ZeroPad2d)")
    return PadStep(name, a["pad"], a.get("mode", "constant"), a.get("value") or 0.0)


def act_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"relu" or "relu6" when the node is one (fusable as a clamp), else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
            return "relu6"
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return _RELU_FUNCS[node.target]
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def is_move(node: fx.Node, mod: nn.Module | None) -> bool:
    return isinstance(mod, (nn.Flatten, nn.Identity, nn.Dropout)) or \
        (node.op == "call_function" and node.target in MOVE_FUNCS) or \
        (node.op == "call_method" and node.target in MOVE_METHODS)


def move_fn(node: fx.Node, mod: nn.Module | None) -> Callable[..., Any]:
    """The callable of a data-movement op (flatten, view, getitem …): the module, method or function."""
    if mod is not None:
        return mod
    if node.op == "call_method":
        return _method(node.target)
    return node.target


def op_name(node: fx.Node, mod: nn.Module | None) -> str:
    """The op's name for the export: a method name, a function's ``__name__``, a module's type."""
    if mod is not None:
        return type(mod).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _method(meth: str) -> Callable[..., Any]:
    return lambda x, *a, **k: getattr(x, meth)(*a, **k)


def mean_dims(node: fx.Node, mod: nn.Module | None) -> tuple[tuple[int, ...], bool] | None:
    """(dims, keepdim) of a spatial mean (``x.mean(dims)`` or a global AdaptiveAvgPool2d), else None."""
    dims_keep = None
    if node.op == "call_method" and node.target == "mean":
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is not None:
            dims_keep = (tuple(dims) if isinstance(dims, (tuple, list)) else (dims,), keep)
    if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
        dims_keep = ((2, 3), True)
    return dims_keep


def _has_node(args: Any) -> bool:
    found: list[bool] = []
    fx.node.map_arg(args, lambda n: found.append(True))
    return bool(found)


def lut_of(node: fx.Node, mod: nn.Module | None, name: str) -> LutStep | None:
    """A table step for a unary activation (module, function or method form) or for arithmetic of
    one tensor with a constant (``x + 3``, ``x / 6``, ``1 - x``), else None."""
    if mod is not None:
        op = next((v for k, v in _LUT_MODULES.items() if type(mod) is k), None)
        if op is None:
            return None
        return LutStep(name, mod, op, {"approximate": getattr(mod, "approximate", "none"),
                                       "slope": getattr(mod, "negative_slope", 0.01)})
    extra, kw = node.args[1:], dict(node.kwargs)
    if node.op == "call_function" and node.target in _LUT_FUNCS and not _has_node((extra, kw)):
        fn, target = node.target, node.target
        slope = kw.get("negative_slope", extra[0] if extra and target is F.leaky_relu else 0.01)
        return LutStep(name, lambda x: fn(x, *extra, **kw), _LUT_FUNCS[target],
                       {"approximate": kw.get("approximate", "none"), "slope": slope})
    if node.op == "call_method" and node.target in _LUT_METHODS and not extra and not kw:
        return LutStep(name, _method(node.target), _LUT_METHODS[node.target])
    return _scalar_lut(node, name)


def arith_op(node: fx.Node) -> str | None:
    """"add", "sub", "mul" or "div" for arithmetic in function or method form, else None."""
    if node.op == "call_function" and node.target in _ARITH_FUNCS:
        return _ARITH_FUNCS[node.target]
    if node.op == "call_method" and node.target in _ARITH_METHODS:
        return node.target
    return None


def _scalar_lut(node: fx.Node, name: str) -> LutStep | None:
    op = arith_op(node)
    if op is None or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    consts = [v for v in (a, b) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(consts) != 1 or not any(isinstance(v, fx.Node) for v in (a, b)):
        return None
    c, reverse = consts[0], isinstance(a, (int, float))
    if node.op == "call_method":
        fn = (lambda meth, c: lambda x: getattr(x, meth)(c))(node.target, c)
    else:
        fn = (lambda f, c, r: (lambda x: f(c, x)) if r else (lambda x: f(x, c)))(node.target, c, reverse)
    return LutStep(name, fn, op, {"value": float(c), "reverse": reverse})


def is_tensor_product(node: fx.Node) -> bool:
    """``a * b`` of two tensors (function or method form)."""
    return arith_op(node) == "mul" and not node.kwargs and len(node.args) == 2 and \
        all(isinstance(a, fx.Node) for a in node.args)


def cat_of(node: fx.Node) -> tuple[list[fx.Node], int] | None:
    """(inputs, dim) of ``torch.cat(list, dim)``, else None."""
    if node.op != "call_function" or node.target not in _CAT_FUNCS:
        return None
    xs = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    if not isinstance(xs, (tuple, list)) or not all(isinstance(x, fx.Node) for x in xs) or \
            isinstance(dim, fx.Node):
        raise UnsupportedError(f"layer {node.name!r} concatenates a computed list or along a computed "
                               "dim; integer conversion needs torch.cat((a, b, …), dim=constant)")
    return list(xs), int(dim)


def is_shape(node: fx.Node, shape_values: set[str]) -> bool:
    """Shape arithmetic: ``x.shape``, ``x.size()``, ``x.dim()``, and getitem / integer arithmetic
    whose tensor-valued arguments are all shapes already."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op != "call_function" or node.target not in _SHAPE_FUNCS:
        return False
    nodes: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), nodes.append)
    return bool(nodes) and all(n.name in shape_values for n in nodes)


def shape_fn(node: fx.Node) -> Callable[..., Any]:
    return _method(node.target) if node.op == "call_method" else node.target
