"""CIFAR ResNets of He et al. 2016 (§4.2): depth 6n+2, three stages of n basic blocks at 16/32/64
channels, global average pooling and a linear head.

Shortcuts where shape changes: option ``"A"`` (the paper's; parameter-free: subsample by 2, then
zero-pad the new channels) or option ``"B"`` (1×1 conv + BN projection). At 10 classes ResNet-20
has 269,722 parameters, ResNet-56 853,018 (option A).

``pretrained=True`` loads Yerlan Idelbayev's CIFAR-10 weights (https://github.com/akamaster/
pytorch_resnet_cifar10; reported test accuracy 91.78 / 92.78 / 93.14 / 93.62 % for 20/32/44/56).
Those weights are BSD-2-Clause, copyright Yerlan Idelbayev; the notice is in
``efficientml/models/NOTICE-resnet-cifar10.txt`` and must be kept when redistributing them. They
expect inputs normalized with :data:`PRETRAINED_MEAN` / :data:`PRETRAINED_STD` (the ImageNet
constants his trainer used, not the CIFAR statistics).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.channels import Member, TraceContext, register_channel_op
from efficientml.core.config import check_choice, check_range
from efficientml.core.errors import ConfigError, ShapeError
from efficientml.models.pretrained import find_weights, load_weights
from efficientml.models.registry import MODELS

# Normalization the pretrained weights were trained with (Idelbayev's trainer.py).
PRETRAINED_MEAN = (0.485, 0.456, 0.406)
PRETRAINED_STD = (0.229, 0.224, 0.225)

WEIGHTS = {  # depth → file under models_roots(), named with its sha256 prefix
    20: "resnet-cifar10/resnet20-12fca82f.th",
    32: "resnet-cifar10/resnet32-d509ac18.th",
    44: "resnet-cifar10/resnet44-014dd654.th",
    56: "resnet-cifar10/resnet56-4bfd9763.th",
}
WEIGHTS_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{}"


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every other pixel, append zero channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]         # (B, C_in, H/s, W/s)
        extra = self.out_channels - self.in_channels
        # split the zero channels evenly before and after (planes//4 each when doubling, as Idelbayev)
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


# How channel pruning sees the shortcut (registered below; efficientml.prune reads the registry).
# It pads e//2 zero channels before and e - e//2 after the input channels. The sum conv(x) + pad(x)
# couples the middle channels to the previous stage's stream, and the zero channels to nothing. To
# keep the padding symmetric after pruning (forward pads evenly on both sides), the i-th zero channel
# before is tied to the i-th zero channel after: they are removed in pairs; an odd extra one is kept.

def _pad_shortcut_trace(ctx: TraceContext, module: PadShortcut, ids: list[int]) -> list[int]:
    extra = module.out_channels - module.in_channels
    before = ctx.ids.fresh(extra // 2)
    after = ctx.ids.fresh(extra - extra // 2)
    for a, b in zip(before, after):  # removed in pairs so the padding stays even on both sides
        ctx.ids.union(a, b)
    if len(after) > len(before):
        ctx.ids.freeze(after[len(before):])
    for i, c in enumerate(ids):
        ctx.ids.add(c, Member(ctx.name, "in", i))
    out = before + ids + after
    for j, c in enumerate(out):
        ctx.ids.add(c, Member(ctx.name, "out", j))
    return out


def _shrink_pad_shortcut(m: PadShortcut, keep_in: list[int] | None,
                         keep_out: list[int] | None) -> PadShortcut:
    cin = len(keep_in) if keep_in is not None else m.in_channels
    keep_out = keep_out if keep_out is not None else list(range(m.out_channels))
    before = (m.out_channels - m.in_channels) // 2
    z1 = sum(1 for j in keep_out if j < before)
    z2 = sum(1 for j in keep_out if j >= before + m.in_channels)
    if z1 != (z1 + z2) // 2 or len(keep_out) != cin + z1 + z2:
        raise ShapeError(f"option-A shortcut would pad {z1} channels before and {z2} after; the "
                         f"module pads evenly, so the plan is inconsistent")
    new = copy.copy(m)
    new.in_channels, new.out_channels = cin, len(keep_out)
    return new


register_channel_op(PadShortcut, _pad_shortcut_trace, _shrink_pad_shortcut,
                    attrs=("in_channels", "out_channels"))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if option == "A" and out_channels >= in_channels:
                self.shortcut = PadShortcut(in_channels, out_channels, stride)
            else:  # option B, or A that would have to drop channels
                self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                              nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs; attribute names match Idelbayev's checkpoints."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, option: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(
                f"CIFAR ResNet depth must be 6n+2 with n ≥ 1 (20, 32, 44, 56, 110), got {depth}")
        check_range("width", width, 0.0, 16.0, lo_open=True)
        check_choice("shortcut option", option, {"A", "B"})
        n = (depth - 2) // 6
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, w, stride=2 if (i > 0 and j == 0) else 1, option=option))
                c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(c, num_classes)
        for m in self.modules():  # Kaiming normal for convs and the head, as in the reference code
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))     # (B, 16w, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64w, H/4, W/4)
        x = x.mean(dim=(2, 3))                  # global average pool → (B, 64w)
        return self.linear(x)


def resnet_cifar(depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 option: str = "A", pretrained: bool = False) -> CifarResNet:
    """Build a CIFAR ResNet; ``pretrained`` loads the CIFAR-10 weights (3 channels, 10 classes, A)."""
    model = CifarResNet(depth, num_classes, in_channels, width, option)
    if pretrained:
        if depth not in WEIGHTS:
            have = ", ".join(f"ResNet-{d}" for d in WEIGHTS)
            raise ConfigError(f"pretrained CIFAR weights exist for {have} only, not ResNet-{depth}")
        if (num_classes, in_channels, width, option) != (10, 3, 1.0, "A"):
            raise ConfigError("pretrained CIFAR ResNets need num_classes=10, in_channels=3, width=1.0, "
                              f"option='A'; got {num_classes}, {in_channels}, {width}, {option!r}")
        rel = WEIGHTS[depth]
        load_weights(model, find_weights(rel, WEIGHTS_URL.format(rel.rpartition("/")[2])))
    return model


def _register(depth: int) -> None:
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, option: str = "A",
              pretrained: bool = False) -> CifarResNet:
        return resnet_cifar(depth, num_classes, in_channels, width, option, pretrained)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-{{A,B}} shortcuts)."
    MODELS.register(f"resnet{depth}", build)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
