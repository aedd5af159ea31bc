"""The VGG of MIT 6.5940's exercises: eight conv3×3-BN-ReLU layers, four 2×2 max-pools, a linear head.

At width 1.0 on 32×32×3 CIFAR images it has 9.23M parameters and 606M MACs. ``width`` scales every
conv's channels (rounded, at least 1); ``in_channels`` and ``num_classes`` adapt it to other data
(Fashion-MNIST: 1 channel, images padded to 32×32). The head sees the flattened 512·w-channel map
after global pooling, so any input size ≥ 16 works.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.models.registry import MODELS

VGG_CFG: tuple = (64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg: tuple = VGG_CFG, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0):
        super().__init__()
        check_range("width", width, 0.0, 16.0, lo_open=True)
        layers: list[tuple[str, nn.Module]] = []
        c_in, n_conv, n_pool = in_channels, 0, 0
        for v in cfg:
            if v == "M":
                layers.append((f"pool{n_pool}", nn.MaxPool2d(2)))
                n_pool += 1
                continue
            c_out = max(1, int(round(v * width)))
            layers += [(f"conv{n_conv}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)),
                       (f"bn{n_conv}", nn.BatchNorm2d(c_out)),
                       (f"relu{n_conv}", nn.ReLU(inplace=True))]
            c_in, n_conv = c_out, n_conv + 1
        self.backbone = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)              # (B, C, H/16, W/16)
        x = x.mean(dim=(2, 3))            # global average pool → (B, C)
        return self.classifier(x)


@MODELS.register("vgg")
def vgg(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """The course VGG (8 conv layers); ``width`` multiplies every conv's channels."""
    return VGG(VGG_CFG, num_classes=num_classes, in_channels=in_channels, width=width)
