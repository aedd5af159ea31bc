"""Function-preserving growth (Net2Net, Chen et al. 2016): warm-start a larger candidate from a trained one.

:func:`widen` (Net2WiderNet) gives layer L ``new_width`` output units by replicating existing ones. With
the mapping ``src: new unit → old unit`` (identity on the first ``C`` units, random picks after) and
``count[j] = |{c : src[c] = j}|``::

    W_L'[c] = W_L[src[c]]             b_L'[c] = b_L[src[c]]       (and BN stats/affine, depthwise filters)
    W_next'[:, c] = W_next[:, src[c]] / count[src[c]]                 (every dense reader of the channels)

so every replica carries the same activation and the reader sums them back to the original. The chain
from L to its readers is the channel group of :mod:`efficientml.prune.graph` (through BatchNorm,
activations, depthwise convs, pooling and flatten, whose reader owns ``H·W`` columns per channel); the
copies are built by the pruning surgery (:class:`~efficientml.prune.surgery.ChannelPlan` with repeated
channels), so the result is the same plain ``nn.Module`` tree a pruned model is.

:func:`deepen` (Net2DeeperNet) inserts an identity layer (``k×k`` conv with a centred one-hot kernel +
a BatchNorm that is the identity in eval mode + the same activation, or an identity ``Linear`` +
activation) where the output is already activated; ``act(act(x)) = act(x)`` for ReLU, ReLU6 and
Hardtanh, so the eval-mode function is unchanged. Both return a new model; the argument is untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError, EfficientMLError, ShapeError, UnsupportedError
from efficientml.core.modules import get_module, set_module
from efficientml.prune.channel_ops import UNARY_FUNCS, UNARY_METHODS
from efficientml.prune.graph import DependencyGraph, trace
from efficientml.prune.groups import ChannelGroup
from efficientml.prune.surgery import ChannelPlan

PROBE_SIZE = 32   # spatial size of the probe input widen() builds when no example_inputs are given


# --------------------------------------------------------------------------------------------------
# widen


def widen(model: nn.Module, layer_name: str, new_width: int, *, noise: float = 0.0, seed: int = 0,
          example_inputs: Any = None) -> nn.Module:
    """A copy of ``model`` whose Conv/Linear ``layer_name`` has ``new_width`` outputs, same function.

    ``noise`` > 0 adds ``noise · std(W_L)`` Gaussian noise to the replicated units' incoming weights (to
    break their symmetry in training; the function then changes slightly). ``example_inputs`` is traced
    to find the readers; by default a zero probe (1, C_in, 32, 32) / (1, F_in) is built from the first
    Conv/Linear — pass real inputs when a flatten reads a spatial map of another size."""
    layer = get_module(model, layer_name)
    old = _dense_width(layer_name, layer)
    if isinstance(new_width, bool) or not isinstance(new_width, int) or new_width <= old:
        raise ConfigError(f"widen needs new_width > the current width {old} of layer {layer_name!r}, "
                          f"got {new_width!r}")
    if not noise >= 0:
        raise ConfigError(f"noise must be ≥ 0 (a fraction of the weights' std), got {noise!r}")
    out = copy.deepcopy(model)
    graph = _graph(out, example_inputs)
    group = next((g for g in graph.groups if layer_name in g.producers), None)
    if group is None:
        raise UnsupportedError(f"layer {layer_name!r} is not called in the traced forward; cannot widen it")
    readers = _check_group(group, out, layer_name, old)
    gen = torch.Generator().manual_seed(seed)
    src = list(range(old)) + torch.randint(old, (new_width - old,), generator=gen).tolist()
    pos = {m.index: p for p, ch in enumerate(group.channels) for m in ch if m.module == layer_name}
    ChannelPlan(graph, {group.id: [pos[i] for i in src]}, permute=True).apply(out)  # copies rows/filters/stats
    count = torch.bincount(torch.tensor(src), minlength=old).double()
    share = (1.0 / count)[torch.tensor(src)]   # (new_width,) each replica's part of its original unit
    with torch.no_grad():
        for name, mult in readers.items():
            w = get_module(out, name).weight    # (out, new_width · mult, *kernel)
            scale = share.repeat_interleave(mult).to(w)
            w.mul_(scale.view(1, -1, *[1] * (w.dim() - 2)))
        if noise > 0:
            w = get_module(out, layer_name).weight
            std = w.std() if w.numel() > 1 else w.abs().mean()
            w[old:] += noise * std * torch.randn(w[old:].shape, generator=gen).to(w)
    return out


def _dense_width(name: str, layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups == 1:
        return layer.out_channels
    what = f"a grouped conv (groups={layer.groups})" if isinstance(layer, nn.Conv2d) else type(layer).__name__
    raise UnsupportedError(f"widen grows a Conv1d/Conv2d with groups=1 or a Linear; layer {name!r} is {what} "
                           f"(widen the dense layer that produces its channels instead)")


def _graph(model: nn.Module, example_inputs: Any) -> DependencyGraph:
    probe = example_inputs if example_inputs is not None else _probe(model)
    try:
        return DependencyGraph.build(model, probe)
    except EfficientMLError:
        raise
    except Exception as e:  # the probe did not fit (fx wraps the shape error in its own type)
        shape = tuple(probe.shape) if torch.is_tensor(probe) else "the given inputs"
        raise ShapeError(f"{type(model).__name__} could not run on a probe of shape {shape} "
                         f"({type(e).__name__}); pass example_inputs= a batch it accepts") from None


def _probe(model: nn.Module) -> torch.Tensor:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            p = m.weight
            if isinstance(m, nn.Linear):
                return torch.zeros(1, m.in_features, device=p.device, dtype=p.dtype)
            spatial = (PROBE_SIZE,) * (p.dim() - 2)
            return torch.zeros(1, m.in_channels, *spatial, device=p.device, dtype=p.dtype)
    raise ConfigError(f"{type(model).__name__} has no Conv/Linear to size a probe input; pass example_inputs=")


def _role_size(mod: nn.Module, role: str) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features if role == "in" else mod.out_features
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return mod.num_features
    return mod.in_channels if role == "in" else mod.out_channels


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "norm"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if mod.groups == 1:
            return "dense"
        return "depthwise" if mod.groups == mod.in_channels == mod.out_channels else None
    return "dense" if isinstance(mod, nn.Linear) else None


def _check_group(group: ChannelGroup, model: nn.Module, name: str, width: int) -> dict[str, int]:
    """Refuse groups widening cannot follow; return the dense readers and their columns per channel."""
    if len(group) != width or any(group.frozen):
        raise UnsupportedError(
            f"the output channels of layer {name!r} reach the model's input or output (returned, or added "
            f"to the input); widening them would change what the model returns")
    sides: dict[tuple[str, str], int] = {}
    for ch in group.channels:
        for m in ch:
            sides[m.module, m.role] = sides.get((m.module, m.role), 0) + 1
    readers: dict[str, int] = {}
    for (mod_name, role), n in sorted(sides.items()):
        if mod_name == name:
            if role == "in":
                raise UnsupportedError(f"layer {name!r} reads its own output (called twice); cannot widen it")
            continue
        mod = get_module(model, mod_name)
        kind = _kind(mod)
        if kind is None:
            raise UnsupportedError(f"the output of layer {name!r} reaches {mod_name!r} ({type(mod).__name__}), "
                                   f"which widening does not follow (BatchNorm, depthwise conv, Conv, Linear)")
        if kind == "dense" and role == "out":
            raise UnsupportedError(
                f"the output of layer {name!r} meets that of {mod_name!r} in a residual add (or another "
                f"elementwise op); widening it needs the whole channel group")
        if n != _role_size(mod, role) or n % width:
            raise UnsupportedError(
                f"layer {mod_name!r} reads {_role_size(mod, role)} channels of which {n} come from {name!r} "
                f"(a concatenation); widening {name!r} alone would misalign them")
        if kind == "dense":
            readers[mod_name] = n // width
    for ch in group.channels:  # channel-major layout: channel i owns columns [i·mult, (i+1)·mult) of a reader
        i = next(m.index for m in ch if m.module == name)
        for m in ch:
            if m.index // readers.get(m.module, 1) != i:
                raise UnsupportedError(f"layer {m.module!r} reads the channels of {name!r} out of order "
                                       f"(a concatenation or reshuffle); cannot widen {name!r}")
    return readers


# --------------------------------------------------------------------------------------------------
# deepen

_ACT_FUNCS: dict[Any, type] = {F.relu: nn.ReLU, torch.relu: nn.ReLU, torch.relu_: nn.ReLU, F.relu_: nn.ReLU,
                               F.relu6: nn.ReLU6}
_ACT_METHODS: dict[str, type] = {"relu": nn.ReLU, "relu_": nn.ReLU}


def deepen(model: nn.Module, after: str, *, kind: str = "conv", kernel_size: int = 3) -> nn.Module:
    """A copy of ``model`` with an identity layer inserted after layer ``after``, same eval-mode function.

    ``after`` must be a ReLU/ReLU6/Hardtanh or be followed directly by one. ``kind="conv"`` inserts
    Conv2d(k×k, same padding, one-hot kernel) + identity BatchNorm2d + the activation; ``kind="linear"``
    an identity Linear + the activation. The new layers wrap the following (or the given) activation
    module in an ``nn.Sequential``, so other layers keep their names; in training mode the new BN uses
    batch statistics, so only eval mode is exact."""
    if kind not in ("conv", "linear"):
        raise ConfigError(f"kind must be 'conv' or 'linear', got {kind!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"kernel_size must be a positive odd int (same padding), got {kernel_size!r}")
    get_module(model, after)   # a clear error for an unknown name
    out = copy.deepcopy(model)
    gm = trace(out)
    node = _single_call(gm, after)
    act_node = node if _act_type(gm, node) is not None else _only_user(node)
    act_type = _act_type(gm, act_node) if act_node is not None else None
    if act_type is None:
        raise ConfigError(
            f"layer {after!r} is neither a ReLU-family activation (ReLU, ReLU6, Hardtanh) nor directly "
            f"followed by one; deepen needs act(act(x)) = act(x) to insert an identity layer exactly")
    act = copy.deepcopy(gm.get_submodule(str(act_node.target))) if act_node.op == "call_module" else act_type()
    width, ref = _channels(gm, node, kind, after)
    new = _identity_layers(kind, width, kernel_size, ref)
    training = get_module(out, after).training
    if act_node is not node and act_node.op == "call_module" and _calls(gm, str(act_node.target)) == 1:
        target = str(act_node.target)                            # X → [I, BN, act] → A
        block = nn.Sequential(*new, act, get_module(out, target))
    else:
        target = after                                           # X → [I, BN, act] (→ A)
        block = nn.Sequential(get_module(out, after), *new, act)
    set_module(out, target, block.train(training))
    return out


def _calls(gm: fx.GraphModule, name: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name)


def _single_call(gm: fx.GraphModule, name: str) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name]
    if not nodes and any(True for _ in gm.get_submodule(name).children()):
        raise ConfigError(f"layer {name!r} is a container ({type(gm.get_submodule(name)).__name__}); "
                          f"name the layer inside it after which to insert")
    if len(nodes) != 1:
        raise UnsupportedError(f"layer {name!r} is called {len(nodes)} times in forward (need exactly once, "
                               f"as a leaf module); cannot insert a layer after it")
    return nodes[0]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _act_type(gm: fx.GraphModule, node: fx.Node) -> type | None:
    """The module type of an idempotent activation node (ReLU, ReLU6, Hardtanh), else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return type(mod) if isinstance(mod, (nn.ReLU, nn.Hardtanh)) else None
    if node.op == "call_function":
        return _ACT_FUNCS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(str(node.target))
    return None


