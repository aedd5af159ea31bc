"""The pruning handler for :func:`efficientml.apply`, and ``prune(model, config, example_inputs=…,
calib=…)``, its older spelling (``apply(model, config, calib=…, example_inputs=…)``).

- ``method="channel"``: builds the dependency graph, scores each group's channels with the
  criterion, removes ``sparsity`` of every group's prunable channels (per partition, see graph.py)
  and physically shrinks the layers; with ``criterion="thinet"`` and ``refit`` the next layers are
  refit by least squares. Returns a plain, smaller model.
- every other method: computes masks per layer and attaches them (:class:`MaskSet`); pass
  ``result.masks`` as ``after_step`` to ``train.fit`` and call ``result.masks.remove()`` at the end.

Which layers: ``filter`` (default: every Conv1d/Conv2d/Linear). Path: "real" for channel pruning
(smaller layers), "simulated" for masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.core.modules import get_module
from efficientml.core.transform import LayerFilter, TransformResult, apply, as_filter, register_transform
from efficientml.prune.config import PruneConfig
from efficientml.prune.criteria import CRITERIA, calib_batches
from efficientml.prune.graph import DependencyGraph
from efficientml.prune.masks import MaskSet, make_mask
from efficientml.prune.surgery import ChannelPlan

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class PruneResult(TransformResult):
    """The one result type plus pruning's artifacts: the masks (attached) or the channel plan."""

    masks: MaskSet | None = None
    plan: ChannelPlan | None = None
    skipped: list[str] = field(default_factory=list)      # layers/ops left unpruned, with the reason
    refit: list[Any] = field(default_factory=list)         # RefitResult per refit layer (thinet)

    def after_step(self, model: nn.Module) -> None:
        """Re-apply masks after an optimizer step (a no-op for physically pruned models)."""
        if self.masks is not None:
            self.masks.apply(model)

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {"config": self.config.to_dict(), "skipped": self.skipped}
        if self.masks is not None:
            d["layer_sparsity"] = self.masks.sparsity()
        if self.plan is not None:
            d["channels"] = {g.name: {"before": len(g), "after": len(self.plan.kept.get(g.id, range(len(g))))}
                             for g in self.plan.graph.groups}
        if self.refit:
            d["refit"] = [vars(r) for r in self.refit]
        return d


def _check_layers(model: nn.Module, config: PruneConfig, filt: LayerFilter) -> None:
    filt.check(model)                                      # raises ConfigError naming the unknown layer
    for name, _ in config.per_layer:
        get_module(model, name)


def prune(model: nn.Module, config: PruneConfig, example_inputs: Any = None,
          calib: Iterable | None = None, inplace: bool = False, *, filter: Any = None) -> PruneResult:
    """``apply(model, config, calib=calib, filter=filter, inplace=inplace, example_inputs=…)``:
    ``model`` is copied first unless ``inplace``."""
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prune() takes a PruneConfig, got {type(config).__name__}")
    return apply(model, config, calib=calib, filter=filter, inplace=inplace, example_inputs=example_inputs)


@register_transform(PruneConfig)
def _prune(model: nn.Module, config: PruneConfig, *, calib: Any, filter: LayerFilter,
           example_inputs: Any = None) -> PruneResult:
    _check_layers(model, config, filter)
    criterion = CRITERIA.get(config.criterion)
    batches = calib_batches(calib, config.calib_batches)
    if criterion.needs_data and not batches:
        raise ConfigError(f"criterion {config.criterion!r} needs calibration data: pass calib=<loader>")
    if config.method == "channel":
        # refit targets come from the unpruned model (apply already copied it unless inplace)
        original = copy.deepcopy(model) if config.criterion == "thinet" and config.refit else model
        res = _prune_channels(model, original, config, criterion, example_inputs, batches, filter)
        res.layers = res.summary()["channels"]
        return res
    res = _prune_masks(model, config, criterion, batches, filter)
    res.layers = res.masks.sparsity()
    return res


def _selected(model: nn.Module, filt: LayerFilter, types: tuple) -> list[str]:
    return filt.select(model, types)


