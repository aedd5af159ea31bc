"""Search strategies over an :class:`~efficientml.nas.space.MBSpace` behind one interface: a function
``evaluate(arch) -> score`` (higher is better: accuracy, a predictor, a proxy), a budget counted in
*distinct* evaluations, and constraints on the analytical costs (:mod:`efficientml.nas.costs`) and,
given a latency table, on predicted latency (:mod:`efficientml.nas.trials`). Every search returns a
:class:`SearchHistory` (every evaluated architecture with its score and costs, in order) that writes
JSON and a Pareto plot; ``workers`` > 1 evaluates each batch of candidates in parallel processes.

- :func:`random_search`: uniform samples that satisfy the constraints;
- :func:`evolution_search`: a population of feasible architectures; each generation keeps the top
  ``parents`` and fills the rest with mutations (each gene resampled with ``mutate_prob``) and
  crossovers (each gene from one of two parents), as in OFA's evolutionary search;
- :func:`grid_search`: compound scaling (EfficientNet) — depth, expand (width) and resolution scaled
  together by one coefficient each, over a grid;
- :func:`efficientml.nas.rl.rl_search`: a REINFORCE controller.
"""

from __future__ import annotations

import random
from typing import Callable

from efficientml.nas.rl import rl_search
from efficientml.nas.space import Arch, MBSpace
from efficientml.nas.trials import Constraints, SearchHistory, Trials, pareto_front, pareto_plot

__all__ = ["Constraints", "SearchHistory", "Trials", "pareto_front", "pareto_plot", "random_search",
           "evolution_search", "grid_search", "rl_search", "mutate", "crossover", "STRATEGIES"]


def random_search(space: MBSpace, evaluate: Callable[[Arch], float], budget: int,
                  constraints: Constraints = Constraints(), latency: Callable[[Arch], float] | None = None,
                  seed: int = 0, workers: int = 1) -> SearchHistory:
    run, rng = Trials(space, evaluate, budget, constraints, latency, "random", workers), random.Random(seed)
    stall = 0
    try:
        while not run.done and stall < 100 * budget:
            n = len(run.hist.records)
            run.score_many([run.sample_feasible(rng) for _ in range(min(run.left, workers))])
            stall = stall + 1 if len(run.hist.records) == n else 0
    finally:
        run.close()
    return run.hist


def mutate(space, arch, rng: random.Random, p: float):
    """``space.mutate``: each gene resampled with probability ``p`` (any space with the method)."""
    return space.mutate(arch, rng, p)


def crossover(space, a, b, rng: random.Random):
    """``space.crossover``: each gene from ``a`` or ``b`` with probability 1/2."""
    return space.crossover(a, b, rng)


def evolution_search(space: MBSpace, evaluate: Callable[[Arch], float], budget: int,
                     constraints: Constraints = Constraints(), latency: Callable[[Arch], float] | None = None,
                     population: int = 20, parents: int = 5, mutate_prob: float = 0.1, mutation_frac: float = 0.5,
                     seed: int = 0, workers: int = 1) -> SearchHistory:
    run, rng = Trials(space, evaluate, budget, constraints, latency, "evolution", workers), random.Random(seed)
    try:
        first: dict[Arch, dict] = {}
        for _ in range(population * 50):
            if len(first) >= min(population, budget):
                break
            a, c = run.sample_feasible(rng)
            first.setdefault(space.canonical(a), c)
        run.score_many(list(first.items()))
        pop, stall = list(first), 0
        while not run.done and stall < 50:
            top = sorted(pop, key=lambda a: run.seen[a], reverse=True)[:parents]
            n_before = len(run.hist.records)
            children = _children(run, top, rng, min(population - len(top), run.left), mutate_prob, mutation_frac)
            run.score_many(list(children.items()))
            pop = top + list(children)
            stall = stall + 1 if len(run.hist.records) == n_before else 0
    finally:
        run.close()
    return run.hist


def _children(run: Trials, top: list[Arch], rng: random.Random, n: int, mutate_prob: float,
              mutation_frac: float) -> dict[Arch, dict]:
    """Up to ``n`` new feasible children of ``top`` (mutations and crossovers), with their costs."""
    out: dict[Arch, dict] = {}
    for _ in range(max(1, n) * 20):
        if len(out) >= n:
            break
        if rng.random() < mutation_frac:
            child = mutate(run.space, rng.choice(top), rng, mutate_prob)
        else:
            child = crossover(run.space, rng.choice(top), rng.choice(top), rng)
        if child in run.seen or child in out:
            continue
        c = run.feasible(child)
        if c is not None:
            out[child] = c
    return out


def grid_search(space: MBSpace, evaluate: Callable[[Arch], float], budget: int,
                constraints: Constraints = Constraints(), latency: Callable[[Arch], float] | None = None,
                seed: int = 0, workers: int = 1) -> SearchHistory:
    """Compound scaling: one level each for depth, expand ratio and resolution (and kernel), every
    block taking the same choice — the grid of the space's "uniform" networks, smallest first."""
    del seed
    run = Trials(space, evaluate, budget, constraints, latency, "grid", workers)
    n, grid = space.n_slots, {}
    for r in space.resolutions:
        for w in space.widths:
            for d in range(max(d for _, d, _ in space.stages) + 1):
                depths = tuple(max(lo, min(dmax, d)) for lo, (_, dmax, _) in zip(space.min_depths, space.stages))
                for e in space.expands:
                    for k in space.kernels:
                        a = space.canonical(Arch(r, w, depths, (k,) * n, (e,) * n))
                        c = run.feasible(a)
                        if c is not None and len(grid) < budget:
                            grid.setdefault(a, c)
    try:
        run.score_many(list(grid.items()))
    finally:
        run.close()
    return run.hist


STRATEGIES = {"random": random_search, "evolution": evolution_search, "grid": grid_search, "rl": rl_search}
