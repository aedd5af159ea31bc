"""ImageNet ResNets (He et al. 2016) with torchvision's module names, so its state dicts load as-is:
ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks, stride on the 3×3 conv, "v1.5").

At 1000 classes: ResNet-18 11,689,512 parameters (1.82G MACs at 224×224), ResNet-34 21,797,672,
ResNet-50 25,557,032. ``small_input=True`` replaces the 7×7/2 stem and max-pool with a 3×3/1 conv
(the usual CIFAR adaptation: 32×32 inputs end at 4×4 instead of 1×1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.models.registry import MODELS


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here: ResNet v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                 small_input: bool = False, zero_init_residual: bool = False):
        super().__init__()
        check_range("width", width, 0.0, 16.0, lo_open=True)
        planes = [max(1, int(round(p * width))) for p in (64, 128, 256, 512)]
        self.in_channels = planes[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(block, planes[0], layers[0], 1)
        self.layer2 = self._stage(block, planes[1], layers[1], 2)
        self.layer3 = self._stage(block, planes[2], layers[2], 2)
        self.layer4 = self._stage(block, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
               stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_channels != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_channels, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.in_channels, planes, stride, downsample)]
        self.in_channels = planes * block.expansion
        layers += [block(self.in_channels, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))   # (B, 64w, H/4, W/4), or H with small_input
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512w·e, H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)                    # (B, 512w·e)
        return self.fc(x)


_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


def resnet_imagenet(depth: int, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                    small_input: bool = False, zero_init_residual: bool = False) -> ResNet:
    block, layers = _DEPTHS[depth]
    return ResNet(block, layers, num_classes, in_channels, width, small_input, zero_init_residual)


def _register(depth: int) -> None:
    def build(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, small_input: bool = False,
              zero_init_residual: bool = False) -> ResNet:
        return resnet_imagenet(depth, num_classes, in_channels, width, small_input, zero_init_residual)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"ImageNet ResNet-{depth} (torchvision layout); ``small_input`` for 32×32 images."
    MODELS.register(f"resnet{depth}", build)


for _depth in _DEPTHS:
    _register(_depth)
