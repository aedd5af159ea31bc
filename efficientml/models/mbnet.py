"""MBNet: a MobileNetV2-style network given block by block — the plain form of a network found by
NAS (:mod:`efficientml.nas`), rebuilt from its checkpoint's ``model_kwargs`` like any zoo model.

Stem ``ConvBNReLU(in_channels, stem, 3, stem_stride)`` → one ``InvertedResidual(c_in, c_out, stride,
expand, kernel)`` per entry of ``blocks`` (``[c_out, stride, expand, kernel]``; c_in is the previous
width) → ``ConvBNReLU(·, head, 1)`` → global average pool → ``Dropout`` → ``Linear``. Module names
follow torchvision's MobileNetV2 (``features.{i}``, ``classifier.1``). Initialization as the zoo's
MobileNetV2 (torchvision's).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.models.mobilenetv2 import ConvBNReLU, InvertedResidual, torchvision_init
from efficientml.models.registry import MODELS

# the largest network of efficientml.nas.space.MBSpace() (Fashion-MNIST), the builder's default
DEFAULT_BLOCKS: tuple[tuple[int, int, float, int], ...] = (
    (24, 2, 6, 7), (24, 1, 6, 7), (24, 1, 6, 7), (40, 2, 6, 7), (40, 1, 6, 7), (40, 1, 6, 7),
    (80, 2, 6, 7), (80, 1, 6, 7), (80, 1, 6, 7), (96, 1, 6, 7), (96, 1, 6, 7))


class MBNet(nn.Module):
    def __init__(self, blocks: Sequence[Sequence[float]], stem: int = 16, head: int = 256, num_classes: int = 10,
                 in_channels: int = 1, stem_stride: int = 1, dropout: float = 0.1):
        super().__init__()
        if not blocks:
            raise ConfigError("MBNet needs at least one block [c_out, stride, expand, kernel]")
        feats: list[nn.Module] = [ConvBNReLU(in_channels, stem, 3, stem_stride)]
        c = stem
        for b in blocks:
            if len(b) != 4 or int(b[3]) % 2 == 0 or int(b[1]) not in (1, 2):
                raise ConfigError(f"an MBNet block is [c_out, stride 1|2, expand, odd kernel], got {list(b)}")
            c_out, stride, expand, kernel = int(b[0]), int(b[1]), float(b[2]), int(b[3])
            feats.append(InvertedResidual(c, c_out, stride, expand, kernel))
            c = c_out
        feats.append(ConvBNReLU(c, head, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head, num_classes))
        torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean(dim=(2, 3))
        return self.classifier(x)


@MODELS.register("mbnet")
def mbnet(blocks: Sequence[Sequence[float]] = DEFAULT_BLOCKS, stem: int = 16, head: int = 256, num_classes: int = 10,
          in_channels: int = 1, stem_stride: int = 1, dropout: float = 0.1) -> MBNet:
    """An MBNet from its block list (default: the largest network of the NAS space for Fashion-MNIST)."""
    return MBNet(blocks, stem, head, num_classes, in_channels, stem_stride, dropout)
