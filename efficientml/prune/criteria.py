"""Importance criteria, pluggable through :data:`CRITERIA`.

A criterion scores weights (``element_scores``: a tensor shaped like the weight, for fine/pattern/N:M/
vector/kernel masks, whose group scores are sums of element scores) and/or channels
(``channel_scores``: one number per channel of a dependency-graph group). Larger = more important.

=============  ==========================================================================  ========
name           what it measures                                                             data
=============  ==========================================================================  ========
``l1``         ``|w|``; a channel sums its producing rows (conv/linear out, depthwise)       no
``l2``         ``w²`` (ranks like the L2 norm); for Linear producers this is neuron pruning no
``bn_gamma``   ``|γ|`` of the channel's BatchNorm(s) (network slimming; pair with            no
               :func:`bn_l1_penalty` during training)
``taylor``     OBD saliency ``½·F·w²`` with the Fisher diagonal ``F = E[g²]`` from            yes
               calibration batches (a Hessian-diagonal estimate); channels add γ, β too
``apoz``       ``1 − APoZ``: share of positive post-BN activations on calibration data      yes
``thinet``     greedy ThiNet order: channels whose removal least changes the next layer's    yes
               output go first (pair with the least-squares refit in :mod:`refit`)
``input_l2``   Frobenius norm of the next layer's input-channel slices (channel-sort key)    no
``first``      keep the first channels (the unsorted baseline)                              no
=============  ==========================================================================  ========

Register your own: ``CRITERIA.register("mine", MyCriterion())`` with the same two methods.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.core.modules import get_module
from efficientml.core.registry import Registry
from efficientml.prune.graph import ChannelGroup

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def calib_batches(data: Iterable | None, n: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The first ``n`` batches of ``data`` as (x, y) pairs (y may be None)."""
    if data is None:
        return []
    out = []
    for batch in data:
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        out.append((x, y))
        if len(out) >= n:
            break
    return out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Criterion:
    """Base criterion: element scores from :meth:`element`, channels sum their producing rows."""

    name = "criterion"
    needs_data = False
    channel_only = False

    def prepare(self, model: nn.Module, batches: list, graph: Any = None) -> dict:
        return {}

    def element(self, name: str, module: nn.Module, state: dict) -> torch.Tensor:
        raise ConfigError(f"criterion {self.name!r} ranks whole channels; use it with method='channel'")

    def element_scores(self, name: str, module: nn.Module, state: dict) -> torch.Tensor:
        if self.channel_only:
            raise ConfigError(f"criterion {self.name!r} ranks whole channels; use it with method='channel'")
        return self.element(name, module, state)

    def channel_scores(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        scores = torch.zeros(len(group))
        rows: dict[str, torch.Tensor] = {}
        for i, ch in enumerate(group.channels):
            for m in ch:
                if m.role != "out":
                    continue
                mod = get_module(model, m.module)
                if not isinstance(mod, _WEIGHTED):
                    continue
                if m.module not in rows:
                    e = self.element(m.module, mod, state).detach().float()
                    rows[m.module] = e.reshape(e.shape[0], -1).sum(dim=1).cpu()
                scores[i] += rows[m.module][m.index]
        return scores


class Magnitude(Criterion):
    def __init__(self, p: int):
        self.p = p
        self.name = f"l{p}"

    def element(self, name: str, module: nn.Module, state: dict) -> torch.Tensor:
        w = module.weight.detach()
        return w.abs() if self.p == 1 else w.pow(2)


class BNScaling(Criterion):
    name = "bn_gamma"
    channel_only = True

    def channel_scores(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        scores = torch.zeros(len(group))
        found = False
        for i, ch in enumerate(group.channels):
            gammas = [get_module(model, m.module).weight.detach()[m.index].abs().item()
                      for m in ch if m.role == "out" and isinstance(get_module(model, m.module), _BN)
                      and get_module(model, m.module).affine]
            if gammas:
                found = True
                scores[i] = sum(gammas) / len(gammas)
        if not found:
            raise ConfigError(f"criterion 'bn_gamma' needs a BatchNorm after layer {group.name!r}; "
                              f"that group has none")
        return scores


def bn_l1_penalty(strength: float = 1e-4) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Network slimming's sparsity term ``λ·Σ|γ|`` over every BatchNorm, as ``fit(extra_loss=…)``."""
    if strength < 0:
        raise ConfigError(f"the L1 penalty on BatchNorm γ must be ≥ 0, got {strength}")

    def extra_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gammas = [m.weight.abs().sum() for m in model.modules() if isinstance(m, _BN) and m.affine]
        return strength * torch.stack(gammas).sum() if gammas else logits.new_zeros(())

    return extra_loss


class TaylorFisher(Criterion):
    """Second-order (OBD) saliency ½·F·w², F the empirical Fisher diagonal (mean squared gradient)."""

    name = "taylor"
    needs_data = True

    def prepare(self, model: nn.Module, batches: list, graph: Any = None) -> dict:
        if not batches or batches[0][1] is None:
            raise ConfigError("criterion 'taylor' needs labelled calibration batches (x, y)")
        was = model.training
        model.eval()  # BN uses running statistics: scoring must not change the model
        dev = _device(model)
        fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():  # also when the caller scores under torch.no_grad()
                F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / len(batches)
        model.zero_grad(set_to_none=True)
        model.train(was)
        return {"fisher": fisher}

    def _saliency(self, name: str, param: str, t: torch.Tensor, state: dict) -> torch.Tensor:
        f = state["fisher"].get(f"{name}.{param}" if name else param)
        return 0.5 * (f if f is not None else torch.zeros_like(t)) * t.detach() ** 2

    def element(self, name: str, module: nn.Module, state: dict) -> torch.Tensor:
        return self._saliency(name, "weight", module.weight, state)

    def channel_scores(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        scores = super().channel_scores(model, group, state)
        for i, ch in enumerate(group.channels):
            for m in ch:
                mod = get_module(model, m.module)
                if m.role == "out" and isinstance(mod, _BN) and mod.affine:
                    for p in ("weight", "bias"):
                        scores[i] += self._saliency(m.module, p, getattr(mod, p), state)[m.index].item()
        return scores


def _capture(model: nn.Module, names: list[str], batches: list, fn: Callable, pre: bool = False) -> None:
    """Run ``batches`` through ``model`` (eval mode) calling ``fn(name, tensor)`` on each named
    layer's output (or input with ``pre``)."""
    hooks = []
    for name in names:
        mod = get_module(model, name)
        if pre:
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: fn(n, a[0].detach())))
        else:
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: fn(n, o.detach())))
    was = model.training
    model.eval()
    dev = _device(model)
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x.to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)