def _channels(gm: fx.GraphModule, node: fx.Node, kind: str, after: str) -> tuple[int, nn.Module]:
    """Walk back from ``node`` through weightless elementwise ops to the layer that sets its width."""
    cur: Any = node
    for _ in range(64):
        if not isinstance(cur, fx.Node):
            break
        if cur.op == "call_module":
            mod = gm.get_submodule(str(cur.target))
            spatial = isinstance(mod, (nn.Conv2d, nn.BatchNorm2d))
            if spatial or isinstance(mod, (nn.Linear, nn.BatchNorm1d)):
                if spatial != (kind == "conv"):
                    raise ConfigError(f"layer {after!r} outputs the channels of {cur.target!r} "
                                      f"({type(mod).__name__}); use kind={'conv' if spatial else 'linear'!r}")
                return _role_size(mod, "out"), mod
            if any(True for _ in mod.parameters(recurse=False)) or not cur.args:
                break
        elif not ((cur.op == "call_function" and cur.target in UNARY_FUNCS)
                  or (cur.op == "call_method" and cur.target in UNARY_METHODS)):
            break
        cur = cur.args[0] if cur.args else None
    raise UnsupportedError(f"cannot tell the width of layer {after!r}'s output: it is not produced by a "
                           f"Conv2d/Linear/BatchNorm through elementwise ops")


