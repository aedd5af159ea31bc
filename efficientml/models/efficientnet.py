"""EfficientNet-B0 (Tan & Le 2019) as TensorFlow-ported checkpoints build it: MBConv blocks with SiLU
and squeeze-excite (sigmoid gate, squeeze width = block input / 4), BatchNorm eps 1e-3, and
TensorFlow "SAME" padding.

TF-SAME pads ``max((⌈H/s⌉ − 1)·s + k − H, 0)`` in total, the extra pixel at the bottom/right. For a
stride-1 conv that is the symmetric ``(k − 1)/2`` PyTorch already does; for stride 2 and an even input
it is asymmetric (k=3: 0 before, 1 after; k=5: 1 before, 2 after), so those convs get an explicit
``nn.ZeroPad2d`` in front (``tf_same=True``; the static form timm exports, valid while every stride-2
layer sees an even size, e.g. any multiple of 32). ``tf_same=False`` uses PyTorch's symmetric padding
(torchvision's layout). At 1000 classes and 224×224: 5,288,548 parameters and ≈390M MACs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.models.mobilenetv2 import torchvision_init
from efficientml.models.mobilenetv3 import SqueezeExcite
from efficientml.models.registry import MODELS

# (expand ratio, kernel, first stride, output channels, repeats) for B0, the paper's Table 1
B0_CFG: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)
BN_EPS = 1e-3


def same_pad(kernel: int, stride: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) TF-SAME padding for an even input size."""
    total = max(kernel - stride, 0)
    return total // 2, total - total // 2, total // 2, total - total // 2


def conv_bn_silu(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: bool = True,
                 tf_same: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    if tf_same and stride > 1:
        layers.append(nn.ZeroPad2d(same_pad(k, stride)))
        padding = 0
    else:
        padding = (k - 1) // 2
    layers += [nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=False),
               nn.BatchNorm2d(c_out, eps=BN_EPS)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """1×1 expand (SiLU) → k×k depthwise (SiLU) → squeeze-excite → 1×1 projection (+ input)."""

    def __init__(self, c_in: int, c_out: int, expand: int, k: int, stride: int, tf_same: bool = True):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_silu(c_in, hidden, 1, tf_same=tf_same))
        layers += [conv_bn_silu(hidden, hidden, k, stride, groups=hidden, tf_same=tf_same),
                   SqueezeExcite(hidden, max(1, c_in // 4), act=nn.SiLU, gate=nn.Sigmoid),
                   conv_bn_silu(hidden, c_out, 1, act=False, tf_same=tf_same)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)   # eval: no stochastic depth


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2,
                 tf_same: bool = True):
        super().__init__()
        check_range("dropout", dropout, 0.0, 1.0, hi_open=True)
        layers: list[nn.Module] = [conv_bn_silu(in_channels, 32, 3, 2, tf_same=tf_same)]
        c = 32
        for expand, k, s, out, n in B0_CFG:
            stage = [MBConv(c if i == 0 else out, out, expand, k, s if i == 0 else 1, tf_same) for i in range(n)]
            layers.append(nn.Sequential(*stage))
            c = out
        layers.append(conv_bn_silu(c, 1280, 1, tf_same=tf_same))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        torchvision_init(self, linear="uniform")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                          # (B, 1280, H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)         # (B, 1280)
        return self.classifier(x)


@MODELS.register("efficientnet_b0")
def efficientnet_b0(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2,
                    tf_same: bool = True) -> EfficientNet:
    """EfficientNet-B0 (SiLU, squeeze-excite); ``tf_same`` pads stride-2 convs as TensorFlow does."""
    return EfficientNet(num_classes, in_channels, dropout, tf_same)
