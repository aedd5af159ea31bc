"""Pruning: masks at every granularity, pluggable criteria, a channel dependency graph with real
surgery, schedules, sensitivity scans, automatic ratio search (NetAdapt, AMC) and sparse execution.

    from efficientml.prune import PruneConfig, prune
    res = prune(model, PruneConfig(method="channel", sparsity=0.3), example_inputs=x)
    smaller = res.model                      # a plain nn.Module with fewer channels

A module type the channel graph does not know is taught with ``register_channel_op(type, trace,
shrink)``, a function called in ``forward`` with ``register_channel_op(fn, trace)`` (see
:mod:`efficientml.core.channels`; ``trace`` records :class:`Member` s through a
:class:`TraceContext`). PyTorch's own modules and ``F.pad`` are registered when this package is imported.

Heavier pieces (sensitivity, netadapt, amc, sparse, report) are imported from their modules.
"""

from efficientml.prune.apply import PruneResult, channels_to_keep, compute_masks, prune, recalibrate_bn
from efficientml.prune.config import GRANULARITIES, PruneConfig
from efficientml.prune.criteria import CRITERIA, Criterion, bn_l1_penalty
from efficientml.prune.graph import ChannelGroup, DependencyGraph, Member, TraceContext, register_channel_op
from efficientml.prune.masks import MaskSet, make_mask
from efficientml.prune.surgery import ChannelPlan, channel_attrs, resize_like

__all__ = [
    "CRITERIA", "ChannelGroup", "ChannelPlan", "Criterion", "DependencyGraph", "GRANULARITIES",
    "MaskSet", "PruneConfig", "PruneResult", "bn_l1_penalty", "channel_attrs", "channels_to_keep", "compute_masks", "make_mask", "prune", "recalibrate_bn",
    "Member", "TraceContext", "register_channel_op", "resize_like",
]
