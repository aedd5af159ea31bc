"""Channel ops for PyTorch's own modules, registered when :mod:`efficientml.prune` is imported.

Convs and linears consume their input ids and create fresh output ids; BatchNorm passes ids through
and owns them as outputs (its γ/β are sliced); activations, dropout and pooling pass ids through; a
depthwise conv passes ids through (its ``groups`` follow the channel count); flatten repeats each id
once per spatial position, so the next linear loses ``H·W`` columns per removed channel; padding
(``nn.ZeroPad2d``, ``nn.ConstantPad2d`` …, and the function ``F.pad``, as TF-ported networks use for
"SAME" padding) passes ids through when it pads spatial dimensions only. Registering
at import (not on the first trace) means a user's :func:`register_channel_op` never leaves the
built-in modules unknown.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.channels import (CHANNEL_OPS, FUNCTION_OPS, Member, TraceContext,
                                       register_channel_op)
from efficientml.core.errors import UnsupportedError
from efficientml.prune.shrink import shrink_batchnorm, shrink_conv, shrink_linear


def _passthrough(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    return ids


def _pad_trace(ctx: TraceContext, module: object, ids: list[int]) -> list[int]:
    """Padding of the spatial dimensions keeps every channel; padding the channel dim adds channels."""
    if ctx.in_shape[:2] != ctx.out_shape[:2]:
        raise UnsupportedError(
            f"layer {ctx.name!r} pads the batch or channel dimension ({ctx.in_shape} → {ctx.out_shape}); "
            f"channel pruning follows padding of spatial dimensions only")
    return ids


_PAD_MODULES = tuple(getattr(nn, f"{kind}Pad{d}d") for kind in ("Zero", "Constant", "Reflection", "Replication",
                                                                "Circular") for d in (1, 2, 3)
                     if hasattr(nn, f"{kind}Pad{d}d"))          # CircularPad* is newer than the others


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


def flatten_ids(ids: list[int], shape: tuple[int, ...]) -> list[int]:
    spatial = math.prod(shape[2:])
    return [c for c in ids for _ in range(spatial)]  # channel-major: C·H·W order


def _flatten_trace(ctx: TraceContext, module: nn.Module, ids: list[int]) -> list[int]:
    start = module.start_dim % len(ctx.in_shape)
    if start == 1:
        return flatten_ids(ids, ctx.in_shape)
    if start >= 2:
        return ids
    raise UnsupportedError(f"layer {ctx.name!r} flattens the batch dimension; cannot follow channels")


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.Softplus,
)


# --------------------------------------------------------------------------------------------------
# functional ops met in forward() code (the graph builder handles them itself: they have no module)

UNARY_FUNCS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.dropout, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, torch.clamp, F.softplus,
    torch.nn.functional.relu_,
}
BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                operator.imul, torch.add, torch.sub, torch.mul, torch.div}
UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clamp", "clamp_", "float", "to",
                 "clone", "detach", "sigmoid_", "tanh_", "hardtanh_", "type_as"}
BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
REDUCE = {"mean", "sum", "amax", "amin"}
NON_TENSOR_METHODS = {"size", "dim", "numel"}


def register_builtin_ops() -> None:
    """Register the rules for PyTorch's modules (done once at import). A type that already has a
    rule (a user's, registered through :mod:`efficientml.core.channels` first) keeps it."""
    def default(t: type, trace, shrink=None) -> None:
        if t not in CHANNEL_OPS:
            register_channel_op(t, trace, shrink)

    for t in _ELEMENTWISE_MODULES:
        default(t, _passthrough)
    for t in (nn.BatchNorm1d, nn.BatchNorm2d):
        default(t, _norm_trace, shrink_batchnorm)
    for t in (nn.Conv1d, nn.Conv2d):
        default(t, _conv_trace, shrink_conv)
    default(nn.Linear, _linear_trace, shrink_linear)
    default(nn.Flatten, _flatten_trace)
    for t in _PAD_MODULES:
        default(t, _pad_trace)
    if F.pad not in FUNCTION_OPS:
        register_channel_op(F.pad, _pad_trace)


register_builtin_ops()
