"""Per-layer sensitivity: accuracy vs sparsity for each layer alone, and ratios chosen from it.

    scan = sensitivity_scan(model, lambda m: evaluate(m, val)["accuracy"], sparsities=(0.4, 0.6, 0.8))
    plot_sensitivity(scan, "sens.png")                      # matplotlib, imported here only
    per_layer = choose_sparsities(scan, max_drop=1.0)       # each layer's largest safe sparsity
    per_layer = allocate_by_params(scan, model, target=0.75)  # hit a total sparsity, cheapest first

The scan prunes one layer at a time (fine-grained L2 by default) without fine-tuning and restores it.

Channel pruning has its own report, one entry per dependency-graph group (the channels that must go
together: a residual stream, an expand conv's outputs through its depthwise conv), measured before
committing to any ratio:

    rep = group_sensitivity(model, x, calib, ratios=(0.1, 0.3, 0.5), criterion="thinet")
    print(rep.table())                                   # metric and logits SQNR per group and ratio
    cfg = PruneConfig(method="channel", sparsity=0.0, criterion="thinet",
                      per_layer=choose_group_ratios(rep, max_drop=2.0))

Each group is pruned alone (a copy of the model) and scored on the calibration batches: accuracy when
they carry labels, else top-1 agreement with the unpruned model (both in %), plus the logits' SQNR
against the unpruned model (output fidelity). Pruned together, the chosen ratios' drops compound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.core.errors import ConfigError
from efficientml.core.modules import get_module
from efficientml.prune.config import PruneConfig


@dataclass
class SensitivityScan:
    dense_accuracy: float
    sparsities: list[float]
    accuracy: dict[str, list[float]] = field(default_factory=dict)   # layer → accuracy per sparsity
    params: dict[str, int] = field(default_factory=dict)              # layer → weight count

    def to_dict(self) -> dict:
        return {"dense_accuracy": self.dense_accuracy, "sparsities": self.sparsities,
                "accuracy": self.accuracy, "params": self.params}


@torch.no_grad()
def sensitivity_scan(model: nn.Module, accuracy: Callable[[nn.Module], float],
                     sparsities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9), method: str = "fine",
                     criterion: str = "l2", layers: tuple[str, ...] = ()) -> SensitivityScan:
    """Accuracy with each layer pruned alone at each sparsity (weights restored afterwards)."""
    from efficientml.prune.apply import compute_masks

    for s in sparsities:
        check_range("sparsity", s, 0.0, 1.0, hi_open=True)
    names = list(layers) or [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    scan = SensitivityScan(accuracy(model), list(sparsities))
    for name in names:
        w = get_module(model, name).weight
        saved = w.detach().clone()
        scan.params[name] = w.numel()
        accs = []
        for s in sparsities:
            masks, _ = compute_masks(model, PruneConfig(method=method, sparsity=s, criterion=criterion),
                                     filter=(name,))
            w.mul_(masks[name])
            accs.append(accuracy(model))
            w.copy_(saved)
        scan.accuracy[name] = accs
    return scan


def choose_sparsities(scan: SensitivityScan, max_drop: float) -> dict[str, float]:
    """For each layer, the largest scanned sparsity whose accuracy drop is ≤ ``max_drop`` points
    (and every smaller sparsity's is too); 0 when none is."""
    if max_drop < 0:
        raise ConfigError(f"max_drop must be ≥ 0 accuracy points, got {max_drop}")
    out = {}
    for name, accs in scan.accuracy.items():
        best = 0.0
        for s, a in zip(scan.sparsities, accs):
            if scan.dense_accuracy - a > max_drop:
                break
            best = s
        out[name] = best
    return out


def allocate_by_params(scan: SensitivityScan, target: float) -> dict[str, float]:
    """Parameter-count-aware allocation: raise one layer's sparsity a grid step at a time, always
    the step costing the least accuracy per weight removed, until ``target`` of all scanned weights
    are gone. Big, insensitive layers absorb most of the pruning."""
    check_range("target sparsity", target, 0.0, 1.0, hi_open=True)
    grid = [0.0] + list(scan.sparsities)
    acc = {n: [scan.dense_accuracy] + a for n, a in scan.accuracy.items()}
    level = {n: 0 for n in scan.accuracy}
    total = sum(scan.params.values())
    removed = 0.0
    while removed < target * total:
        best, best_cost = None, float("inf")
        for n, k in level.items():
            if k + 1 >= len(grid):
                continue
            dw = (grid[k + 1] - grid[k]) * scan.params[n]
            cost = max(0.0, acc[n][k] - acc[n][k + 1]) / dw
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            raise ConfigError(f"cannot reach sparsity {target}: the scan's largest sparsities remove "
                              f"only {removed / total:.3f} of the weights")
        removed += (grid[level[best] + 1] - grid[level[best]]) * scan.params[best]
        level[best] += 1
    return {n: grid[k] for n, k in level.items()}


def plot_sensitivity(scan: SensitivityScan, path: str, title: str = "per-layer sensitivity") -> str:
    """Accuracy vs sparsity per layer, one panel each, saved as PNG."""
    from efficientml.core.lazy import optional_import

    optional_import("matplotlib", "plot", "sensitivity plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(scan.accuracy)
    cols = min(4, max(1, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, accs) in zip(axes.flat, scan.accuracy.items()):
        ax.plot(scan.sparsities, accs, "o-")
        ax.axhline(scan.dense_accuracy, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{name} ({scan.params[name]:,} w)", fontsize=8)
        ax.set_xlabel("sparsity", fontsize=7)
        ax.set_ylabel("accuracy %", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    from efficientml.core.serialization import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


@dataclass
class GroupSensitivity:
    """Per channel group: its size and, per ratio, the metric, logits SQNR and parameters removed."""

    criterion: str
    metric: str                       # "accuracy", "agreement" or the name of a user's metric
    baseline: float
    ratios: list[float]
    groups: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "metric": self.metric, "baseline": self.baseline,
                "ratios": self.ratios, "groups": self.groups}

    def table(self) -> str:
        """A Markdown table: one row per group, ``metric / SQNR dB`` per ratio."""
        head = "| group | channels | " + " | ".join(f"{r:g}" for r in self.ratios) + " |"
        rows = [head, "|" + "---|" * (2 + len(self.ratios))]
        for name, g in self.groups.items():
            cells = [f"{m:.1f} / {s:.1f}" for m, s in zip(g["metric"], g["sqnr_db"])]
            rows.append(f"| {name} | {g['prunable']}/{g['channels']} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _score(model: nn.Module, batches: list, ref: list[torch.Tensor], metric: Callable | None) -> tuple[float, float]:
    from efficientml.analysis.metrics import sqnr

    model.eval()
    with torch.no_grad():
        outs = [model(x) for x, _ in batches]
    db = sqnr(torch.cat(ref), torch.cat(outs))
    if metric is not None:
        return float(metric(model)), db
    labelled = all(y is not None for _, y in batches)
    hits = sum(int((o.argmax(1) == (y if labelled else r.argmax(1))).sum()) for o, r, (_, y) in zip(outs, ref, batches))
    return 100.0 * hits / sum(o.shape[0] for o in outs), db


def group_sensitivity(model: nn.Module, example_inputs: torch.Tensor, calib: Iterable,
                      ratios: tuple[float, ...] = (0.1, 0.3, 0.5), criterion: str = "l2",
                      metric: Callable[[nn.Module], float] | None = None, calib_batches: int = 4,
                      groups: tuple[str, ...] = ()) -> GroupSensitivity:
    """Prune each channel group alone at each ratio (without fine-tuning) and score it; ``groups``
    limits the report to groups named by one of their producing layers."""
    from efficientml.prune.apply import prune
    from efficientml.prune.criteria import calib_batches as take
    from efficientml.prune.graph import DependencyGraph

    for r in ratios:
        check_range("ratio", r, 0.0, 1.0, lo_open=True, hi_open=True)
    batches = take(calib, calib_batches)
    if not batches:
        raise ConfigError("group_sensitivity needs calibration batches: pass calib=<loader or list of (x, y)>")
    model.eval()
    with torch.no_grad():
        ref = [model(x) for x, _ in batches]
    base, _ = _score(model, batches, ref, metric)
    graph = DependencyGraph.build(model, example_inputs, on_unsupported="skip")
    name = "accuracy" if all(y is not None for _, y in batches) else "agreement"
    rep = GroupSensitivity(criterion, getattr(metric, "__name__", "metric") if metric else name, base, list(ratios))
    known = {p for g in graph.groups for p in g.producers}
    for wanted in groups:
        if wanted not in known:
            raise ConfigError(f"no channel group is produced by layer {wanted!r}; "
                              f"producers are: {', '.join(sorted(known))}")
    for g in graph.groups:
        if g.prunable == 0 or (groups and not set(groups) & set(g.producers)):
            continue
        entry = {"channels": len(g), "prunable": g.prunable, "producers": g.producers,
                 "metric": [], "sqnr_db": [], "params_removed": []}
        for r in ratios:
            cfg = PruneConfig(method="channel", sparsity=0.0, criterion=criterion, on_unsupported="skip",
                              per_layer=((g.name, r),), calib_batches=calib_batches)
            pruned = prune(model, cfg, example_inputs=example_inputs, calib=batches).model
            m, db = _score(pruned, batches, ref, metric)
            entry["metric"].append(m)
            entry["sqnr_db"].append(db)
            entry["params_removed"].append(_n_params(model) - _n_params(pruned))
        rep.groups[g.name] = entry
    return rep


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def choose_group_ratios(report: GroupSensitivity, max_drop: float) -> tuple[tuple[str, float], ...]:
    """``PruneConfig.per_layer`` entries: each group's largest ratio whose metric drop is ≤ ``max_drop``
    points (and every smaller ratio's is too); groups with none are left out (ratio 0)."""
    if max_drop < 0:
        raise ConfigError(f"max_drop must be ≥ 0 points, got {max_drop}")
    out = []
    for name, g in report.groups.items():
        best = 0.0
        for r, m in zip(report.ratios, g["metric"]):
            if report.baseline - m > max_drop:
                break
            best = r
        if best > 0:
            out.append((name, best))
    return tuple(out)
