"""What every search strategy shares: constraints on the analytical costs (and, given a latency table,
on predicted latency), the history of evaluated architectures (JSON and a Pareto plot), and
:class:`Trials` — distinct evaluations under a budget, run one by one or in parallel processes."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from efficientml.core.errors import ConfigError
from efficientml.nas.costs import subnet_cost
from efficientml.nas.space import Arch, MBSpace


@dataclass(frozen=True)
class Constraints:
    """Upper bounds (None: unbounded). ``max_peak_bytes`` is the int8 peak activation memory."""

    max_macs: int | None = None
    max_params: int | None = None
    max_peak_bytes: float | None = None
    max_latency_ms: float | None = None

    def costs(self, space: MBSpace, arch: Arch, latency: Callable[[Arch], float] | None = None) -> dict:
        # MBSpace: analytical (costs.subnet_cost); a space with its own ``cost`` (cells.BlockSpace: profiled)
        c = space.cost(arch) if hasattr(space, "cost") else subnet_cost(space, arch).to_dict()
        if latency is not None:
            c["latency_ms"] = latency(arch)
        return c

    def ok(self, costs: dict) -> bool:
        if self.max_latency_ms is not None and "latency_ms" not in costs:
            raise ConfigError("a latency constraint needs a latency predictor (a lookup table)")
        return all(lim is None or costs[key] <= lim for key, lim in (
            ("macs", self.max_macs), ("params", self.max_params), ("peak_bytes_int8", self.max_peak_bytes),
            ("latency_ms", self.max_latency_ms)))


@dataclass
class SearchHistory:
    strategy: str
    constraints: Constraints
    records: list[dict] = field(default_factory=list)   # {"arch", "score", "costs", "step"}
    extra: dict = field(default_factory=dict)            # what a strategy adds (e.g. the RL policy)

    @property
    def best(self) -> dict | None:
        return max(self.records, key=lambda r: r["score"], default=None)

    def best_after(self, n: int) -> float | None:
        """Best score within the first ``n`` evaluations (a search's curve)."""
        return max((r["score"] for r in self.records[:n]), default=None)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "constraints": dataclasses.asdict(self.constraints),
                "evaluations": len(self.records), "best": self.best, "records": self.records, **self.extra}

    def write(self, path: str | Path, plot: bool = True, cost_key: str = "macs") -> None:
        """The history as JSON at ``path`` and, with ``plot``, its score-vs-cost scatter with the Pareto
        front next to it (``.png``)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        if plot:
            pareto_plot(self.records, path.with_suffix(".png"), cost_key, title=self.strategy)


def pareto_front(records: list[dict], cost_key: str = "macs") -> list[dict]:
    """Records not dominated by another (lower or equal cost and strictly higher score, or lower cost
    and equal score), sorted by cost."""
    pts = sorted(records, key=lambda r: (r["costs"][cost_key], -r["score"]))
    front, best = [], float("-inf")
    for r in pts:
        if r["score"] > best:
            front.append(r)
            best = r["score"]
    return front


def pareto_plot(records: list[dict], path: Path, cost_key: str = "macs", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([r["costs"][cost_key] for r in records], [r["score"] for r in records], s=8, alpha=0.5)
    front = pareto_front(records, cost_key)
    ax.plot([r["costs"][cost_key] for r in front], [r["score"] for r in front], "r.-", label="Pareto front")
    ax.set_xlabel(cost_key)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Trials:
    """Distinct evaluations under a budget, with feasibility and the history. ``workers`` > 1 scores a
    batch of architectures in parallel processes (``torch.multiprocessing``, spawn): ``evaluate`` must
    then be picklable (a module-level function or a ``functools.partial`` of one)."""

    def __init__(self, space: MBSpace, evaluate: Callable[[Arch], float], budget: int, constraints: Constraints,
                 latency: Callable[[Arch], float] | None, strategy: str, workers: int = 1):
        if budget < 1:
            raise ConfigError(f"the search budget must be at least one evaluation, got {budget}")
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        self.space, self.evaluate, self.budget, self.latency = space, evaluate, budget, latency
        self.constraints, self.workers, self._pool = constraints, workers, None
        self.hist = SearchHistory(strategy, constraints)
        self.seen: dict[Arch, float] = {}

    @property
    def done(self) -> bool:
        return len(self.hist.records) >= self.budget

    @property
    def left(self) -> int:
        return self.budget - len(self.hist.records)

    def feasible(self, arch: Arch) -> dict | None:
        c = self.constraints.costs(self.space, arch, self.latency)
        return c if self.constraints.ok(c) else None

    def _record(self, arch: Arch, costs: dict, s: float) -> None:
        self.seen[arch] = s
        self.hist.records.append({"arch": arch.to_dict(), "key": arch.key(), "score": s, "costs": costs,
                                  "step": len(self.hist.records)})

    def score(self, arch: Arch, costs: dict) -> float:
        arch = self.space.canonical(arch)
        if arch not in self.seen and not self.done:
            self._record(arch, costs, float(self.evaluate(arch)))
        return self.seen.get(arch, float("-inf"))

    def score_many(self, pairs: list[tuple[Arch, dict]]) -> list[float]:
        """Score new architectures (in parallel with ``workers`` > 1), in order, within the budget."""
        todo: dict[Arch, dict] = {}
        for a, c in pairs:
            a = self.space.canonical(a)
            if a not in self.seen and a not in todo and len(todo) < self.left:
                todo[a] = c
        if self.workers > 1 and len(todo) > 1:
            scores = self.pool().map(self.evaluate, list(todo))
        else:
            scores = [self.evaluate(a) for a in todo]
        for (a, c), s in zip(todo.items(), scores):
            self._record(a, c, float(s))
        return [self.seen.get(self.space.canonical(a), float("-inf")) for a, _ in pairs]

    def pool(self):
        if self._pool is None:
            import torch.multiprocessing as mp

            self._pool = mp.get_context("spawn").Pool(self.workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def sample_feasible(self, rng: random.Random, tries: int = 10_000) -> tuple[Arch, dict]:
        for _ in range(tries):
            a = self.space.sample(rng)
            c = self.feasible(a)
            if c is not None:
                return a, c
        raise ConfigError(f"no architecture of the space met the constraints in {tries} random samples; "
                          "loosen them")
