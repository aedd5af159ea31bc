"""Physical channel removal: new, smaller ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` modules.

A :class:`ChannelPlan` says which channels of each group of a :class:`DependencyGraph` survive; it
turns that into per-layer index lists (``keep_in``, ``keep_out``) and swaps every affected layer for
a freshly built one holding the selected slices. The result is a plain ``nn.Module``: no masks, no
hooks, nothing of ours needed to run, save or load it (``torch.save(model)`` works; a state dict
loads into the same architecture rebuilt with :func:`resize_like`).

``zero_out`` is the simulated twin: it zeroes the producing weights (and BN γ/β) of the removed
channels in place, which is how tests check surgery — both must give identical outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from efficientml.core.errors import ShapeError, UnsupportedError
from efficientml.core.modules import get_module, set_module
from efficientml.core.channels import CHANNEL_OPS
from efficientml.prune.graph import DependencyGraph
from efficientml.prune.shrink import shrink_batchnorm, shrink_conv, shrink_linear  # noqa: F401

Keep = tuple[list[int] | None, list[int] | None]   # (input channels kept, output channels kept)


# --------------------------------------------------------------------------------------------------
# plans


@dataclass
class ChannelPlan:
    """Which channels of each group survive: ``kept[group_id]`` lists channel positions in the group.

    Groups not in ``kept`` are untouched. With ``permute=True`` the listed order is kept (used by the
    channel sort by norm); otherwise each layer keeps its surviving channels in their original order."""

    graph: DependencyGraph
    kept: dict[int, list[int]] = field(default_factory=dict)
    permute: bool = False

    def removed(self) -> dict[int, list[int]]:
        out = {}
        for g in self.graph.groups:
            if g.id in self.kept:
                keep = set(self.kept[g.id])
                out[g.id] = [i for i in range(len(g)) if i not in keep]
        return out

    def layer_keep(self) -> dict[str, Keep]:
        """Per layer: the input and output channel indices that survive (``None``: all of them)."""
        picks: dict[tuple[str, str], list[int]] = {}
        for g in self.graph.groups:  # a layer side may span groups (after a concat): merge them
            for pos in self.kept.get(g.id, range(len(g))):
                for m in sorted(g.channels[pos], key=lambda m: m.index):
                    picks.setdefault((m.module, m.role), []).append(m.index)
        if not self.permute:
            picks = {k: sorted(v) for k, v in picks.items()}
        out: dict[str, Keep] = {}
        for (name, role), idx in picks.items():
            in_shape, out_shape = self.graph.shapes[name]
            full = (in_shape if role == "in" else out_shape)[1]
            if idx == list(range(full)):
                continue
            k_in, k_out = out.get(name, (None, None))
            out[name] = (idx, k_out) if role == "in" else (k_in, idx)
        return out

    def apply(self, model: nn.Module) -> nn.Module:
        """Swap every affected layer of ``model`` (the traced model or an identical copy) in place."""
        for name, (k_in, k_out) in self.layer_keep().items():
            module = get_module(model, name)
            op = CHANNEL_OPS.get(type(module))
            if op is None or op.shrink is None:
                raise UnsupportedError(f"layer {name!r} ({type(module).__name__}) has no shrink rule")
            set_module(model, name, op.shrink(module, k_in, k_out))
        return model

    @torch.no_grad()
    def zero_out(self, model: nn.Module) -> nn.Module:
        """Simulated pruning: zero the producing weights, biases and BN affine of removed channels."""
        for gid, removed in self.removed().items():
            g = self.graph.groups[gid]
            for pos in removed:
                for m in g.channels[pos]:
                    if m.role != "out":
                        continue
                    mod = get_module(model, m.module)
                    for p in ("weight", "bias"):
                        t = getattr(mod, p, None)
                        if isinstance(t, torch.Tensor) and t.dim() >= 1:
                            t[m.index] = 0
        return model

    # -- predictions (from shapes only, no model rebuilt) -----------------------------------------
    def predicted_params(self, model: nn.Module) -> int:
        keep = self.layer_keep()
        total = 0
        for name, mod in model.named_modules():
            own = list(mod.parameters(recurse=False))
            if not own:
                continue
            if name not in keep:
                total += sum(p.numel() for p in own)
                continue
            total += _params_after(mod, *keep[name])
        return total

    def predicted_macs(self) -> int:
        """Conv/linear MACs for the example input the graph was built with (biases not counted)."""
        keep = self.layer_keep()
        model = self.graph.model
        total = 0
        for name, (in_shape, out_shape) in self.graph.shapes.items():
            mod = get_module(model, name)
            k_in, k_out = keep.get(name, (None, None))
            cin = len(k_in) if k_in is not None else in_shape[1]
            cout = len(k_out) if k_out is not None else out_shape[1]
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                fan_in = (1 if depthwise else cin) * math.prod(mod.kernel_size)
                total += out_shape[0] * math.prod(out_shape[2:]) * cout * fan_in
            elif isinstance(mod, nn.Linear):
                total += math.prod(out_shape[:-1]) * cout * cin
        return total


def _params_after(mod: nn.Module, k_in: list[int] | None, k_out: list[int] | None) -> int:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        cout = len(k_out) if k_out is not None else (len(k_in) if depthwise and k_in is not None else mod.out_channels)
        cin = 1 if depthwise else (len(k_in) if k_in is not None else mod.in_channels)
        return cout * cin * math.prod(mod.kernel_size) + (cout if mod.bias is not None else 0)
    if isinstance(mod, nn.Linear):
        cout = len(k_out) if k_out is not None else mod.out_features
        cin = len(k_in) if k_in is not None else mod.in_features
        return cout * cin + (cout if mod.bias is not None else 0)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        c = len(k_out) if k_out is not None else mod.num_features
        return 2 * c if mod.affine else 0
    return sum(p.numel() for p in mod.parameters(recurse=False))


def channel_attrs(model: nn.Module) -> dict[str, list[int]]:
    """Channel counts of weightless layers that surgery changes (the ``attrs`` their channel op
    declares, e.g. option-A shortcuts' ``in_channels``/``out_channels``): saved beside a pruned state
    dict so :func:`resize_like` can restore them."""
    out = {}
    for name, m in model.named_modules():
        op = CHANNEL_OPS.get(type(m))
        if op is not None and op.attrs:
            out[name] = [int(getattr(m, a)) for a in op.attrs]
    return out


def resize_like(model: nn.Module, state: dict[str, torch.Tensor],
                attrs: dict[str, list[int]] | None = None) -> nn.Module:
    """Rebuild the conv/linear/BN layers of ``model`` at the shapes found in ``state`` (a pruned
    model's state dict), so ``model.load_state_dict(state)`` then fits; ``attrs`` (from
    :func:`channel_attrs`) restores weightless layers such as option-A shortcuts."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and f"{name}.weight" in state:
            w = state[f"{name}.weight"]
            if tuple(w.shape) == tuple(mod.weight.shape):
                continue
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            cin = w.shape[0] if depthwise else w.shape[1]
            new = type(mod)(cin, w.shape[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                            w.shape[0] if depthwise else 1, mod.bias is not None, mod.padding_mode)
            set_module(model, name, new)
        elif isinstance(mod, nn.Linear) and f"{name}.weight" in state:
            w = state[f"{name}.weight"]
            if tuple(w.shape) != tuple(mod.weight.shape):
                set_module(model, name, nn.Linear(w.shape[1], w.shape[0], mod.bias is not None))
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            key = f"{name}.running_mean" if f"{name}.running_mean" in state else f"{name}.weight"
            if key in state and state[key].shape[0] != mod.num_features:
                set_module(model, name, type(mod)(state[key].shape[0], mod.eps, mod.momentum, mod.affine,
                                                  mod.track_running_stats))
    for name, values in (attrs or {}).items():
        mod = get_module(model, name)
        op = CHANNEL_OPS.get(type(mod))
        names = op.attrs if op is not None and op.attrs else ("in_channels", "out_channels")
        if len(values) != len(names):
            raise ShapeError(f"saved channel attributes {values} of layer {name!r} do not match "
                             f"its {len(names)} attributes {names}")
        for a, v in zip(names, values):
            setattr(mod, a, int(v))
    return model