def compute_masks(model: nn.Module, config: PruneConfig, criterion: Any = None, state: dict | None = None,
                  filter: Any = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Masks for every layer ``filter`` selects (and the layers skipped, with why), without attaching
    them. An explicit selection (names or globs) is not silently skipped: a layer the method cannot
    prune raises."""
    criterion = criterion if criterion is not None else CRITERIA.get(config.criterion)
    state = state if state is not None else {}
    filt = as_filter(filter)
    names = _selected(model, filt, _WEIGHTED)
    skipped: list[str] = []
    scores: dict[str, torch.Tensor] = {}
    for name in names:
        mod = get_module(model, name)
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise ConfigError(f"layer {name!r} ({type(mod).__name__}) has no weight to prune")
        auto = not filt.explicit
        if auto and config.method in ("pattern", "kernel") and (mod.weight.dim() < 4 or mod.weight[0, 0].numel() < 2):
            skipped.append(f"{name}: {config.method} pruning needs k×k conv kernels")
            continue
        if auto and config.method == "nm" and mod.weight.shape[1] % config.m:
            skipped.append(f"{name}: {mod.weight.shape[1]} input channels not divisible by M={config.m}")
            continue
        scores[name] = criterion.element_scores(name, mod, state)
    if config.method == "fine" and config.scope == "global" and scores:
        flat = torch.cat([s.flatten().float().cpu() for s in scores.values()])
        n_zero = int(round(config.sparsity * flat.numel()))
        order = torch.argsort(flat, stable=True)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[order[:n_zero]] = False                      # exactly n_zero zeros over all layers
        masks, at = {}, 0
        for n, s in scores.items():
            masks[n] = keep[at:at + s.numel()].view(s.shape).to(s.device)
            at += s.numel()
    else:
        masks = {n: make_mask(s, config.method, config.sparsity_of(n), n=config.n, m=config.m,
                              keep=config.pattern_keep, num_patterns=config.num_patterns, layer=n)
                 for n, s in scores.items()}
    return masks, skipped


def _prune_masks(model: nn.Module, config: PruneConfig, criterion: Any, batches: list,
                 filt: LayerFilter) -> PruneResult:
    state = criterion.prepare(model, batches) if not criterion.channel_only else {}
    masks, skipped = compute_masks(model, config, criterion, state, filt)
    return PruneResult(model, config, "simulated", masks=MaskSet(model, masks), skipped=skipped)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, max_batches: int = 8) -> nn.Module:
    """Re-estimate BatchNorm running statistics on a few batches (no weights change): removing
    channels shifts the statistics the next layers see, and stale ones can hide a good selection."""
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.track_running_stats]
    if not bns:
        return model
    was = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                                  # cumulative average over the batches
    model.train()
    dev = next(model.parameters()).device
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return model


def channels_to_keep(n: int, sparsity: float, round_to: int = 1) -> int:
    keep = n - int(round(sparsity * n))
    if round_to > 1:
        keep = min(n, max(round_to, round_to * round(keep / round_to)))
    return max(1, keep)


def _prune_channels(model: nn.Module, original: nn.Module, config: PruneConfig, criterion: Any,
                    example_inputs: Any, batches: list, filt: LayerFilter) -> PruneResult:
    if example_inputs is None:
        raise ConfigError("channel pruning traces the model: pass example_inputs (a batch of inputs)")
    graph = DependencyGraph.build(model, example_inputs, config.on_unsupported)
    if config.sort_inputs:
        from efficientml.prune.sort import sort_channels

        sort_channels(model, graph)
        if config.criterion == "thinet":
            original = copy.deepcopy(model)  # refit targets come from the sorted, unpruned model
    narrowed = filt.explicit or bool(filt.types)
    wanted = set(filt.select(model, _WEIGHTED)) if narrowed else None
    modules = dict(model.named_modules())
    state = criterion.prepare(model, batches, graph)
    kept: dict[int, list[int]] = {}
    for g in graph.groups:
        producers = set(g.producers)
        if wanted is not None and not (producers & wanted):
            continue
        if any(filt.excluded(p, modules.get(p)) for p in producers) or g.prunable == 0:
            continue
        sparsity = config.sparsity
        for name, s in config.per_layer:
            if name in producers:
                sparsity = float(s)
        if sparsity == 0:
            continue
        scores = criterion.channel_scores(model, g, state)
        removed: set[int] = set()
        for p in sorted(set(g.partition)):
            free = [i for i in range(len(g)) if g.partition[i] == p and not g.frozen[i]]
            if not free:
                continue
            n_remove = len(free) - channels_to_keep(len(free), sparsity, config.round_to)
            order = sorted(free, key=lambda i: (float(scores[i]), i))
            removed.update(order[:n_remove])
        kept[g.id] = [i for i in range(len(g)) if i not in removed]
    plan = ChannelPlan(graph, kept)
    plan.apply(model)
    result = PruneResult(model, config, "real", plan=plan, skipped=list(graph.skipped))
    if config.criterion == "thinet" and config.refit:
        from efficientml.prune.refit import refit_consumers

        result.refit = refit_consumers(original, model, plan, batches)
    return result
