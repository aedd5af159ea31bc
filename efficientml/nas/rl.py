"""Reinforcement-learning search (Zoph & Le 2017, simplified): a controller samples every decision of
an architecture — resolution, width, each stage's depth, each slot's kernel and expand ratio — and is
trained by REINFORCE on the scores it gets.

The controller is a factorized policy: one vector of logits per decision (independent categoricals),
the documented simpler stand-in for the paper's LSTM, which conditions each decision on the previous
ones. Update per batch: loss = −Σ (R − b) · log π(arch) − β · H(π), with b an exponential moving average
of the rewards (decay 0.9) and Adam on the logits. Samples that break the constraints are redrawn
(up to ``tries`` times), so the controller learns over the feasible set; a sample seen before gets its
cached score (no budget spent) and still trains the controller.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from efficientml.core.errors import ConfigError
from efficientml.nas.space import Arch, MBSpace
from efficientml.nas.trials import Constraints, SearchHistory, Trials


class Controller(torch.nn.Module):
    """One logit vector per decision of ``space`` (all zeros: the uniform policy)."""

    def __init__(self, space: MBSpace):
        super().__init__()
        self.space = space
        self.choices = self._choices(space)
        self.logits = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(len(c))) for c in self.choices)

    @staticmethod
    def _choices(space: MBSpace) -> list[list]:
        ch: list[list] = [list(space.resolutions), list(space.widths)]
        ch += [list(range(lo, d + 1)) for lo, (_, d, _) in zip(space.min_depths, space.stages)]
        ch += [list(space.kernels) for _ in range(space.n_slots)] + [list(space.expands) for _ in range(space.n_slots)]
        return ch

    def sample(self, gen: torch.Generator) -> tuple[Arch, torch.Tensor]:
        """(a canonical Arch, the indices chosen for every decision)."""
        idx = torch.stack([torch.multinomial(torch.softmax(lg.detach(), -1), 1, generator=gen)[0]
                           for lg in self.logits])
        return self.decode(idx), idx

    def decode(self, idx: torch.Tensor) -> Arch:
        v = [c[int(i)] for c, i in zip(self.choices, idx)]
        n, s = len(self.space.stages), self.space.n_slots
        return self.space.canonical(Arch(v[0], v[1], tuple(v[2:2 + n]), tuple(v[2 + n:2 + n + s]),
                                         tuple(v[2 + n + s:])))

    def log_prob(self, idx: torch.Tensor) -> torch.Tensor:
        return sum(torch.log_softmax(lg, -1)[int(i)] for lg, i in zip(self.logits, idx))

    def entropy(self) -> torch.Tensor:
        return sum(-(torch.softmax(lg, -1) * torch.log_softmax(lg, -1)).sum() for lg in self.logits)


def rl_search(space: MBSpace, evaluate: Callable[[Arch], float], budget: int,
              constraints: Constraints = Constraints(), latency: Callable[[Arch], float] | None = None,
              seed: int = 0, workers: int = 1, batch: int = 8, lr: float = 0.05, entropy_weight: float = 1e-3,
              tries: int = 1000) -> SearchHistory:
    """REINFORCE search (module docstring); the controller's final policy is kept in ``history.extra["controller"]``."""
    run = Trials(space, evaluate, budget, constraints, latency, "rl", workers)
    ctrl = Controller(space)
    opt = torch.optim.Adam(ctrl.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    random.seed(seed)
    baseline, stall = None, 0
    try:
        while not run.done and stall < 50:
            drawn = [_feasible(ctrl, run, gen, tries) for _ in range(batch)]
            n_before = len(run.hist.records)
            rewards = run.score_many([(a, c) for a, _, c in drawn])
            stall = stall + 1 if len(run.hist.records) == n_before else 0
            r = torch.tensor(rewards)
            baseline = float(r.mean()) if baseline is None else 0.9 * baseline + 0.1 * float(r.mean())
            loss = -sum((ri - baseline) * ctrl.log_prob(idx) for ri, (_, idx, _) in zip(r, drawn)) / len(drawn)
            loss = loss - entropy_weight * ctrl.entropy()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        run.close()
    run.hist.extra["controller"] = {"probabilities": [torch.softmax(lg.detach(), -1).tolist() for lg in ctrl.logits],
                           "choices": ctrl.choices, "baseline": baseline}
    return run.hist


def _feasible(ctrl: Controller, run: Trials, gen: torch.Generator, tries: int) -> tuple[Arch, torch.Tensor, dict]:
    for _ in range(tries):
        arch, idx = ctrl.sample(gen)
        c = run.feasible(arch)
        if c is not None:
            return arch, idx, c
    raise ConfigError(f"the controller drew no architecture meeting the constraints in {tries} samples; loosen them")
