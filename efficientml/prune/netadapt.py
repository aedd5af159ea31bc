"""NetAdapt (Yang et al. 2018): shrink a network until its *measured* latency meets a target.

1. A latency lookup table is measured on this machine: every conv/linear layer alone, at the model's
   activation shape and batch size and with the thread count of the final measurement, for a grid of
   (input, output) channel counts; estimates between grid points are bilinear.
2. Each iteration asks for a latency drop ``ΔR_i = min(initial_step · L₀ · decay^i, L_i − goal)``.
   For every channel group, the table proposes the fewest channels (lowest L2 first) whose removal
   cuts the *share* of the table's estimate that ``ΔR_i`` is of the current latency; the candidate is
   then built and its whole-model latency measured (interleaved with the current model's), and more
   channels are removed while the measured drop falls short. Each candidate that meets ``ΔR_i`` is
   fine-tuned for a few steps and scored on held-out data; the most accurate is kept.
3. The kept model's latency is re-measured side by side with the original model at every iteration
   (a ratio, so a change of machine load between iterations does not move the goal), and the loop
   stops once that measured latency is at or below ``target_ratio · (1 − margin) · L₀``. A long
   fine-tune follows (by the caller, or ``final_epochs`` here).

Why the table is not trusted alone: on a shared 2-core machine a layer timed alone costs about one
scheduler time slice per parallel region more than it does inside the whole network, and the table
leaves out BatchNorm/ReLU/pooling, whose cost also scales with channels. Its sum is neither the
model's latency nor additive in practice, so it ranks and sizes proposals (relative shares) and the
measured latency decides.

Every iteration is recorded (group chosen, channels, requested drop, estimated and measured latency,
accuracy).
"""

from __future__ import annotations

