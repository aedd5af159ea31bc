"""Cell-level (DARTS, Liu et al. 2019) and block-level network search spaces.

**Cells.** A cell reads the outputs of the two previous cells (inputs 0 and 1, each brought to the
cell width ``C`` by a 1×1 ReLU-conv-BN, or a factorized reduce when the one before last is at twice
the resolution) and computes ``N`` intermediate nodes ``2 … N+1``; node ``i`` is the sum of two ops
from :data:`OPS`, each applied to an earlier node. The cell's output is the concat of the nodes in
``concat``, brought back to ``C`` channels by a 1×1 conv + BN. A **normal** cell keeps the resolution;
a **reduction** cell runs the ops that read inputs 0 and 1 with stride 2 (``skip_connect`` becomes a
factorized reduce), halving it. A :class:`Genotype` names both cells: ``(op, input)`` pairs, two per
node. :class:`CellNet` stacks ``layers`` cells after a 3×3 stem of ``3C`` channels, with reduction
cells (which double ``C``) at 1/3 and 2/3 of the depth, then global pooling and a linear classifier.

**Blocks.** :class:`BlockSpace` is a network-level space over :data:`~efficientml.nas.blocks.BLOCKS`:
per stage, one block type, its choices (from :attr:`BlockSpace.options`) and a depth. It samples,
mutates, crosses over and encodes :class:`BlockArch` values and builds them (stem, stages, head).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.nas.blocks import BLOCKS, block_choices, build_block

# --- cell ops ----------------------------------------------------------------------------------


class Zero(nn.Module):
    """The ``none`` op: zeros of the (strided) input's shape; an edge that contributes nothing."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two stride-2 1×1 convs, one shifted by a pixel."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]   # odd sides: both halves end at ⌈H/2⌉
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


def _relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int, dilation: int = 1,
                  depthwise: bool = False) -> list[nn.Module]:
    pad = dilation * (kernel - 1) // 2
    layers: list[nn.Module] = [nn.ReLU(inplace=False)]
    if depthwise:  # depthwise k×k then pointwise 1×1
        layers += [nn.Conv2d(c_in, c_in, kernel, stride, pad, dilation, groups=c_in, bias=False),
                   nn.Conv2d(c_in, c_out, 1, bias=False)]
    else:
        layers.append(nn.Conv2d(c_in, c_out, kernel, stride, pad, dilation, bias=False))
    return layers + [nn.BatchNorm2d(c_out)]


def _sep_conv(c: int, kernel: int, stride: int) -> nn.Module:
    """DARTS' separable conv: (ReLU, depthwise, pointwise, BN) twice, the first with the stride."""
    return nn.Sequential(*_relu_conv_bn(c, c, kernel, stride, depthwise=True),
                         *_relu_conv_bn(c, c, kernel, 1, depthwise=True))


OPS: dict[str, Callable[[int, int], nn.Module]] = {  # name → (C, stride) → module, C channels in and out
    "none": lambda c, s: Zero(s),
    "max_pool_3x3": lambda c, s: nn.MaxPool2d(3, s, 1),
    "avg_pool_3x3": lambda c, s: nn.AvgPool2d(3, s, 1, count_include_pad=False),
    "skip_connect": lambda c, s: nn.Identity() if s == 1 else FactorizedReduce(c, c),
    "sep_conv_3x3": lambda c, s: _sep_conv(c, 3, s),
    "sep_conv_5x5": lambda c, s: _sep_conv(c, 5, s),
    "dil_conv_3x3": lambda c, s: nn.Sequential(*_relu_conv_bn(c, c, 3, s, dilation=2, depthwise=True)),
}
PRIMITIVES: tuple[str, ...] = tuple(OPS)


