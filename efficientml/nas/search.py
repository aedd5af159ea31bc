"""Search strategies over an :class:`~efficientml.nas.space.MBSpace` behind one interface: a function
``evaluate(arch) -> score`` (higher is better: accuracy, a predictor, a proxy), a budget counted in
*distinct* evaluations, and constraints on the analytical costs (:mod:`efficientml.nas.costs`) and,
given a latency table, on predicted latency. Every search returns a :class:`SearchHistory` (every
evaluated architecture with its score and costs, in order) that writes JSON and a Pareto plot.

- :func:`random_search`: uniform samples that satisfy the constraints;
- :func:`evolution_search`: a population of feasible architectures; each generation keeps the top
  ``parents`` and fills the rest with mutations (each gene resampled with ``mutate_prob``) and
  crossovers (each gene from one of two parents), as in OFA's evolutionary search;
- :func:`grid_search`: compound scaling (EfficientNet) — depth, expand (width) and resolution scaled
  together by one coefficient each, over a grid.
"""

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
        c = subnet_cost(space, arch).to_dict()
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

    @property
    def best(self) -> dict | None:
        return max(self.records, key=lambda r: r["score"], default=None)

    def best_after(self, n: int) -> float | None:
        """Best score within the first ``n`` evaluations (a search's curve)."""
        return max((r["score"] for r in self.records[:n]), default=None)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "constraints": dataclasses.asdict(self.constraints),
                "evaluations": len(self.records), "best": self.best, "records": self.records}

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


class _Runner:
    """Distinct evaluations under a budget, with feasibility and the history."""

    def __init__(self, space: MBSpace, evaluate: Callable[[Arch], float], budget: int, constraints: Constraints,
                 latency: Callable[[Arch], float] | None, strategy: str):
        if budget < 1:
            raise ConfigError(f"the search budget must be at least one evaluation, got {budget}")
        self.space, self.evaluate, self.budget, self.latency = space, evaluate, budget, latency
        self.constraints = constraints
        self.hist = SearchHistory(strategy, constraints)
        self.seen: dict[Arch, float] = {}

    @property
    def done(self) -> bool:
        return len(self.hist.records) >= self.budget

    def feasible(self, arch: Arch) -> dict | None:
        c = self.constraints.costs(self.space, arch, self.latency)
        return c if self.constraints.ok(c) else None

    def score(self, arch: Arch, costs: dict) -> float:
        arch = self.space.canonical(arch)
        if arch not in self.seen and not self.done:
            s = float(self.evaluate(arch))
            self.seen[arch] = s
            self.hist.records.append({"arch": arch.to_dict(), "key": arch.key(), "score": s, "costs": costs,
                                      "step": len(self.hist.records)})
        return self.seen.get(arch, float("-inf"))

    def sample_feasible(self, rng: random.Random, tries: int = 10_000) -> tuple[Arch, dict]:
        for _ in range(tries):
            a = self.space.sample(rng)
            c = self.feasible(a)
            if c is not None:
                return a, c
        raise ConfigError(f"no architecture of the space met the constraints in {tries} random samples; "
                          "loosen them")


def random_search(space: MBSpace, evaluate: Callable[[Arch], float], budget: int,
                  constraints: Constraints = Constraints(), latency: Callable[[Arch], float] | None = None,
                  seed: int = 0) -> SearchHistory:
    run, rng = _Runner(space, evaluate, budget, constraints, latency, "random"), random.Random(seed)
    stall = 0
    while not run.done and stall < 100 * budget:
        n = len(run.hist.records)
        run.score(*run.sample_feasible(rng))
        stall = stall + 1 if len(run.hist.records) == n else 0
    return run.hist


def mutate(space: MBSpace, arch: Arch, rng: random.Random, p: float) -> Arch:
    """Each gene (resolution, width, every stage depth, every slot's kernel and expand) resampled with
    probability ``p``."""
    pick = (lambda old, choices: rng.choice(choices) if rng.random() < p else old)
    depths = tuple(pick(d, list(range(lo, dmax + 1))) for d, lo, (_, dmax, _) in
                   zip(arch.depths, space.min_depths, space.stages))
    return space.canonical(Arch(pick(arch.resolution, space.resolutions), pick(arch.width, space.widths), depths,
                                tuple(pick(k, space.kernels) for k in arch.kernels),
                                tuple(pick(e, space.expands) for e in arch.expands)))


def crossover(space: MBSpace, a: Arch, b: Arch, rng: random.Random) -> Arch:
    """Each gene from ``a`` or ``b`` with probability 1/2."""
    pick = (lambda x, y: x if rng.random() < 0.5 else y)
    return space.canonical(Arch(pick(a.resolution, b.resolution), pick(a.width, b.width),
                                tuple(map(pick, a.depths, b.depths)), tuple(map(pick, a.kernels, b.kernels)),
                                tuple(map(pick, a.expands, b.expands))))


def evolution_search(space: MBSpace, evaluate: Callable[[Arch], float], budget: int,
                     constraints: Constraints = Constraints(), latency: Callable[[Arch], float] | None = None,
                     population: int = 20, parents: int = 5, mutate_prob: float = 0.1, mutation_frac: float = 0.5,
                     seed: int = 0) -> SearchHistory:
    run, rng = _Runner(space, evaluate, budget, constraints, latency, "evolution"), random.Random(seed)
    pop: list[Arch] = []
    for _ in range(population * 50):
        if len(pop) >= min(population, budget) or run.done:
            break
        a, c = run.sample_feasible(rng)
        a = space.canonical(a)
        if a not in run.seen:
            run.score(a, c)
            pop.append(a)
    stall = 0
    while not run.done and stall < 50:
        top = sorted(pop, key=lambda a: run.seen[a], reverse=True)[:parents]
        children: list[Arch] = []
        n_before = len(run.hist.records)
        for _ in range(population * 20):
            if len(children) >= population - len(top) or run.done:
                break
            if rng.random() < mutation_frac:
                child = mutate(space, rng.choice(top), rng, mutate_prob)
            else:
                child = crossover(space, rng.choice(top), rng.choice(top), rng)
            c = run.feasible(child)
            if c is not None and child not in run.seen:
                run.score(child, c)
                children.append(child)
        pop = top + children
        stall = stall + 1 if len(run.hist.records) == n_before else 0
    return run.hist


def grid_search(space: MBSpace, evaluate: Callable[[Arch], float], budget: int,
                constraints: Constraints = Constraints(), latency: Callable[[Arch], float] | None = None,
                seed: int = 0) -> SearchHistory:
    """Compound scaling: one level each for depth, expand ratio and resolution (and kernel), every
    block taking the same choice — the grid of the space's "uniform" networks, smallest first."""
    del seed
    run = _Runner(space, evaluate, budget, constraints, latency, "grid")
    n = space.n_slots
    for r in space.resolutions:
        for w in space.widths:
            for d in range(max(d for _, d, _ in space.stages) + 1):
                depths = tuple(max(lo, min(dmax, d)) for lo, (_, dmax, _) in zip(space.min_depths, space.stages))
                for e in space.expands:
                    for k in space.kernels:
                        a = space.canonical(Arch(r, w, depths, (k,) * n, (e,) * n))
                        c = run.feasible(a)
                        if c is not None:
                            run.score(a, c)
                        if run.done:
                            return run.hist
    return run.hist


STRATEGIES = {"random": random_search, "evolution": evolution_search, "grid": grid_search}
