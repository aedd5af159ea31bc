"""Building blocks of the classic efficient architectures, one builder per block, registered by name.

Every builder is ``(c_in, c_out, stride, **choices) -> nn.Module`` and maps ``(B, c_in, H, W)`` to
``(B, c_out, ⌈H/stride⌉, ⌈W/stride⌉)``. The blocks are made of plain ``nn`` modules only (Conv2d,
BatchNorm2d, ReLU/ReLU6/GELU, Linear, LayerNorm, MultiheadAttention), so ``efficientml.analysis.profile``
counts them exactly.

===================== ============================================================== ====================
name                  block                                                          choices
===================== ============================================================== ====================
``resnet_basic``      He et al. 2016: 3×3 → 3×3, residual                            —
``resnet_bottleneck`` He et al. 2016 (v1.5): 1×1 → 3×3 (stride) → 1×1, residual       ``bottleneck_ratio``
``resnext``           Xie et al. 2017: the bottleneck with a grouped 3×3              ``groups``
                      (``cardinality``), width ``groups · ⌊c_out/4 · base_width/64⌋``  ``base_width``
``dw_separable``      MobileNetV1: depthwise k×k + BN + ReLU, 1×1 + BN + ReLU          ``kernel``
``mbconv``            MobileNetV2 inverted bottleneck (the zoo's InvertedResidual)   ``expand, kernel``
``shuffle``           ShuffleNetV2 unit (the zoo's ShuffleUnit): split, branch,      —
                      concat, channel shuffle; stride 2 runs both halves
``transformer``       pre-norm ViT block over the H·W tokens of the feature map      ``heads, mlp_ratio``
===================== ============================================================== ====================

Shortcuts follow the papers: the identity when shape is kept, a 1×1 conv + BN projection (with the
stride) when the stride or the width changes (ResNet option B). Two cases the papers never meet are
bridged by a 1×1 first: a stride-1 ShuffleNet unit that changes width (1×1 conv + BN + ReLU to
``c_out``, then the unit), and a transformer block with a stride or a width change (a strided 1×1
conv to ``c_out``, then the block at that resolution).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.core.registry import Registry
from efficientml.models.mobilenetv2 import InvertedResidual
from efficientml.models.resnet_cifar import BasicBlock
from efficientml.models.shufflenetv2 import ShuffleUnit

BLOCKS: Registry[Callable[..., nn.Module]] = Registry("NAS block")


def _projection(c_in: int, c_out: int, stride: int) -> nn.Module:
    """The ResNet shortcut: identity when the shape is kept, else a strided 1×1 conv + BN."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class Bottleneck(nn.Module):
    """1×1 (c_in → mid) → 3×3 grouped, strided (mid → mid) → 1×1 (mid → c_out), plus the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, mid: int, groups: int = 1):
        super().__init__()
        if mid % groups:
            raise ConfigError(f"a bottleneck of width {mid} cannot be split into {groups} groups")
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)  # stride here: v1.5
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block on a feature map: tokens = pixels, ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int, heads: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        if c_out % heads:
            raise ConfigError(f"a transformer block of width {c_out} cannot have {heads} heads; "
                              "expected a head count that divides the width")
        hidden = int(round(c_out * mlp_ratio))
        self.reduce = (nn.Identity() if stride == 1 and c_in == c_out
                       else nn.Conv2d(c_in, c_out, 1, stride, bias=False))
        self.norm1 = nn.LayerNorm(c_out)
        self.attn = nn.MultiheadAttention(c_out, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(c_out)
        self.mlp = nn.Sequential(nn.Linear(c_out, hidden), nn.GELU(), nn.Linear(hidden, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)                          # (B, C, H', W')
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)            # (B, H'W', C): one token per pixel
        y = self.norm1(t)
        t = t + self.attn(y, y, y, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


# --- builders ----------------------------------------------------------------------------------


@BLOCKS.register("resnet_basic")
def resnet_basic(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Two 3×3 conv + BN (ReLU between and after the sum); projection shortcut on shape change."""
    return BasicBlock(c_in, c_out, stride, option="B")