import copy
import math
import statistics
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
    margin: float = 0.0              # stop at target_ratio · (1 − margin): headroom for timing noise
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
    runs: int = 10                   # timed runs per latency measurement …
    rounds: int = 2                  # … interleaved rounds per side-by-side comparison
    statistic: str = "min"           # of all timed runs: "min" (robust to other jobs) or "median"
    probes: int = 3                  # extra measured tries per group when the table undershoots
    channel_multiple: int = 1        # kept channel counts are multiples of this (8: CPU kernels' blocks)
    final_epochs: float = 0.0        # long fine-tune at the end (0: leave it to the caller)
    final_lr: float = 0.01
    lookup: str = "measured"         # "measured" here, or "macs" (a theoretical table, for tests)

    def validate(self) -> None:
        check_range("target_ratio", self.target_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("margin", self.margin, 0.0, 1.0, hi_open=True)
        check_range("initial_step", self.initial_step, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("step_decay", self.step_decay, 0.0, 1.0, lo_open=True)
        if self.probes < 0:
            raise ConfigError(f"probes must be ≥ 0, got {self.probes}")
        for name in ("batch_size", "threads", "grid", "max_iterations", "runs", "rounds", "eval_batches",
                     "channel_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.statistic not in ("min", "median"):
            raise ConfigError(f"statistic must be 'min' or 'median', got {self.statistic!r}")
        if self.lookup not in ("measured", "macs"):
            raise ConfigError(f"lookup must be 'measured' or 'macs', got {self.lookup!r}")
        if self.grid < 2:
            raise ConfigError(f"grid must be ≥ 2 channel counts per side, got {self.grid}")


class LatencyTable:
    """Per-layer latency (ms) on a grid of (c_in, c_out), measured here; bilinear in between."""

    def __init__(self, model: nn.Module, graph: DependencyGraph, batch_size: int, threads: int,
                 grid: int, runs: int, measured: bool = True, statistic: str = "median"):
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
                        r = measure_latency(layer, x, warmup=2, runs=runs, threads=threads)
                        ms[i, j] = r.min_ms if statistic == "min" else r.median_ms
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


class _Meter:
    """Whole-model latency (ms) at the configured batch size and threads, two models side by side.

    ``lookup="macs"`` makes it theoretical (MACs · batch / 1e6), so tests are deterministic."""

    def __init__(self, config: NetAdaptConfig, sample_shape: tuple[int, ...]):
        self.config, self.sample_shape = config, tuple(sample_shape)
        self.x = torch.randn(config.batch_size, *sample_shape)
        self.measured = config.lookup == "measured"
        self.calls = 0

    def one(self, model: nn.Module) -> float:
        if not self.measured:
            from efficientml.analysis import count_macs

            return count_macs(model, (1, *self.sample_shape)).macs * self.config.batch_size / 1e6
        from efficientml.analysis import measure_latency

        self.calls += 1
        r = measure_latency(model, self.x, warmup=3, runs=self.config.runs, threads=self.config.threads)
        # min: a run that other jobs on the machine did not interrupt (they only ever add time)
        return r.min_ms if self.config.statistic == "min" else r.median_ms

    def pair(self, a: nn.Module, b: nn.Module, rounds: int | None = None) -> tuple[float, float]:
        """``a`` and ``b`` timed back to back in each of ``rounds`` (both see the same machine load):
        ``a``'s best round, and ``b`` at ``a`` times the median over rounds of ``b/a``, so one round
        that another job disturbed moves neither much."""
        if not self.measured:
            return self.one(a), self.one(b)
        ta, ratios = [], []
        for _ in range(rounds or self.config.rounds):
            t = self.one(a)
            ta.append(t)
            ratios.append(self.one(b) / t)
        best = min(ta) if self.config.statistic == "min" else statistics.median(ta)
        return best, best * statistics.median(ratios)


def netadapt(model: nn.Module, config: NetAdaptConfig, sample_shape: tuple[int, ...],
             train_loader: Iterable, holdout_loader: Iterable, log: Any = None) -> NetAdaptResult:
    """Run NetAdapt on a copy of ``model``; ``sample_shape`` is one input without the batch dim."""
    from efficientml.train import TrainConfig, fit

    original = copy.deepcopy(model).eval()
    model = copy.deepcopy(model)
    meter = _Meter(config, sample_shape)
    example = torch.randn(2, *sample_shape)
    graph = DependencyGraph.build(model, example)
    t0 = time.perf_counter()
    table = LatencyTable(model, graph, config.batch_size, config.threads, config.grid, config.runs,
                         measured=meter.measured, statistic=config.statistic)
    lut_seconds = time.perf_counter() - t0
    l0 = min(meter.one(model) for _ in range(config.rounds + 1))
    lut0 = table.estimate(_counts(model, table.table))
    goal = config.target_ratio * (1.0 - config.margin) * l0
    criterion = CRITERIA.get(config.criterion)
    short = TrainConfig(epochs=1.0, lr=config.short_lr, schedule="constant", max_steps=config.short_steps,
                        weight_decay=0.0, warmup_frac=0.0)
    result = NetAdaptResult(model, l0, l0, table={"seconds": lut_seconds, "sum_of_layers_ms": lut0,
                                                  "whole_model_ms": l0, **table.to_dict()})
    current = l0
    for it in range(config.max_iterations):
        if current <= goal:
            break
        graph = DependencyGraph.build(model, example)
        step = config.initial_step * l0 * config.step_decay ** it
        want = min(step, current - goal)  # the last step asks for exactly what is left
        best = _best_candidate(model, graph, table, meter, want / current, criterion, config,
                               train_loader, holdout_loader, short)
        if best is None:
            break
        acc, model, info = best
        # the goal is checked against the original model timed side by side, as the final report does;
        # a reading at the goal is confirmed by a second one (the larger counts)
        t_orig, t_new = meter.pair(original, model, rounds=2 * config.rounds + 1)
        if meter.measured and l0 * t_new / t_orig <= goal:
            t_orig2, t_new2 = meter.pair(original, model, rounds=2 * config.rounds + 1)
            if t_new2 / t_orig2 > t_new / t_orig:
                t_orig, t_new = t_orig2, t_new2
        current = l0 * t_new / t_orig
        info.update({"iteration": it + 1, "requested_drop_ms": want, "requested_drop_fraction": want / l0,
                     "measured_latency_ms": current, "measured_ratio_to_original": t_new / t_orig,
                     "original_latency_now_ms": t_orig, "accuracy": acc})
        result.iterations.append(info)
        if log is not None:
            log(info)
    if config.final_epochs > 0:
        fit(model, train_loader, TrainConfig(epochs=config.final_epochs, lr=config.final_lr,
                                             schedule="cosine", warmup_frac=0.0), progress=False)
    result.model, result.final_latency_ms = model, current
    result.table["latency_measurements"] = meter.calls
    return result


def _best_candidate(model: nn.Module, graph: DependencyGraph, table: LatencyTable, meter: _Meter,
                    want_frac: float, criterion: Any, config: NetAdaptConfig, train_loader: Iterable,
                    holdout_loader: Iterable, short: Any) -> tuple[float, nn.Module, dict] | None:
    """One candidate per group (fewest channels whose removal cuts the *measured* latency by
    ``want_frac`` of the current one), each briefly fine-tuned; the most accurate on held-out data wins."""
    from efficientml.train import evaluate, fit

    counts = _counts(model, table.table)
    best: tuple[float, nn.Module, dict] | None = None
    for g in graph.groups:
        if g.prunable <= 1 or len(set(g.partition)) > 1:
            continue
        free = [i for i in range(len(g)) if not g.frozen[i]]
        if len(free) <= 1:
            continue
        scores = criterion.channel_scores(model, g, {})
        order = sorted(free, key=lambda i: (float(scores[i]), i))
        allowed = _removable(len(g), len(free), config.channel_multiple)
        k = _channels_needed(g, counts, table, want_frac, allowed)
        tries = []
        while k is not None:
            removed = set(order[:k])
            plan = ChannelPlan(graph, {g.id: [i for i in range(len(g)) if i not in removed]})
            cand = plan.apply(copy.deepcopy(model))
            t_now, t_cand = meter.pair(model, cand)
            drop = 1.0 - t_cand / t_now
            tries.append({"channels_removed": k, "measured_drop_fraction": drop})
            if drop >= want_frac:
                break
            k = _more_channels(k, drop, want_frac, allowed) if len(tries) <= config.probes else None
        if k is None:  # the group cannot give that much, even measured
            continue
        fit(cand, train_loader, short, progress=False)
        acc = evaluate(cand, holdout_loader, max_batches=config.eval_batches)["accuracy"]
        info = {"group": g.name, "channels_before": len(g), "channels_after": len(g) - k,
                "estimated_drop_fraction": _estimated_drop(g, counts, table, k),
                "measured_drop_fraction": drop, "tries": tries, "candidate_accuracy": acc}
        if best is None or acc > best[0]:
            best = (acc, cand, info)
    return best


def _removable(n: int, n_free: int, multiple: int) -> list[int]:
    """Channel counts that may be removed from a group of ``n`` (``n_free`` not frozen), ascending:
    at least one kept, and the kept count a multiple of ``multiple`` unless fewer than that remain."""
    return [k for k in range(1, n_free) if (n - k) % multiple == 0 or n - k < multiple]


def _more_channels(k: int, drop: float, want_frac: float, allowed: list[int]) -> int | None:
    """Next count to try after removing ``k`` channels gave only ``drop`` of ``want_frac``:
    proportional to the shortfall, at most twice as many, rounded up to an ``allowed`` count above ``k``."""
    grow = 2 * k if drop <= 0 else math.ceil(k * want_frac / drop)
    want = min(2 * k, grow)
    above = [a for a in allowed if a > k]
    if not above:
        return None
    return next((a for a in above if a >= want), above[-1])


def _shrunk(group: Any, counts: dict[str, tuple[int, int]], k: int) -> dict[str, tuple[int, int]]:
    producers = {m.module for ch in group.channels for m in ch if m.role == "out"}
    consumers = {m.module for ch in group.channels for m in ch if m.role == "in"}
    new = dict(counts)
    for n, (cin, cout) in counts.items():
        new[n] = (cin - k if n in consumers else cin, cout - k if n in producers else cout)
    return new


def _estimated_drop(group: Any, counts: dict[str, tuple[int, int]], table: LatencyTable, k: int) -> float:
    """The share of the table's estimate that removing ``k`` channels of ``group`` saves."""
    now = table.estimate(counts)
    return (now - table.estimate(_shrunk(group, counts, k))) / now if now > 0 else 0.0


def _channels_needed(group: Any, counts: dict[str, tuple[int, int]], table: LatencyTable,
                     want_frac: float, allowed: list[int]) -> int | None:
    """Fewest ``allowed`` channels to drop from ``group`` for the table to predict a ``want_frac``
    share of the latency saved. When none does but the most comes within half of it (the table
    leaves out BatchNorm/ReLU/pooling), the most: the measurement decides. Otherwise None."""
    for k in allowed:
        if _estimated_drop(group, counts, table, k) >= want_frac:
            return k
    if allowed and _estimated_drop(group, counts, table, allowed[-1]) >= want_frac / 2:
        return allowed[-1]
    return None
