"""Least-squares refit of the layers that read pruned channels (ThiNet's second step).

After channels are removed, each consumer layer ``W`` (conv or linear) is refit so that, on
calibration data, ``W' · X_pruned`` reproduces the *original* layer's output ``W · X_original``
(pre-bias) as closely as possible: ``W' = (XᵀX + λI)⁻¹ XᵀY`` on sampled output positions. The
statistics stream batch by batch, so memory is bounded by ``(C'·k)²``. Layers are refit in execution
order, each seeing the already-refit layers before it, which also absorbs upstream error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from efficientml.core.modules import get_module
from efficientml.prune.criteria import _capture, _columns
from efficientml.prune.surgery import ChannelPlan


@dataclass(frozen=True)
class RefitResult:
    layer: str
    error_before: float   # ‖Y − X·Wᵀ‖² / ‖Y‖² with the pruned layer's weights as they were
    error_after: float    # the same after the least-squares refit


def _one_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    _capture(model, [name], [(x, None)], lambda n, t: got.append(t), pre=True)
    return got[0]


@torch.no_grad()
def refit_layer(original: nn.Module, pruned: nn.Module, name: str, keep_out: list[int] | None,
                batches: list, positions: int = 1024, ridge: float = 1e-4, seed: int = 0) -> RefitResult:
    """Refit ``pruned``'s layer ``name`` to match ``original``'s output channels ``keep_out``."""
    mod_o, mod_p = get_module(original, name), get_module(pruned, name)
    w_o = mod_o.weight.detach().float().cpu().flatten(1)                 # (O, C·k)
    if keep_out is not None:
        w_o = w_o[torch.as_tensor(keep_out)]
    w_p = mod_p.weight.detach().float().cpu().flatten(1)                 # (O', C'·k)
    d = w_p.shape[1]
    xtx, xty, yty = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, w_p.shape[0], dtype=torch.float64), 0.0
    g = torch.Generator().manual_seed(seed)
    for x, _ in batches:
        cols_o = _columns(mod_o, _one_input(original, name, x)).flatten(1).cpu()   # (P, C·k)
        cols_p = _columns(mod_p, _one_input(pruned, name, x)).flatten(1).cpu()     # (P, C'·k), same P
        pick = torch.randint(cols_o.shape[0], (min(positions, cols_o.shape[0]),), generator=g)
        y = (cols_o[pick] @ w_o.T).double()                              # (P, O') original outputs
        xp = cols_p[pick].double()
        xtx += xp.T @ xp
        xty += xp.T @ y
        yty += float((y * y).sum())

    def err(w: torch.Tensor) -> float:  # ‖Y − XWᵀ‖² from the accumulated statistics, relative
        w = w.double()
        return float(yty - 2 * (w.T * xty).sum() + (w @ xtx * w).sum()) / max(yty, 1e-12)

    before = err(w_p)
    lam = ridge * float(xtx.diagonal().mean()) + 1e-12
    sol = torch.linalg.solve(xtx + lam * torch.eye(d, dtype=torch.float64), xty).T  # (O', C'·k)
    after = err(sol)
    if after < before:
        mod_p.weight.copy_(sol.to(mod_p.weight.dtype).reshape(mod_p.weight.shape))
    else:  # never make a layer worse
        after = before
    return RefitResult(name, before, after)


def refit_consumers(original: nn.Module, pruned: nn.Module, plan: ChannelPlan, batches: list,
                    positions: int = 1024) -> list[RefitResult]:
    """Refit every conv/linear (groups=1) whose input channels the plan removed, in execution order."""
    keep = plan.layer_keep()
    out = []
    for name in plan.graph.order:
        if name not in keep or keep[name][0] is None:
            continue
        mod = get_module(pruned, name)
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)) or getattr(mod, "groups", 1) != 1:
            continue
        out.append(refit_layer(original, pruned, name, keep[name][1], batches, positions))
    return out
