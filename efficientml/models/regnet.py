"""RegNetX (Radosavovic et al. 2020): a stem, four stages of residual bottleneck blocks with grouped
3×3 convs (group width 16 for 400MF), a global pool and a linear head. No squeeze-excite (that is RegNetY).

RegNetX-400MF's quantized design (w0=24, wa=24.48, wm=2.54, depth 22, bottleneck ratio 1) gives stage
widths (24, 64, 152, 392), made multiples of the group width: (32, 64, 160, 400), and depths
(1, 2, 7, 12); module names follow torchvision
(``trunk_output.block{i}.block{i}-{j}``). At 1000 classes and 224×224: 5,495,976 parameters and
≈0.41G MACs (413.8M by this project's counter). Random weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from efficientml.models.registry import MODELS

X_400MF = {"widths": (32, 64, 160, 400), "depths": (1, 2, 7, 12), "group_width": 16}


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class XBlock(nn.Module):
    """1×1 → grouped 3×3 (stride here) → 1×1, plus the input (a 1×1/stride projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int):
        super().__init__()
        self.proj = _conv_bn(c_in, c_out, 1, stride, relu=False) if (c_in != c_out or stride != 1) else None
        self.f = nn.Sequential(_conv_bn(c_in, c_out, 1), _conv_bn(c_out, c_out, 3, stride, c_out // group_width),
                               _conv_bn(c_out, c_out, 1, relu=False))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], group_width: int,
                 num_classes: int = 1000, in_channels: int = 3, stem_width: int = 32):
        super().__init__()
        self.stem = _conv_bn(in_channels, stem_width, 3, 2)
        stages, c = [], stem_width
        for i, (w, d) in enumerate(zip(widths, depths), start=1):
            blocks = [(f"block{i}-{j}", XBlock(c if j == 0 else w, w, 2 if j == 0 else 1, group_width))
                      for j in range(d)]
            stages.append((f"block{i}", nn.Sequential(OrderedDict(blocks))))
            c = w
        self.trunk_output = nn.Sequential(OrderedDict(stages))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():  # the paper's (and torchvision's) initialization
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk_output(self.stem(x))            # (B, 400, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("regnet_x_400mf")
def regnet_x_400mf(num_classes: int = 1000, in_channels: int = 3) -> RegNet:
    """RegNetX-400MF (grouped convs, group width 16)."""
    return RegNet(X_400MF["widths"], X_400MF["depths"], X_400MF["group_width"], num_classes, in_channels)