class APoZ(Criterion):
    """1 − average percentage of zeros after the ReLU (measured as BN outputs ≤ 0)."""

    name = "apoz"
    needs_data = True
    channel_only = True

    def prepare(self, model: nn.Module, batches: list, graph: Any = None) -> dict:
        if not batches:
            raise ConfigError("criterion 'apoz' needs calibration batches")
        names = [n for n, m in model.named_modules() if isinstance(m, _BN + _WEIGHTED)]
        zeros: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def rec(name: str, out: torch.Tensor) -> None:
            per = (out <= 0).float().transpose(0, 1).reshape(out.shape[1], -1)  # (C, B·H·W)
            zeros[name] = zeros.get(name, 0) + per.sum(dim=1).cpu()
            counts[name] = counts.get(name, 0) + per.shape[1]

        _capture(model, names, batches, rec)
        return {"apoz": {n: zeros[n] / counts[n] for n in zeros}}

    def channel_scores(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        apoz = state["apoz"]
        scores = torch.zeros(len(group))
        for i, ch in enumerate(group.channels):
            outs = [m for m in ch if m.role == "out" and m.module in apoz]
            bns = [m for m in outs if isinstance(get_module(model, m.module), _BN)] or outs
            if bns:
                scores[i] = 1.0 - sum(apoz[m.module][m.index].item() for m in bns) / len(bns)
        return scores


class ThiNet(Criterion):
    """Greedy ThiNet selection: remove first the channels whose contributions to the next layers'
    outputs sum closest to zero (the smallest reconstruction error, Luo et al. 2017, Alg. 1)."""

    name = "thinet"
    needs_data = True
    channel_only = True

    def __init__(self, positions: int = 128, rows: int = 4096, seed: int = 0):
        self.positions, self.rows, self.seed = positions, rows, seed

    def prepare(self, model: nn.Module, batches: list, graph: Any = None) -> dict:
        if not batches:
            raise ConfigError("criterion 'thinet' needs calibration batches")
        names = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED)
                 and getattr(m, "groups", 1) == 1]
        g = torch.Generator().manual_seed(self.seed)
        patches: dict[str, list[torch.Tensor]] = {}

        def rec(name: str, x: torch.Tensor) -> None:
            mod = get_module(model, name)
            cols = _columns(mod, x)                                 # (positions, C, k)
            pick = torch.randint(cols.shape[0], (min(self.positions, cols.shape[0]),), generator=g)
            patches.setdefault(name, []).append(cols[pick].cpu())

        _capture(model, names, batches, rec, pre=True)
        return {"patches": {n: torch.cat(v) for n, v in patches.items()}}

    def contributions(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        """(rows, channels): each sampled output value split into per-channel contributions."""
        g = torch.Generator().manual_seed(self.seed)
        blocks = []
        for name in group.consumers:
            mod = get_module(model, name)
            if name not in state["patches"] or not isinstance(mod, _WEIGHTED) or getattr(mod, "groups", 1) != 1:
                continue
            x = state["patches"][name]                               # (P, C, k)
            w = mod.weight.detach().cpu().reshape(mod.weight.shape[0], mod.weight.shape[1], -1)
            z = torch.einsum("pck,ock->poc", x, w).reshape(-1, x.shape[1])  # (P·O, C)
            if z.shape[0] > self.rows:
                z = z[torch.randperm(z.shape[0], generator=g)[: self.rows]]
            a = torch.zeros(z.shape[0], len(group))
            for i, ch in enumerate(group.channels):
                for m in ch:
                    if m.module == name and m.role == "in":
                        a[:, i] += z[:, m.index]
            blocks.append(a)
        if not blocks:
            raise ConfigError(f"criterion 'thinet' needs a conv or linear layer consuming the channels "
                              f"of {group.name!r}")
        return torch.cat(blocks)

    def channel_scores(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        a = self.contributions(model, group, state).double()
        n = a.shape[1]
        col_sq = (a * a).sum(dim=0)
        running = torch.zeros(a.shape[0], dtype=torch.float64)
        removed = torch.zeros(n, dtype=torch.bool)
        removed[torch.tensor(group.frozen, dtype=torch.bool)] = True  # never candidates
        scores = torch.full((n,), float(n))
        for step in range(int((~removed).sum())):
            # ‖running + a_c‖² = ‖running‖² + 2·running·a_c + ‖a_c‖²; pick the smallest increase
            cost = 2 * (running @ a) + col_sq
            cost[removed] = float("inf")
            c = int(cost.argmin())
            removed[c] = True
            running += a[:, c]
            scores[c] = step
        return scores


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input patches a layer multiplies with its weight: (positions, C_in, kernel area)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(-1)
        ks, st, pad, dil = (mod.kernel_size[0], 1), (mod.stride[0], 1), (mod.padding[0], 0), (mod.dilation[0], 1)
    else:
        ks, st, pad, dil = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    if isinstance(pad, str):
        raise ConfigError(f"layers with padding={pad!r} are not supported by this criterion")
    cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)     # (B, C·k, L)
    b, ck, L = cols.shape
    c = x.shape[1]
    return cols.transpose(1, 2).reshape(b * L, c, ck // c)


class InputNorm(Criterion):
    """The channel-sort key: the Frobenius norm of the next layers' weight slices reading each channel."""

    name = "input_l2"
    channel_only = True

    def channel_scores(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        scores = torch.zeros(len(group))
        for i, ch in enumerate(group.channels):
            for m in ch:
                mod = get_module(model, m.module)
                if m.role == "in" and isinstance(mod, _WEIGHTED) and getattr(mod, "groups", 1) == 1:
                    scores[i] += mod.weight.detach()[:, m.index].pow(2).sum().item()
        return scores.sqrt()


class First(Criterion):
    """Keep the first channels, drop the last (the unsorted baseline)."""

    name = "first"
    channel_only = True

    def channel_scores(self, model: nn.Module, group: ChannelGroup, state: dict) -> torch.Tensor:
        return -torch.arange(len(group), dtype=torch.float32)


CRITERIA: Registry[Criterion] = Registry("pruning criterion")
for _c in (Magnitude(1), Magnitude(2), BNScaling(), TaylorFisher(), APoZ(), ThiNet(), InputNorm(), First()):
    CRITERIA.register(_c.name, _c)
