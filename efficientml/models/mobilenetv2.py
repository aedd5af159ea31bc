"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks (1×1 expand → 3×3 depthwise → 1×1
linear projection), residual when stride 1 and shapes match.

At width 1.0, 1000 classes and 224×224 it has 3,504,872 parameters and ≈300M MACs. Channel counts
are ``make_divisible(c × width, 8)``; the last conv has 1280·max(1, width) channels. Global average
pooling makes it resolution independent. ``cifar_stem=True`` sets the stem conv and the first
24-channel stage to stride 1 (total stride 8 instead of 32), so 32×32 inputs end at 4×4, not 1×1.
Module names follow torchvision (``features.{i}``, ``classifier.1``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.models.registry import MODELS

# (expansion t, output channels c, repeats n, first stride s) per stage, as in the paper's Table 2
INVERTED_RESIDUAL_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (≥ min_value), never losing > 10%."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def torchvision_init(model: nn.Module, linear: str = "normal") -> None:
    """torchvision's MobileNetV2/V3 initialization: Kaiming-normal (fan out) convs with zero bias, BN γ=1
    β=0, N(0, 0.01) linears with zero bias; ``linear="uniform"``: U(±1/sqrt(out features)) linears
    (torchvision's EfficientNet)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "uniform":
                r = 1.0 / m.out_features ** 0.5
                nn.init.uniform_(m.weight, -r, r)
            else:
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: float,
                 kernel_size: int = 3):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_channels, hidden, 1))               # expand
        layers += [ConvBNReLU(hidden, hidden, kernel_size, stride, groups=hidden),  # depthwise
                   nn.Conv2d(hidden, out_channels, 1, bias=False),         # linear bottleneck: no ReLU
                   nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                 dropout: float = 0.2, cifar_stem: bool = False, round_nearest: int = 8):
        super().__init__()
        check_range("width", width, 0.0, 16.0, lo_open=True)
        check_range("dropout", dropout, 0.0, 1.0, hi_open=True)
        c_in = make_divisible(32 * width, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(in_channels, c_in, 3, stride=1 if cifar_stem else 2)]
        for t, c, n, s in INVERTED_RESIDUAL_CFG:
            c_out = make_divisible(c * width, round_nearest)
            if cifar_stem and c == 24:
                s = 1
            for i in range(n):
                features.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(ConvBNReLU(c_in, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)          # (B, 1280, H/32, W/32), or H/8 with the CIFAR stem
        x = x.mean(dim=(2, 3))        # global average pool → (B, 1280)
        return self.classifier(x)


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, dropout: float = 0.2,
                cifar_stem: bool = False) -> MobileNetV2:
    """MobileNetV2; ``width`` multiplies channels (rounded to multiples of 8), ``cifar_stem`` for 32×32."""
    return MobileNetV2(num_classes, in_channels, width, dropout, cifar_stem)
