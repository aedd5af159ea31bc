"""Pruning schedules: iterative (30% → 50% → 70%, fine-tuning between) and AGP (Zhu & Gupta 2017).

AGP raises sparsity along a cubic: ``s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(n·Δt))³`` — fast at
first, when many weights are redundant, slowing as the network has fewer left. :class:`AGPPruner`
is an ``after_step`` callback for ``train.fit``: every ``frequency`` steps it recomputes the masks at
the current target (already-pruned weights score zero, so masks only grow), and after every step
it re-applies them.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.core.errors import ConfigError
from efficientml.prune.apply import compute_masks
from efficientml.prune.config import PruneConfig
from efficientml.prune.criteria import CRITERIA
from efficientml.prune.masks import MaskSet


def iterative_sparsities(final: float, steps: int = 3, start: float | None = None) -> list[float]:
    """Evenly spaced targets ending at ``final``: ``iterative_sparsities(0.7)`` → [0.3, 0.5, 0.7]."""
    check_range("final sparsity", final, 0.0, 1.0, hi_open=True)
    if steps < 1:
        raise ConfigError(f"steps must be ≥ 1, got {steps}")
    if steps == 1:
        return [final]
    start = final * 3 / 7 if start is None else start
    check_range("start sparsity", start, 0.0, final)
    return [round(start + (final - start) * i / (steps - 1), 6) for i in range(steps)]


def agp_sparsity(step: int, final: float, total_steps: int, initial: float = 0.0, start_step: int = 0) -> float:
    """The AGP target at ``step``: ``initial`` before ``start_step``, ``final`` after ``start+total``."""
    check_range("final sparsity", final, 0.0, 1.0, hi_open=True)
    if total_steps < 1:
        raise ConfigError(f"total_steps must be ≥ 1, got {total_steps}")
    if step <= start_step:
        return initial
    t = min(1.0, (step - start_step) / total_steps)
    return final + (initial - final) * (1.0 - t) ** 3


class AGPPruner:
    """``fit(model, loader, cfg, after_step=AGPPruner(model, config, total_steps=…))``.

    ``config.sparsity`` is the final sparsity (any mask granularity; channel pruning is physical and
    uses :func:`iterative_prune` instead)."""

    def __init__(self, model: nn.Module, config: PruneConfig, total_steps: int, frequency: int = 10,
                 initial: float = 0.0, start_step: int = 0):
        if config.method == "channel":
            raise ConfigError("AGP here schedules masks; for channel pruning use iterative_prune")
        self.config, self.total, self.freq = config, total_steps, max(1, frequency)
        self.initial, self.start = initial, start_step
        self.criterion = CRITERIA.get(config.criterion)
        if self.criterion.needs_data:
            raise ConfigError(f"AGP recomputes masks during training; criterion {config.criterion!r} "
                              f"needs calibration data, use a magnitude criterion")
        self.step = 0
        masks, _ = compute_masks(model, config.replace(sparsity=initial), self.criterion)
        self.masks = MaskSet(model, masks)
        self.history: list[tuple[int, float]] = [(0, initial)]

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        if self.step % self.freq == 0 and self.step <= self.start + self.total + self.freq:
            s = agp_sparsity(self.step, self.config.sparsity, self.total, self.initial, self.start)
            masks, _ = compute_masks(model, self.config.replace(sparsity=s), self.criterion)
            for name, m in masks.items():
                self.masks.masks[name] = m.to(self.masks.masks[name].device)
            self.history.append((self.step, s))
        self.masks.apply(model)


def iterative_prune(model: nn.Module, config: PruneConfig, sparsities: Iterable[float],
                    train_loader: Iterable, train_config: Any, example_inputs: Any = None,
                    calib: Iterable | None = None, eval_loader: Iterable | None = None) -> tuple[nn.Module, list[dict]]:
    """Prune to each sparsity in turn, fine-tuning in between (masks re-applied after every step).

    Mask methods: sparsity is absolute (masks are recomputed from the fine-tuned weights).
    Channel method: each step removes the share of *remaining* channels that brings the group to the
    requested fraction of the original. Returns the model and one record per step."""
    from efficientml.prune.apply import prune
    from efficientml.train import evaluate, fit

    records: list[dict] = []
    done = 0.0
    masks: MaskSet | None = None
    for s in sparsities:
        if config.method == "channel":
            rel = 1.0 - (1.0 - s) / (1.0 - done) if done < 1 else 0.0
            res = prune(model, config.replace(sparsity=max(0.0, rel)), example_inputs=example_inputs,
                        calib=calib, inplace=True)
            model = res.model
        else:
            if masks is not None:
                masks.remove()
            res = prune(model, config.replace(sparsity=s), calib=calib, inplace=True)
            masks = res.masks
        fit(model, train_loader, train_config, after_step=res.after_step)
        rec: dict = {"sparsity": s}
        if eval_loader is not None:
            rec["accuracy"] = evaluate(model, eval_loader)["accuracy"]
        records.append(rec)
        done = s
    if masks is not None:
        masks.remove()
    return model, records
