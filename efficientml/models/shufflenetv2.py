"""ShuffleNetV2 (Ma et al. 2018): channel split, a branch of 1×1 → 3×3 depthwise → 1×1, concat, and
channel shuffle; the stride-2 unit runs both halves through branches (no split).

Stage output channels for 1.0×: (24, 116, 232, 464, 1024), repeats (4, 8, 4) — the paper's Table 5;
module names follow torchvision (``stage2.0.branch2.3``). At 1000 classes and 224×224: 2,278,604
parameters and ≈146M MACs. Random weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.models.registry import MODELS

STAGE_CHANNELS = {0.5: (24, 48, 96, 192, 1024), 1.0: (24, 116, 232, 464, 1024),
                  1.5: (24, 176, 352, 704, 1024), 2.0: (24, 244, 488, 976, 2048)}
STAGE_REPEATS = (4, 8, 4)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2)   # (B, C/g, g, H, W): interleave the groups
    return x.reshape(b, c, h, w)


def _dw(c: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c)]


def _pw(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        if stride == 1 and c_in != c_out:
            raise ConfigError(f"a stride-1 ShuffleNetV2 unit keeps its width, got {c_in} → {c_out} channels")
        self.branch1 = nn.Sequential(*_dw(c_in, stride), *_pw(c_in, half)) if stride > 1 else nn.Sequential()
        self.branch2 = nn.Sequential(*_pw(c_in if stride > 1 else half, half), *_dw(half, stride), *_pw(half, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)                                  # channel split
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        if width not in STAGE_CHANNELS:
            raise ConfigError(f"ShuffleNetV2 width must be one of {sorted(STAGE_CHANNELS)}, got {width!r}")
        chans = STAGE_CHANNELS[width]
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = chans[0]
        for i, (reps, out) in enumerate(zip(STAGE_REPEATS, chans[1:4]), start=2):
            units = [ShuffleUnit(c, out, 2)] + [ShuffleUnit(out, out, 1) for _ in range(reps - 1)]
            setattr(self, f"stage{i}", nn.Sequential(*units))
            c = out
        self.conv5 = nn.Sequential(*_pw(c, chans[4]))
        self.fc = nn.Linear(chans[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))                                # (B, 24, H/4, W/4)
        x = self.stage4(self.stage3(self.stage2(x)))                  # (B, 464, H/32, W/32)
        x = self.conv5(x).mean([2, 3])                                 # (B, 1024)
        return self.fc(x)


@MODELS.register("shufflenetv2")
def shufflenetv2(width: float = 1.0, num_classes: int = 1000, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 (channel split, concat, shuffle); ``width`` one of 0.5, 1.0, 1.5, 2.0."""
    return ShuffleNetV2(width, num_classes, in_channels)
