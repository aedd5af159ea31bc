"""NetAdapt (Yang et al. 2018): shrink a network until its *measured* latency meets a target.

1. A latency lookup table is measured on this machine: every conv/linear layer alone, at the model's
   activation shape and batch size, for a grid of (input, output) channel counts; estimates between
   grid points are bilinear. The model's estimate is the sum over layers plus a constant (the rest of
   the network), calibrated against one full measurement.
2. Each iteration asks for a latency drop ``ΔR_i`` (``initial_step · L₀ · decay^i``). For every
   channel group, the smallest number of channels whose removal (lowest L2 first) meets ``ΔR_i`` by
   the table is removed, giving one candidate per group; each candidate is fine-tuned for a few
   steps and scored on held-out data; the most accurate candidate is kept and measured.
3. When the measured latency is at or below ``target_ratio · L₀`` the loop stops; a long fine-tune
   follows (by the caller, or ``final_epochs`` here).

Every iteration is recorded (group chosen, channels, estimated and measured latency, accuracy).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError
from efficientml.core.modules import get_module
from efficientml.prune.criteria import CRITERIA
from efficientml.prune.graph import DependencyGraph
from efficientml.prune.surgery import ChannelPlan


@dataclass(frozen=True)
class NetAdaptConfig(Config):
    kind = "netadapt"

    target_ratio: float = 0.5        # final latency / initial latency
    initial_step: float = 0.08       # first iteration's latency drop, as a fraction of L₀
    step_decay: float = 0.98
    batch_size: int = 64             # latency is measured at this batch size …
    threads: int = 2                 # … with this many threads
    grid: int = 6                    # channel counts per layer side in the lookup table
    short_steps: int = 20            # fine-tune steps per candidate
    short_lr: float = 0.01
    eval_batches: int = 4            # held-out batches scoring a candidate
    max_iterations: int = 30
    criterion: str = "l2"
    runs: int = 10                   # timed runs per latency measurement
    final_epochs: float = 0.0        # long fine-tune at the end (0: leave it to the caller)
    final_lr: float = 0.01
    lookup: str = "measured"         # "measured" here, or "macs" (a theoretical table, for tests)

    def validate(self) -> None:
        check_range("target_ratio", self.target_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("initial_step", self.initial_step, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("step_decay", self.step_decay, 0.0, 1.0, lo_open=True)
        for name in ("batch_size", "threads", "grid", "max_iterations", "runs", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lookup not in ("measured", "macs"):
            raise ConfigError(f"lookup must be 'measured' or 'macs', got {self.lookup!r}")
        if self.grid < 2:
            raise ConfigError(f"grid must be ≥ 2 channel counts per side, got {self.grid}")


class LatencyTable:
    """Per-layer latency (ms) on a grid of (c_in, c_out), measured here; bilinear in between."""

    def __init__(self, model: nn.Module, graph: DependencyGraph, batch_size: int, threads: int,
                 grid: int, runs: int, measured: bool = True):
        from efficientml.analysis import measure_latency

        self.kind = "measured" if measured else "theoretical (MACs / 1e6)"
        self.table: dict[str, dict[str, Any]] = {}
        for name in graph.order:
            mod = get_module(model, name)
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            in_shape = graph.shapes[name][0]
            cin, cout = _channels(mod)
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1
            ins = _grid(cin, grid)
            outs = ins if depthwise else _grid(cout, grid)
            ms = torch.zeros(len(ins), len(outs))
            for i, ci in enumerate(ins):
                for j, co in enumerate(outs):
                    if depthwise and i != j:
                        continue
                    layer = _layer_like(mod, ci, co)
                    x = torch.randn(batch_size, ci, *in_shape[2:])
                    if measured:
                        ms[i, j] = measure_latency(layer, x, warmup=2, runs=runs, threads=threads).median_ms
                    else:
                        fan_in = 1 if depthwise else ci
                        k = layer.weight[0].numel() // max(1, layer.weight.shape[1]) if isinstance(layer, nn.Conv2d) else 1
                        out_hw = graph.shapes[name][1][2:]
                        ms[i, j] = batch_size * co * fan_in * k * float(torch.tensor(out_hw).prod()) / 1e6
            self.table[name] = {"in": ins, "out": outs, "ms": ms, "depthwise": depthwise}

    def layer(self, name: str, cin: int, cout: int) -> float:
        t = self.table[name]
        if t["depthwise"]:
            return float(_interp1(t["in"], t["ms"].diagonal(), cin))
        return float(_interp2(t["in"], t["out"], t["ms"], cin, cout))

    def estimate(self, counts: dict[str, tuple[int, int]]) -> float:
        return sum(self.layer(n, *counts[n]) for n in self.table if n in counts)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind,
                "layers": {n: {"in": t["in"], "out": t["out"], "ms": t["ms"].tolist()} for n, t in self.table.items()}}


def _channels(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return mod.in_channels, mod.out_channels


def _grid(c: int, n: int) -> list[int]:
    return sorted({max(1, round(c * (k + 1) / n)) for k in range(n)})


def _layer_like(mod: nn.Module, cin: int, cout: int) -> nn.Module:
    if isinstance(mod, nn.Linear):
        return nn.Linear(cin, cout, mod.bias is not None)
    depthwise = mod.groups > 1
    return nn.Conv2d(cin, cin if depthwise else cout, mod.kernel_size, mod.stride, mod.padding,
                     mod.dilation, cin if depthwise else 1, mod.bias is not None)


def _interp1(xs: list[int], ys: torch.Tensor, x: float) -> float:
    if x <= xs[0]:
        return float(ys[0]) * x / xs[0]
    for k in range(len(xs) - 1):
        if x <= xs[k + 1]:
            t = (x - xs[k]) / (xs[k + 1] - xs[k])
            return float(ys[k] * (1 - t) + ys[k + 1] * t)
    return float(ys[-1])


def _interp2(xs: list[int], ys: list[int], z: torch.Tensor, x: float, y: float) -> float:
    rows = torch.tensor([_interp1(ys, z[i], y) for i in range(len(xs))])
    return _interp1(xs, rows, x)


@dataclass
class NetAdaptResult:
    model: nn.Module
    initial_latency_ms: float
    final_latency_ms: float
    iterations: list[dict[str, Any]] = field(default_factory=list)
    table: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_reduction(self) -> float:
        return self.initial_latency_ms / self.final_latency_ms


def _counts(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    return {n: _channels(get_module(model, n)) for n in names}


def _measure(model: nn.Module, x: torch.Tensor, cfg: NetAdaptConfig) -> float:
    from efficientml.analysis import measure_latency

    return measure_latency(model, x, warmup=3, runs=cfg.runs, threads=cfg.threads).median_ms


def netadapt(model: nn.Module, config: NetAdaptConfig, sample_shape: tuple[int, ...],
             train_loader: Iterable, holdout_loader: Iterable, log: Any = None) -> NetAdaptResult:
    """Run NetAdapt on a copy of ``model``; ``sample_shape`` is one input without the batch dim."""
    from efficientml.train import TrainConfig, fit

    model = copy.deepcopy(model)
    x = torch.randn(config.batch_size, *sample_shape)
    example = torch.randn(2, *sample_shape)
    graph = DependencyGraph.build(model, example)
    t0 = time.perf_counter()
    table = LatencyTable(model, graph, config.batch_size, config.threads, config.grid, config.runs,
                         measured=config.lookup == "measured")
    lut_seconds = time.perf_counter() - t0
    l0 = _measure(model, x, config) if config.lookup == "measured" else table.estimate(_counts(model, table.table))
    lut0 = table.estimate(_counts(model, table.table))
    offset = l0 - lut0
    target = config.target_ratio * l0
    criterion = CRITERIA.get(config.criterion)
    short = TrainConfig(epochs=1.0, lr=config.short_lr, schedule="constant", max_steps=config.short_steps,
                        weight_decay=0.0, warmup_frac=0.0)
    result = NetAdaptResult(model, l0, l0, table={"seconds": lut_seconds, **table.to_dict()})
    current = l0
    for it in range(config.max_iterations):
        if current <= target:
            break
        graph = DependencyGraph.build(model, example)
        counts = _counts(model, table.table)
        est_now = offset + table.estimate(counts)
        # requests are shares of the latency the table attributes to layers: on a busy machine the
        # full-model measurement L₀ can be inflated far beyond it, and no layer could ever meet it
        want = config.initial_step * lut0 * config.step_decay ** it
        best = _best_candidate(model, graph, table, counts, est_now - offset, want, criterion, config,
                               train_loader, holdout_loader, short, offset)
        while best is None and want > 1e-3 * lut0:  # no group can give that much: ask for half
            want /= 2
            best = _best_candidate(model, graph, table, counts, est_now - offset, want, criterion, config,
                                   train_loader, holdout_loader, short, offset)
        if best is None:
            break
        acc, model, info = best
        current = _measure(model, x, config) if config.lookup == "measured" else info["estimated_latency_ms"]
        info.update({"iteration": it + 1, "requested_drop_ms": want, "measured_latency_ms": current,
                     "accuracy": acc})
        result.iterations.append(info)
        if log is not None:
            log(info)
    if config.final_epochs > 0:
        fit(model, train_loader, TrainConfig(epochs=config.final_epochs, lr=config.final_lr,
                                             schedule="cosine", warmup_frac=0.0), progress=False)
    result.model, result.final_latency_ms = model, current
    return result


def _best_candidate(model: nn.Module, graph: DependencyGraph, table: LatencyTable, counts: dict,
                    est_layers: float, want: float, criterion: Any, config: NetAdaptConfig,
                    train_loader: Iterable, holdout_loader: Iterable, short: Any, offset: float
                    ) -> tuple[float, nn.Module, dict] | None:
    """One candidate per group (fewest channels meeting ``want``), each briefly fine-tuned; the most
    accurate on held-out data wins."""
    from efficientml.train import evaluate, fit

    best: tuple[float, nn.Module, dict] | None = None
    for g in graph.groups:
        if g.prunable <= 1 or len(set(g.partition)) > 1:
            continue
        free = [i for i in range(len(g)) if not g.frozen[i]]
        scores = criterion.channel_scores(model, g, {})
        order = sorted(free, key=lambda i: (float(scores[i]), i))
        k = _channels_needed(g, counts, table, est_layers, want, len(free))
        if k is None:
            continue
        removed = set(order[:k])
        plan = ChannelPlan(graph, {g.id: [i for i in range(len(g)) if i not in removed]})
        cand = plan.apply(copy.deepcopy(model))
        fit(cand, train_loader, short, progress=False)
        acc = evaluate(cand, holdout_loader, max_batches=config.eval_batches)["accuracy"]
        info = {"group": g.name, "channels_before": len(g), "channels_after": len(g) - k,
                "estimated_latency_ms": offset + table.estimate(_counts(cand, table.table)),
                "candidate_accuracy": acc}
        if best is None or acc > best[0]:
            best = (acc, cand, info)
    return best


def _channels_needed(group: Any, counts: dict[str, tuple[int, int]], table: LatencyTable,
                     est_layers: float, want: float, n_free: int) -> int | None:
    """Fewest channels to drop from ``group`` for the table to predict a ``want`` ms reduction."""
    producers = {m.module for ch in group.channels for m in ch if m.role == "out"}
    consumers = {m.module for ch in group.channels for m in ch if m.role == "in"}
    step = max(1, n_free // 32)
    for k in range(step, n_free, step):
        new = dict(counts)
        for n in table.table:
            cin, cout = counts[n]
            if n in consumers:
                cin -= k
            if n in producers:
                cout -= k
            new[n] = (cin, cout)
        if est_layers - table.estimate(new) >= want:
            return k
    return None