@BLOCKS.register("resnet_bottleneck")
def resnet_bottleneck(c_in: int, c_out: int, stride: int, bottleneck_ratio: float = 4) -> nn.Module:
    """The ResNet-50 bottleneck; its 3×3 runs at ``c_out / bottleneck_ratio`` channels (4 in the paper)."""
    if bottleneck_ratio <= 0:
        raise ConfigError(f"bottleneck_ratio must be positive, got {bottleneck_ratio!r}")
    return Bottleneck(c_in, c_out, stride, max(1, int(c_out / bottleneck_ratio)))


@BLOCKS.register("resnext")
def resnext(c_in: int, c_out: int, stride: int, groups: int = 8, base_width: int = 4,
            cardinality: int | None = None) -> nn.Module:
    """ResNeXt bottleneck: ``groups`` (alias ``cardinality``) groups of ``⌊c_out/4 · base_width/64⌋``
    channels each in the 3×3 (torchvision's rule: ResNeXt-50 32×4d has 128 at c_out = 256)."""
    groups = groups if cardinality is None else cardinality
    if groups < 1 or base_width < 1:
        raise ConfigError(f"resnext needs groups ≥ 1 and base_width ≥ 1, got {groups}, {base_width}")
    per_group = max(1, int(c_out / 4 * base_width / 64))
    return Bottleneck(c_in, c_out, stride, groups * per_group, groups)


@BLOCKS.register("dw_separable")
def dw_separable(c_in: int, c_out: int, stride: int, kernel: int = 3) -> nn.Module:
    """MobileNetV1's depthwise-separable conv (no residual)."""
    kernel = int(kernel)
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, kernel, stride, kernel // 2, groups=c_in, bias=False),  # depthwise
        nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False),                                       # pointwise
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@BLOCKS.register("mbconv")
def mbconv(c_in: int, c_out: int, stride: int, expand: float = 6, kernel: int = 3) -> nn.Module:
    """MobileNetV2 inverted bottleneck: 1×1 expand → k×k depthwise → linear 1×1 (residual if shape kept)."""
    return InvertedResidual(c_in, c_out, stride, expand, int(kernel))


@BLOCKS.register("shuffle")
def shuffle(c_in: int, c_out: int, stride: int) -> nn.Module:
    """ShuffleNetV2 unit; a stride-1 width change gets a 1×1 conv + BN + ReLU to ``c_out`` first."""
    if c_out % 2:
        raise ConfigError(f"a ShuffleNetV2 unit splits its channels in halves; got an odd width {c_out}")
    if stride == 2 or c_in == c_out:
        return ShuffleUnit(c_in, c_out, stride)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         ShuffleUnit(c_out, c_out, 1))


@BLOCKS.register("transformer")
def transformer(c_in: int, c_out: int, stride: int, heads: int = 2, mlp_ratio: float = 2.0) -> nn.Module:
    """Pre-norm ViT block over the pixels (a strided 1×1 conv first on a stride or width change)."""
    return TransformerBlock(c_in, c_out, stride, int(heads), mlp_ratio)


# --- entry point -------------------------------------------------------------------------------


def block_choices(name: str) -> list[str]:
    """The choice keywords block ``name`` accepts, e.g. ``["expand", "kernel"]`` for ``mbconv``."""
    params = list(inspect.signature(BLOCKS.get(name)).parameters)
    return params[3:]


def build_block(name: str, c_in: int, c_out: int, stride: int, **choices: Any) -> nn.Module:
    """``BLOCKS[name](c_in, c_out, stride, **choices)`` with the arguments checked first."""
    if c_in < 1 or c_out < 1 or stride not in (1, 2):
        raise ConfigError(f"block {name!r} got c_in={c_in}, c_out={c_out}, stride={stride}; expected "
                          "positive widths and stride 1 or 2")
    allowed = block_choices(name)
    unknown = sorted(set(choices) - set(allowed))
    if unknown:
        raise ConfigError(f"block {name!r} has no choice {', '.join(map(repr, unknown))}; expected some of "
                          f"{allowed or 'none'}")
    return BLOCKS.get(name)(c_in, c_out, stride, **choices)
