"""AMC-style automatic ratios with a simple policy-gradient agent (REINFORCE), under a MAC budget.

AMC (He et al. 2018) uses DDPG walking the layers one by one. This is the documented simpler
variant the issue allows: a Gaussian policy over the vector of per-group pruning ratios,
``a ~ N(μ, σ²)`` clipped to ``[min_ratio, max_ratio]``, trained with REINFORCE and a moving-average
baseline. As in AMC, the action is made feasible before it is scored: while the pruned network's MACs
(predicted by the surgery plan, no model built) exceed ``mac_budget`` of the original, every ratio is
raised by ``0.02``. The reward is the accuracy of the pruned network (L2 channel selection) on a few
held-out batches without fine-tuning — AMC's "accuracy after pruning" reward. The best feasible
action seen is returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError
from efficientml.prune.apply import channels_to_keep
from efficientml.prune.criteria import CRITERIA
from efficientml.prune.graph import DependencyGraph
from efficientml.prune.surgery import ChannelPlan


@dataclass(frozen=True)
class AMCConfig(Config):
    kind = "amc"

    mac_budget: float = 0.5        # allowed MACs / original MACs
    episodes: int = 30
    lr: float = 0.1                # step size on the policy mean
    sigma: float = 0.1             # exploration std of each ratio
    init_ratio: float = 0.3
    min_ratio: float = 0.0
    max_ratio: float = 0.8
    criterion: str = "l2"
    seed: int = 0

    def validate(self) -> None:
        check_range("mac_budget", self.mac_budget, 0.0, 1.0, lo_open=True)
        check_range("max_ratio", self.max_ratio, 0.0, 1.0, hi_open=True)
        check_range("min_ratio", self.min_ratio, 0.0, self.max_ratio)
        check_range("init_ratio", self.init_ratio, self.min_ratio, self.max_ratio)
        check_range("sigma", self.sigma, 0.0, 1.0, lo_open=True)
        if self.episodes < 1:
            raise ConfigError(f"episodes must be ≥ 1, got {self.episodes}")


@dataclass
class AMCResult:
    ratios: dict[str, float]          # group name → ratio of the best action
    accuracy: float
    mac_fraction: float
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)


def plan_for_ratios(graph: DependencyGraph, ratios: dict[int, float], scores: dict[int, torch.Tensor]) -> ChannelPlan:
    """Remove ``ratios[g]`` of each group's channels (lowest score first, per partition)."""
    kept = {}
    for g in graph.groups:
        r = ratios.get(g.id, 0.0)
        if r <= 0:
            continue
        removed: set[int] = set()
        for p in set(g.partition):
            free = [i for i in range(len(g)) if g.partition[i] == p and not g.frozen[i]]
            if free:
                n_remove = len(free) - channels_to_keep(len(free), r)
                removed.update(sorted(free, key=lambda i: (float(scores[g.id][i]), i))[:n_remove])
        kept[g.id] = [i for i in range(len(g)) if i not in removed]
    return ChannelPlan(graph, kept)


def amc_search(model: nn.Module, config: AMCConfig, example_inputs: torch.Tensor,
               accuracy: Callable[[nn.Module], float], log: Callable[[dict], None] | None = None) -> AMCResult:
    """Search per-group ratios; ``accuracy(model)`` scores a pruned copy (a few held-out batches)."""
    graph = DependencyGraph.build(model, example_inputs)
    groups = [g for g in graph.groups if g.prunable > 1]
    if not groups:
        raise ConfigError("the model has no prunable channel groups")
    crit = CRITERIA.get(config.criterion)
    if crit.needs_data:
        raise ConfigError(f"AMC scores candidates by {config.criterion!r}-free ranking; use l1 or l2")
    scores = {g.id: crit.channel_scores(model, g, {}) for g in groups}
    dense_macs = ChannelPlan(graph, {}).predicted_macs()
    gen = torch.Generator().manual_seed(config.seed)
    mu = torch.full((len(groups),), config.init_ratio)
    baseline, spread = None, 1.0
    best: AMCResult | None = None
    history = []
    for ep in range(config.episodes):
        a = (mu + config.sigma * torch.randn(len(groups), generator=gen)).clamp(config.min_ratio, config.max_ratio)
        while True:  # make the action feasible: raise every ratio until the MAC budget holds
            plan = plan_for_ratios(graph, {g.id: float(r) for g, r in zip(groups, a)}, scores)
            frac = plan.predicted_macs() / dense_macs
            if frac <= config.mac_budget or bool((a >= config.max_ratio).all()):
                break
            a = (a + 0.02).clamp(max=config.max_ratio)
        feasible = frac <= config.mac_budget
        pruned = plan.apply(copy.deepcopy(model))
        reward = accuracy(pruned) if feasible else 0.0
        if baseline is None:
            baseline = reward
        adv = (reward - baseline) / max(spread, 1e-6)
        mu = (mu + config.lr * adv * (a - mu) / config.sigma).clamp(config.min_ratio, config.max_ratio)
        spread = 0.9 * spread + 0.1 * abs(reward - baseline) if ep else max(1.0, abs(reward))
        baseline = 0.8 * baseline + 0.2 * reward
        rec = {"episode": ep + 1, "ratios": [round(float(r), 3) for r in a], "mac_fraction": frac,
               "reward_accuracy": reward, "feasible": feasible}
        history.append(rec)
        if log is not None:
            log(rec)
        if feasible and (best is None or reward > best.accuracy):
            best = AMCResult({g.name: float(r) for g, r in zip(groups, a)}, reward, frac, pruned)
    if best is None:
        raise ConfigError(f"no action met the MAC budget {config.mac_budget}; raise max_ratio or the budget")
    best.history = history
    return best


__all__ = ["AMCConfig", "AMCResult", "amc_search", "plan_for_ratios"]