# --- genotype ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Genotype(Config):
    """A normal and a reduction cell: ``(op, input)`` pairs, two per node, and the nodes to concat.

    Node ``i`` (numbered from 2; 0 and 1 are the cell inputs) sums pairs ``2(i-2)`` and ``2(i-2)+1``,
    whose inputs must be below ``i``.
    """

    kind = "nas_genotype"

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]

    def validate(self) -> None:
        for which, pairs, concat in (("normal", self.normal, self.normal_concat),
                                     ("reduce", self.reduce, self.reduce_concat)):
            if not pairs or len(pairs) % 2:
                raise ConfigError(f"the {which} cell has {len(pairs)} (op, input) pairs; expected two per node")
            for k, (op, j) in enumerate(pairs):
                if op not in OPS:
                    raise ConfigError(f"unknown cell op {op!r} in the {which} cell; expected one of {PRIMITIVES}")
                if not 0 <= j < k // 2 + 2:
                    raise ConfigError(f"node {k // 2 + 2} of the {which} cell reads input {j}; expected an "
                                      f"earlier node, 0 … {k // 2 + 1}")
            nodes = range(2, len(pairs) // 2 + 2)
            if not concat or any(j not in nodes for j in concat):
                raise ConfigError(f"the {which} cell concatenates {concat}; expected intermediate nodes "
                                  f"among {tuple(nodes)}")


def _sample_cell(rng: random.Random, nodes: int, ops: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    pairs: list[tuple[str, int]] = []
    for i in range(nodes):
        for j in sorted(rng.sample(range(i + 2), 2)):   # two distinct earlier nodes, as DARTS derives
            pairs.append((rng.choice(ops), j))
    return tuple(pairs)


def sample_genotype(rng: random.Random, nodes: int = 4,
                    ops: tuple[str, ...] = tuple(p for p in PRIMITIVES if p != "none")) -> Genotype:
    """A uniformly random genotype: per node two distinct earlier inputs and an op for each; all nodes
    concatenated. ``none`` is left out by default, as DARTS leaves it out of derived cells."""
    if nodes < 1:
        raise ConfigError(f"a cell needs at least one intermediate node, got nodes={nodes}")
    concat = tuple(range(2, nodes + 2))
    return Genotype(_sample_cell(rng, nodes, ops), concat, _sample_cell(rng, nodes, ops), concat)


# --- cells and the network ---------------------------------------------------------------------


class Cell(nn.Module):
    """One normal or reduction cell of ``genotype`` at width ``c`` (see the module docstring)."""

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        pairs, concat = ((genotype.reduce, genotype.reduce_concat) if reduction
                         else (genotype.normal, genotype.normal_concat))
        self.reduction = reduction
        self.pre0 = (FactorizedReduce(c_prev_prev, c) if reduction_prev
                     else nn.Sequential(*_relu_conv_bn(c_prev_prev, c, 1, 1)))
        self.pre1 = nn.Sequential(*_relu_conv_bn(c_prev, c, 1, 1))
        self.inputs = [j for _, j in pairs]
        self.ops = nn.ModuleList(OPS[op](c, 2 if reduction and j < 2 else 1) for op, j in pairs)
        self.concat = list(concat)
        self.project = nn.Sequential(nn.Conv2d(len(concat) * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]                 # both (B, C, H, W)
        for k in range(0, len(self.ops), 2):
            states.append(self.ops[k](states[self.inputs[k]]) + self.ops[k + 1](states[self.inputs[k + 1]]))
        out = torch.cat([states[j] for j in self.concat], dim=1)  # (B, len(concat)·C, H', W')
        return self.project(out)                                # (B, C, H', W')


class CellNet(nn.Module):
    """A stem (3×3 conv + BN to ``3C``), ``layers`` cells, global average pooling and a classifier."""

    def __init__(self, genotype: Genotype, C: int = 16, layers: int = 8, num_classes: int = 10,
                 in_channels: int = 3, stem_multiplier: int = 3):
        super().__init__()
        if C < 1 or layers < 1:
            raise ConfigError(f"CellNet needs C ≥ 1 and layers ≥ 1, got C={C}, layers={layers}")
        c_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, 1, 1, bias=False), nn.BatchNorm2d(c_stem))
        c_pp, c_p, c, reduction_prev = c_stem, c_stem, C, False
        cells = []
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            c = 2 * c if reduction else c
            cells.append(Cell(genotype, c_pp, c_p, c, reduction, reduction_prev))
            c_pp, c_p, reduction_prev = c_p, c, reduction
        self.cells = nn.ModuleList(cells)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(s1.mean(dim=(2, 3)))              # global average pool → (B, C_last)


# --- network-level block space -----------------------------------------------------------------


def _tuples(v: Any) -> Any:
    """Lists (from JSON) back to tuples, at every depth."""
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


Choices = tuple[tuple[str, Any], ...]  # (choice, value) pairs of one stage, sorted by choice name


@dataclass(frozen=True)
class BlockArch(Config):
    """One network of a :class:`BlockSpace`: per stage a block name, a depth and its choices."""

    kind = "nas_block_arch"

    blocks: tuple[str, ...]
    depths: tuple[int, ...]
    choices: tuple[Choices, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockArch:
        return super().from_dict({k: _tuples(v) if k == "choices" else v for k, v in d.items()})

    def key(self) -> str:
        """A short readable id, e.g. ``mbconv(expand=6,kernel=5)x2-resnet_basic()x1``."""
        return "-".join(f"{b}({','.join(f'{k}={v}' for k, v in ch)})x{d}"
                        for b, d, ch in zip(self.blocks, self.depths, self.choices))


DEFAULT_OPTIONS: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    ("resnet_bottleneck", "bottleneck_ratio", (2, 4)),
    ("resnext", "groups", (2, 4)), ("resnext", "base_width", (16, 32)),
    ("dw_separable", "kernel", (3, 5)),
    ("mbconv", "expand", (3, 6)), ("mbconv", "kernel", (3, 5, 7)),
    ("transformer", "heads", (1, 2, 4)), ("transformer", "mlp_ratio", (2, 4)),
)


@dataclass(frozen=True)
class BlockSpace(Config):
    """Per stage ``(channels, max_depth, first_stride)``: one of ``blocks``, its choices from ``options``
    (``(block, choice, values)``; a choice not listed keeps the builder's default) and a depth
    ``min_depth … max_depth``. The defaults fit Fashion-MNIST (28×28, one channel, 10 classes)."""

    kind = "nas_block_space"

    in_channels: int = 1
    num_classes: int = 10
    stem: int = 16
    stem_stride: int = 1
    stages: tuple[tuple[int, int, int], ...] = ((16, 2, 1), (32, 2, 2), (64, 2, 2))
    blocks: tuple[str, ...] = ("resnet_basic", "resnet_bottleneck", "resnext", "dw_separable", "mbconv",
                               "shuffle", "transformer")
    options: tuple[tuple[str, str, tuple[Any, ...]], ...] = DEFAULT_OPTIONS
    min_depth: int = 1
    dropout: float = 0.0
    resolution: int = 28

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpace:
        return super().from_dict({k: _tuples(v) if k in ("stages", "options") else v for k, v in d.items()})

    def validate(self) -> None:
        if not self.stages or any(c < 1 or not 1 <= self.min_depth <= d or s not in (1, 2)
                                  for c, d, s in self.stages):
            raise ConfigError(f"stages {self.stages} with min depth {self.min_depth} are invalid; expected "
                              "(channels > 0, max depth ≥ min depth ≥ 1, stride 1 or 2) per stage")
        if not self.blocks:
            raise ConfigError("a BlockSpace needs at least one block type")
        for b in self.blocks:
            BLOCKS.get(b)  # unknown names raise with a "did you mean"
        for b, choice, values in self.options:
            if choice not in block_choices(b):
                raise ConfigError(f"block {b!r} has no choice {choice!r}; expected one of {block_choices(b)}")
            if not values:
                raise ConfigError(f"choice {choice!r} of block {b!r} has no values")

    def choices_of(self, block: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        """``(choice, values)`` of ``block``, sorted by choice name."""
        return tuple(sorted((c, v) for b, c, v in self.options if b == block))

    def _sample_stage(self, rng: random.Random, block: str) -> Choices:
        return tuple((c, rng.choice(v)) for c, v in self.choices_of(block))

    def sample(self, rng: random.Random) -> BlockArch:
        """A random member: per stage a uniform block type, depth and value of each of its choices."""
        blocks = tuple(rng.choice(self.blocks) for _ in self.stages)
        return BlockArch(blocks, tuple(rng.randint(self.min_depth, d) for _, d, _ in self.stages),
                         tuple(self._sample_stage(rng, b) for b in blocks))

    def check(self, arch: BlockArch) -> None:
        """Raise ConfigError unless ``arch`` belongs to this space."""
        n = len(self.stages)
        if not len(arch.blocks) == len(arch.depths) == len(arch.choices) == n:
            raise ConfigError(f"the architecture has {len(arch.blocks)} stages; the space has {n}")
        for i, (b, d, ch, (_, dmax, _)) in enumerate(zip(arch.blocks, arch.depths, arch.choices, self.stages)):
            allowed = self.choices_of(b)
            ok = (b in self.blocks and self.min_depth <= d <= dmax and [c for c, _ in ch] == [c for c, _ in allowed]
                  and all(v in vs for (_, v), (_, vs) in zip(ch, allowed)))
            if not ok:
                raise ConfigError(f"stage {i} ({b}, depth {d}, choices {ch}) is not in the space; expected a "
                                  f"block of {self.blocks}, depth {self.min_depth} … {dmax} and choices {allowed}")

    def build(self, arch: BlockArch) -> nn.Sequential:
        """Stem (3×3 conv + BN + ReLU) → stages of the chosen blocks → pool → dropout → linear."""
        self.check(arch)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = nn.Sequential(nn.Conv2d(self.in_channels, self.stem, 3, self.stem_stride, 1, bias=False),
                                       nn.BatchNorm2d(self.stem), nn.ReLU(inplace=True))
        c = self.stem
        for i, ((c_out, _, s), b, d, ch) in enumerate(zip(self.stages, arch.blocks, arch.depths, arch.choices)):
            layers[f"stage{i + 1}"] = nn.Sequential(*(
                build_block(b, c if j == 0 else c_out, c_out, s if j == 0 else 1, **dict(ch)) for j in range(d)))
            c = c_out
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        layers["dropout"] = nn.Dropout(self.dropout)
        layers["classifier"] = nn.Linear(c, self.num_classes)
        return nn.Sequential(layers)

    def canonical(self, arch: BlockArch) -> BlockArch:
        """Every BlockArch names one network (the search strategies' interface)."""
        return arch

    def cost(self, arch: BlockArch) -> dict[str, Any]:
        """Parameters, MACs and int8 peak activation memory of the built model at ``resolution``
        (``analysis.profile`` of it: the search strategies' cost for constraints)."""
        from efficientml.analysis.profile import profile

        p = profile(self.build(arch), (1, self.in_channels, self.resolution, self.resolution))
        return {"params": p.params, "macs": p.macs, "peak_elements": p.peak_activation_elements,
                "peak_bytes_int8": p.peak_activation_bytes(8)}

    def mutate(self, arch: BlockArch, rng: random.Random, p: float) -> BlockArch:
        """Each gene resampled with probability ``p``: a stage's block (with fresh choices), else each
        of its choices; and its depth."""
        blocks, depths, choices = [], [], []
        for b, d, ch, (_, dmax, _) in zip(arch.blocks, arch.depths, arch.choices, self.stages):
            if rng.random() < p:
                b = rng.choice(self.blocks)
                ch = self._sample_stage(rng, b)
            else:
                ch = tuple((c, rng.choice(vs) if rng.random() < p else v)
                           for (c, v), (_, vs) in zip(ch, self.choices_of(b)))
            blocks.append(b)
            depths.append(rng.randint(self.min_depth, dmax) if rng.random() < p else d)
            choices.append(ch)
        return BlockArch(tuple(blocks), tuple(depths), tuple(choices))

    def crossover(self, a: BlockArch, b: BlockArch, rng: random.Random) -> BlockArch:
        """Each stage's block with its choices from ``a`` or ``b``, and each depth, with probability 1/2."""
        stages = [(a.blocks[i], a.choices[i]) if rng.random() < 0.5 else (b.blocks[i], b.choices[i])
                  for i in range(len(self.stages))]
        depths = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.depths, b.depths))
        return BlockArch(tuple(s[0] for s in stages), depths, tuple(s[1] for s in stages))

    def encode(self, arch: BlockArch) -> list[float]:
        """Per stage: one-hot block, one-hot depth, one-hot value of every choice of every block (zeros
        for the blocks not chosen) — a fixed-length vector for predictors."""
        feats: list[float] = []
        for b, d, ch, (_, dmax, _) in zip(arch.blocks, arch.depths, arch.choices, self.stages):
            feats += [float(b == x) for x in self.blocks]
            feats += [float(d == x) for x in range(self.min_depth, dmax + 1)]
            for x in self.blocks:
                mine = dict(ch) if x == b else {}
                feats += [float(c in mine and mine[c] == v) for c, vs in self.choices_of(x) for v in vs]
        return feats

    def size(self) -> int:
        """Number of distinct networks in the space."""
        per_block = 0
        for b in self.blocks:
            n = 1
            for _, vs in self.choices_of(b):
                n *= len(vs)
            per_block += n
        total = 1
        for _, dmax, _ in self.stages:
            total *= per_block * (dmax - self.min_depth + 1)
        return total