def _identity_layers(kind: str, width: int, k: int, ref: nn.Module) -> list[nn.Module]:
    p = next(ref.parameters(), None)
    if p is None:
        p = next(ref.buffers())
    dev, dt = p.device, p.dtype
    eye = torch.eye(width, device=dev, dtype=dt)
    if kind == "linear":
        lin = nn.Linear(width, width, device=dev, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(eye)
            lin.bias.zero_()
        return [lin]
    conv = nn.Conv2d(width, width, k, padding=k // 2, bias=False, device=dev, dtype=dt)
    bn = nn.BatchNorm2d(width, device=dev, dtype=dt)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, k // 2, k // 2] = eye      # (out, in, k, k): out channel c reads in channel c only
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(_identity_var(bn.eps, dt, dev))
    return [conv, bn]


def _identity_var(eps: float, dtype: torch.dtype, device: torch.device) -> float:
    """A running_var v (near 1 − eps) for which eval-mode BN computes x / sqrt(v + eps) == x exactly."""
    probe = torch.tensor([1.0, 3.0, -0.1, 1234.5678, 1e-3], dtype=dtype, device=device).view(1, 1, -1)
    one, zero = torch.ones(1, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)
    base = torch.tensor([1.0 - eps], dtype=dtype, device=device)
    for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        v = base.clone()
        for _ in range(abs(step)):
            v = torch.nextafter(v, v + (1 if step > 0 else -1))
        if v.item() > 0 and torch.equal(F.batch_norm(probe, zero, v, one, zero, False, 0.0, eps), probe):
            return float(v.item())
    raise UnsupportedError(f"no running_var makes BatchNorm(eps={eps}) an exact identity in {dtype}")
