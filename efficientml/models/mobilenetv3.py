"""MobileNetV3-Large (Howard et al. 2019): inverted residuals with hard-swish and squeeze-excite.

The block table is the paper's Table 1 (torchvision's ``mobilenet_v3_large``): 1×1 expand → k×k
depthwise → squeeze-excite (global pool → 1×1 reduce to ``make_divisible(expanded / 4)`` → ReLU →
1×1 expand → hard-sigmoid → scale) → 1×1 linear projection, residual when stride 1 and shapes match.
At 1000 classes and 224×224: 5,483,032 parameters and ≈217M MACs. Random weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.models.mobilenetv2 import make_divisible, torchvision_init
from efficientml.models.registry import MODELS

# (kernel, expanded channels, output channels, squeeze-excite, activation, stride), Table 1
LARGE_CFG: tuple[tuple[int, int, int, bool, str, int], ...] = (
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
)


def _act(kind: str) -> nn.Module:
    return nn.Hardswish() if kind == "HS" else nn.ReLU()


def conv_bn_act(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "RE",
                eps: float = 1e-3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out, eps=eps, momentum=0.01)]
    if act is not None:
        layers.append(_act(act))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """x · gate(fc2(relu(fc1(mean_hw(x))))); ``gate`` is hard-sigmoid here, sigmoid in EfficientNet."""

    def __init__(self, channels: int, squeeze: int, act: type[nn.Module] = nn.ReLU,
                 gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))  # (B, C, 1, 1)
        return s * x


class InvertedResidualV3(nn.Module):
    def __init__(self, c_in: int, k: int, expanded: int, c_out: int, se: bool, act: str, stride: int):
        super().__init__()
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(conv_bn_act(c_in, expanded, 1, act=act))
        layers.append(conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4, 8)))
        layers.append(conv_bn_act(expanded, c_out, 1, act=None))          # linear projection
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                 dropout: float = 0.2):
        super().__init__()
        check_range("width", width, 0.0, 16.0, lo_open=True)
        check_range("dropout", dropout, 0.0, 1.0, hi_open=True)
        c = make_divisible(16 * width)
        layers: list[nn.Module] = [conv_bn_act(in_channels, c, 3, 2, act="HS")]
        for k, exp, out, se, act, s in LARGE_CFG:
            exp, out = make_divisible(exp * width), make_divisible(out * width)
            layers.append(InvertedResidualV3(c, k, exp, out, se, act, s))
            c = out
        last_conv = 6 * c
        layers.append(conv_bn_act(c, last_conv, 1, act="HS"))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = make_divisible(1280 * width)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last), nn.Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(last, num_classes))
        torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                          # (B, 960, H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)         # (B, 960)
        return self.classifier(x)


@MODELS.register("mobilenetv3_large")
def mobilenetv3_large(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                      dropout: float = 0.2) -> MobileNetV3:
    """MobileNetV3-Large (hard-swish, squeeze-excite); ``width`` multiplies channels (multiples of 8)."""
    return MobileNetV3(num_classes, in_channels, width, dropout)
