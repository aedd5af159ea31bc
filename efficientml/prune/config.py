"""The pruning config: one frozen dataclass selects granularity, criterion and ratios.

    prune(model, PruneConfig(method="channel", sparsity=0.3, criterion="l2"), example_inputs=x)
    efficientml.apply(model, PruneConfig(sparsity=0.5), filter=LayerFilter(exclude=("classifier",)))

Which layers: ``apply``'s ``filter`` (:class:`efficientml.core.transform.LayerFilter`; default: every
Conv1d/Conv2d/Linear; for channel pruning, a group is pruned when one of the layers producing its
channels is selected and none is excluded).

``sparsity`` is the fraction *removed*: of weights (fine/pattern/vector/kernel), of channels (channel).
Per-layer overrides name layers by their dotted module name (``backbone.conv3``); for channel pruning
the name is a layer that produces the group's channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError

GRANULARITIES = ("fine", "pattern", "nm", "vector", "kernel", "channel")


@dataclass(frozen=True)
class PruneConfig(Config):
    kind: ClassVar[str] = "prune"

    method: str = "fine"                        # one of GRANULARITIES
    sparsity: float = 0.5                       # fraction removed, in [0, 1)
    criterion: str = "l2"                       # a name in efficientml.prune.criteria.CRITERIA
    n: int = 2                                  # N:M — keep at most n of every m along the input dim
    m: int = 4
    pattern_keep: int = 4                       # pattern: positions kept per k×k kernel
    num_patterns: int = 8                       # pattern: size of the pattern library
    per_layer: tuple[tuple[str, float], ...] = ()  # (layer, sparsity) overrides
    scope: str = "local"                        # fine-grained: per-layer ("local") or one global threshold
    sort_inputs: bool = False                   # channel: sort input channels by norm before pruning
    on_unsupported: str = "error"               # channel: "error" or "skip" (leave that group unpruned)
    refit: bool = True                          # criterion "thinet": least-squares refit of next layers
    calib_batches: int = 4                      # batches of calibration data for data-driven criteria
    round_to: int = 1                           # channel: kept channel counts rounded to a multiple

    def validate(self) -> None:
        check_choice("method", self.method, GRANULARITIES)
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        check_choice("scope", self.scope, {"local", "global"})
        check_choice("on_unsupported", self.on_unsupported, {"error", "skip"})
        if self.n < 1 or self.m < 1:
            raise ConfigError(f"N and M must be positive integers, got N={self.n}, M={self.m}")
        if self.n > self.m:
            raise ConfigError(f"N:M sparsity needs N ≤ M (keep N of every M weights), got N={self.n} > M={self.m}")
        if self.pattern_keep < 1:
            raise ConfigError(f"pattern_keep must be ≥ 1, got {self.pattern_keep}")
        if self.num_patterns < 1:
            raise ConfigError(f"num_patterns must be ≥ 1, got {self.num_patterns}")
        if self.calib_batches < 1:
            raise ConfigError(f"calib_batches must be ≥ 1, got {self.calib_batches}")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be ≥ 1, got {self.round_to}")
        for item in self.per_layer:
            if len(item) != 2:
                raise ConfigError(f"per_layer entries are (layer name, sparsity) pairs, got {item!r}")
            check_range(f"sparsity of layer {item[0]!r}", float(item[1]), 0.0, 1.0, hi_open=True)

    def sparsity_of(self, layer: str) -> float:
        """The sparsity for ``layer``: its per-layer override, else the global one."""
        for name, s in self.per_layer:
            if name == layer:
                return float(s)
        return self.sparsity

    def replace(self, **changes: object) -> "PruneConfig":
        import dataclasses

        return dataclasses.replace(self, **changes)
