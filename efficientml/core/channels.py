"""The channel-op registry: how a module type moves channels, and how it is rebuilt with fewer.

Channel pruning (:mod:`efficientml.prune.graph` and :mod:`efficientml.prune.surgery`) follows every
tensor's channel dimension (dim 1) through a traced model as a list of *channel ids*. What a module
does to those ids is data in :data:`CHANNEL_OPS`, keyed by module type:

- ``trace(ctx, module, in_ids) -> out_ids`` records, through ``ctx.ids``, which channels the module
  reads (``Member(ctx.name, "in", i)``) and writes (``Member(ctx.name, "out", j)``), creates fresh ids
  for new channels, ties ids that must be removed together (``union``) and fixes ids that must stay
  (``freeze``);
- ``shrink(module, keep_in, keep_out) -> module`` builds the smaller module (``None`` keeps a side
  whole);
- ``attrs`` names the weightless attributes that shrinking changes (e.g. a padding module's channel
  counts), saved beside a pruned state dict so the architecture can be rebuilt.

Functions met in ``forward`` code (``F.pad``, a user's own helper) are registered the same way, in
:data:`FUNCTION_OPS`: their ``trace`` receives a :class:`FunctionCall` (the function and its arguments,
each tensor argument replaced by a :class:`TensorArg` holding its shape) in place of the module, and
they have no ``shrink`` (a function holds no weights to rebuild).

The registry lives in core, not in prune, so that a model zoo (or a user's package) can describe its
own modules at import without importing the pruning layer above it. PyTorch's built-in modules are
registered by :mod:`efficientml.prune.channel_ops` when :mod:`efficientml.prune` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from efficientml.core.errors import ConfigError


@dataclass(frozen=True)
class Member:
    """One place a channel lives: ``module``'s input or output channel ``index``."""

    module: str
    role: str      # "in" or "out"
    index: int


class ChannelIds:
    """Union-find over channel ids: ids in one set are removed together."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.members: dict[int, set[Member]] = {}
        self.frozen: set[int] = set()

    def fresh(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def add(self, cid: int, member: Member) -> None:
        self.members.setdefault(cid, set()).add(member)

    def freeze(self, ids: list[int]) -> None:
        self.frozen.update(ids)


@dataclass
class TraceContext:
    """What a channel op's ``trace`` sees: the id table and shapes of its input/output."""

    ids: ChannelIds
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument of a traced function call, by its shape."""

    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class FunctionCall:
    """What a registered function's ``trace`` sees in place of a module: the call's target and its
    arguments (tensors replaced by :class:`TensorArg`)."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: dict


TraceFn = Callable[[TraceContext, Any, list[int]], list[int]]   # (ctx, module or FunctionCall, ids)
ShrinkFn = Callable[[nn.Module, "list[int] | None", "list[int] | None"], nn.Module]


@dataclass(frozen=True)
class ChannelOp:
    """How a module type moves channel ids (``trace``) and is rebuilt with fewer (``shrink``)."""

    trace: TraceFn
    shrink: ShrinkFn | None = None
    attrs: tuple[str, ...] = ()   # weightless attributes shrink changes (saved with a pruned model)


CHANNEL_OPS: dict[type, ChannelOp] = {}
FUNCTION_OPS: dict[Callable[..., Any], ChannelOp] = {}   # functions (F.pad …) called in forward code


def register_channel_op(target: type | Callable[..., Any], trace: TraceFn, shrink: ShrinkFn | None = None, *,
                        attrs: tuple[str, ...] = ()) -> None:
    """Teach the graph (and surgery) a module type or a function.

    For an ``nn.Module`` subclass: ``trace(ctx, module, in_ids) -> out_ids`` and ``shrink(module,
    keep_in, keep_out) -> new module`` (``None`` keeps that side whole); ``attrs`` are the weightless
    attributes ``shrink`` changes. For a function (``F.pad``): ``trace(ctx, call, in_ids)`` with a
    :class:`FunctionCall`, ``in_ids`` being the first tensor argument's ids; no ``shrink`` or
    ``attrs``. A later registration replaces an earlier one."""
    is_module = isinstance(target, type) and issubclass(target, nn.Module)
    if not is_module and (isinstance(target, type) or not callable(target)):
        raise ConfigError(f"register_channel_op needs an nn.Module subclass or a function, got {target!r}")
    label = getattr(target, "__name__", repr(target))
    if not callable(trace) or (shrink is not None and not callable(shrink)):
        raise ConfigError(f"register_channel_op({label}, …) needs a callable trace "
                          f"and a callable shrink or None")
    if is_module:
        CHANNEL_OPS[target] = ChannelOp(trace, shrink, tuple(attrs))
        return
    if shrink is not None or attrs:
        raise ConfigError(f"register_channel_op({label}, …): a function has no weights to rebuild, so it "
                          f"takes no shrink or attrs (pass only trace)")
    FUNCTION_OPS[target] = ChannelOp(trace)
