"""The network-level search space of the once-for-all supernet: MobileNetV2 inverted bottlenecks
(MBConv) in stages, with a choice per stage (depth) and per block (depthwise kernel, expand ratio),
plus the input resolution and a width multiplier for the whole network (TinyNAS's space knobs).

A stage is ``(channels, max_depth, first_stride)``; its first block changes the width and stride, the
others keep them (residual). Channel counts are ``make_divisible(c × width, 8)``, as in the zoo.
An :class:`Arch` names one network of the space: ``kernels`` and ``expands`` have one entry per block
*slot* (``sum(max_depth)``), and a stage of depth ``d`` uses its first ``d`` slots; the entries of
unused slots are kept but mean nothing (:meth:`MBSpace.canonical` sets them to the largest choice, so
two Arch values name the same network exactly when their canonical forms are equal).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Iterator

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.models.mobilenetv2 import make_divisible


@dataclass(frozen=True)
class Arch(Config):
    """One network of an :class:`MBSpace` (see the module docstring)."""

    kind = "nas_arch"

    resolution: int
    width: float
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expands: tuple[float, ...]

    def key(self) -> str:
        """A short readable id, e.g. ``r28-w1.0-d2.3-k35.337-e64.346``."""
        return (f"r{self.resolution}-w{self.width}-d{'.'.join(map(str, self.depths))}-"
                f"k{''.join(map(str, self.kernels))}-e{''.join(str(int(e)) for e in self.expands)}")


@dataclass(frozen=True)
class MBSpace(Config):
    """Choices of the space; the defaults fit Fashion-MNIST (28×28, one channel, 10 classes)."""

    kind = "nas_mbspace"

    in_channels: int = 1
    num_classes: int = 10
    stem: int = 16
    stem_stride: int = 1
    stages: tuple[tuple[int, int, int], ...] = ((24, 3, 2), (40, 3, 2), (80, 3, 2), (96, 2, 1))
    head: int = 256
    kernels: tuple[int, ...] = (3, 5, 7)
    expands: tuple[float, ...] = (3, 4, 6)
    min_depths: tuple[int, ...] = (1, 1, 1, 1)
    resolutions: tuple[int, ...] = (20, 24, 28)
    widths: tuple[float, ...] = (1.0,)
    dropout: float = 0.1

    def validate(self) -> None:
        if len(self.min_depths) != len(self.stages):
            raise ConfigError(f"min_depths has {len(self.min_depths)} entries for {len(self.stages)} stages; "
                              "expected one per stage")
        for (c, d, s), lo in zip(self.stages, self.min_depths):
            if c <= 0 or d <= 0 or s not in (1, 2) or not 1 <= lo <= d:
                raise ConfigError(f"stage {(c, d, s)} with min depth {lo} is invalid; expected channels > 0, "
                                  "max depth > 0, stride 1 or 2 and 1 ≤ min depth ≤ max depth")
        if not self.kernels or any(k % 2 == 0 or k < 1 for k in self.kernels):
            raise ConfigError(f"kernels must be odd sizes, got {self.kernels}")
        if not self.expands or any(e <= 0 for e in self.expands):
            raise ConfigError(f"expand ratios must be positive, got {self.expands}")

    # ------------------------------------------------------------------ shapes
    @property
    def n_slots(self) -> int:
        return sum(d for _, d, _ in self.stages)

    def stage_channels(self, width: float) -> list[int]:
        return [make_divisible(c * width) for c, _, _ in self.stages]

    def stem_channels(self, width: float) -> int:
        return make_divisible(self.stem * width)

    def head_channels(self, width: float) -> int:
        return make_divisible(self.head * max(1.0, width))

    def blocks(self, arch: Arch) -> Iterator[tuple[int, int, int, int, float, int]]:
        """(slot, in_channels, out_channels, stride, expand, kernel) of every active block, in order."""
        c_in = self.stem_channels(arch.width)
        slot = 0
        for (c, dmax, s), d, c_out in zip(self.stages, arch.depths, self.stage_channels(arch.width)):
            for i in range(d):
                yield slot + i, c_in, c_out, s if i == 0 else 1, arch.expands[slot + i], arch.kernels[slot + i]
                c_in = c_out
            slot += dmax

    # ------------------------------------------------------------------ members
    def check(self, arch: Arch) -> None:
        """Raise ConfigError unless ``arch`` belongs to this space."""
        bad = []
        if arch.resolution not in self.resolutions:
            bad.append(f"resolution {arch.resolution} not in {self.resolutions}")
        if arch.width not in self.widths:
            bad.append(f"width {arch.width} not in {self.widths}")
        if len(arch.depths) != len(self.stages) or any(
                not lo <= d <= dmax for d, lo, (_, dmax, _) in zip(arch.depths, self.min_depths, self.stages)):
            ranges = [(lo, d) for lo, (_, d, _) in zip(self.min_depths, self.stages)]
            bad.append(f"depths {arch.depths} outside the (min, max) per stage {ranges}")
        if len(arch.kernels) != self.n_slots or any(k not in self.kernels for k in arch.kernels):
            bad.append(f"kernels {arch.kernels} are not {self.n_slots} entries of {self.kernels}")
        if len(arch.expands) != self.n_slots or any(e not in self.expands for e in arch.expands):
            bad.append(f"expands {arch.expands} are not {self.n_slots} entries of {self.expands}")
        if bad:
            raise ConfigError("the architecture is not in the search space: " + "; ".join(bad))

    def canonical(self, arch: Arch) -> Arch:
        """``arch`` with the choices of unused slots set to the largest (one name per network)."""
        ks, es, slot = list(arch.kernels), list(arch.expands), 0
        for (_, dmax, _), d in zip(self.stages, arch.depths):
            for i in range(d, dmax):
                ks[slot + i], es[slot + i] = max(self.kernels), max(self.expands)
            slot += dmax
        return dataclasses.replace(arch, kernels=tuple(ks), expands=tuple(es))

    def largest(self, resolution: int | None = None, width: float | None = None) -> Arch:
        return Arch(resolution or max(self.resolutions), max(self.widths) if width is None else width,
                    tuple(d for _, d, _ in self.stages), (max(self.kernels),) * self.n_slots,
                    (max(self.expands),) * self.n_slots)

    def smallest(self, resolution: int | None = None, width: float | None = None) -> Arch:
        return self.canonical(Arch(resolution or min(self.resolutions), min(self.widths) if width is None else width,
                                   tuple(self.min_depths), (min(self.kernels),) * self.n_slots,
                                   (min(self.expands),) * self.n_slots))

    def sample(self, rng: random.Random, *, resolution: int | None = None, width: float | None = None,
               kernels: tuple[int, ...] | None = None, expands: tuple[float, ...] | None = None,
               depth: bool = True) -> Arch:
        """A uniformly random member; keyword arguments restrict the choices (progressive shrinking:
        e.g. ``expands=(6,)`` keeps the widest blocks, ``depth=False`` the deepest stages)."""
        ks, es = kernels or self.kernels, expands or self.expands
        depths = tuple(rng.randint(lo, d) if depth else d for lo, (_, d, _) in zip(self.min_depths, self.stages))
        return self.canonical(Arch(
            resolution or rng.choice(self.resolutions), rng.choice(self.widths) if width is None else width,
            depths, tuple(rng.choice(ks) for _ in range(self.n_slots)),
            tuple(rng.choice(es) for _ in range(self.n_slots))))

    def mutate(self, arch: Arch, rng: random.Random, p: float) -> Arch:
        """Each gene (resolution, width, every stage depth, every slot's kernel and expand) resampled with
        probability ``p``."""
        pick = (lambda old, choices: rng.choice(choices) if rng.random() < p else old)
        depths = tuple(pick(d, list(range(lo, dmax + 1))) for d, lo, (_, dmax, _) in
                       zip(arch.depths, self.min_depths, self.stages))
        return self.canonical(Arch(pick(arch.resolution, self.resolutions), pick(arch.width, self.widths), depths,
                                   tuple(pick(k, self.kernels) for k in arch.kernels),
                                   tuple(pick(e, self.expands) for e in arch.expands)))

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Each gene from ``a`` or ``b`` with probability 1/2."""
        pick = (lambda x, y: x if rng.random() < 0.5 else y)
        return self.canonical(Arch(pick(a.resolution, b.resolution), pick(a.width, b.width),
                                   tuple(map(pick, a.depths, b.depths)), tuple(map(pick, a.kernels, b.kernels)),
                                   tuple(map(pick, a.expands, b.expands))))

    def size(self) -> int:
        """Number of distinct networks (canonical forms) in the space."""
        per_block = len(self.kernels) * len(self.expands)
        n = len(self.resolutions) * len(self.widths)
        for lo, (_, dmax, _) in zip(self.min_depths, self.stages):
            n *= sum(per_block ** d for d in range(lo, dmax + 1))
        return n

    def encode(self, arch: Arch) -> list[float]:
        """A fixed-length feature vector for predictors: one-hot kernel and expand per slot (zeros for
        unused slots), one-hot depth per stage, resolution and width one-hot."""
        feats: list[float] = []
        slot = 0
        for (_, dmax, _), d, lo in zip(self.stages, arch.depths, self.min_depths):
            feats += [float(d == v) for v in range(lo, dmax + 1)]
            for i in range(dmax):
                on = i < d
                feats += [float(on and arch.kernels[slot + i] == k) for k in self.kernels]
                feats += [float(on and arch.expands[slot + i] == e) for e in self.expands]
            slot += dmax
        feats += [float(arch.resolution == r) for r in self.resolutions]
        feats += [float(arch.width == w) for w in self.widths] if len(self.widths) > 1 else []
        return feats
