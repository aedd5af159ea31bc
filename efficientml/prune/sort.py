"""Channel sort: reorder each group's channels by the Frobenius norm of the next layers'
input-channel slices, most important first, without changing what the network computes.

After sorting, "keep the first k channels" keeps the k most important ones — the step that turns
naive keep-the-first-k channel pruning into a usable one. Groups with fixed channels (model inputs/outputs,
skipped ops) or option-A shortcuts (whose padding fixes the channel order) are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.modules import get_module
from efficientml.prune.criteria import InputNorm
from efficientml.prune.graph import CHANNEL_OPS, DependencyGraph
from efficientml.prune.surgery import ChannelPlan

_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def sortable(model: nn.Module, group) -> bool:
    if any(group.frozen) or len(set(group.partition)) > 1:
        return False
    mods = {m.module for ch in group.channels for m in ch}
    return all(isinstance(get_module(model, n), _PLAIN) for n in mods)


@torch.no_grad()
def sort_channels(model: nn.Module, graph: DependencyGraph) -> ChannelPlan:
    """Permute ``model``'s channels in place (most important first); returns the permutation plan."""
    key = InputNorm()
    kept = {}
    for g in graph.groups:
        if sortable(model, g):
            kept[g.id] = torch.argsort(key.channel_scores(model, g, {}), descending=True, stable=True).tolist()
    plan = ChannelPlan(graph, kept, permute=True)
    plan.apply(model)
    return plan


__all__ = ["sort_channels", "sortable", "CHANNEL_OPS"]
