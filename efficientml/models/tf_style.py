"""A small network written the way TF-ported ImageNet models are (EfficientNet/MobileNet ports):
TensorFlow "SAME" padding done by hand (``nn.ZeroPad2d`` before the stem, ``F.pad`` before strided
depthwise convs, an ``nn.ConstantPad2d``), depthwise inverted residuals, ReLU6, convs with
``padding=0``. It is not in the zoo: it exists so that tests and benchmarks exercise compression on a
model whose code we did not shape for our own tools.

    model = tf_style_mobilenet(num_classes=10)          # 3×32×32 inputs (any size ≥ 16 works)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one dimension: (before, after), the extra pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class InvertedResidualTF(nn.Module):
    """1×1 expand → depthwise 3×3 (TF-SAME via F.pad, computed once for ``size``) → 1×1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, size: int):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        before, after = same_pads(size, 3, stride)
        self.pad = (before, after, before, after)                   # F.pad order: left, right, top, bottom
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 0, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x)
        y = F.relu6(self.dw_bn(self.dw(F.pad(y, self.pad))))
        y = self.project(y)
        return x + y if self.residual else y


class TFStyleMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, image_size: int = 32):
        super().__init__()
        w = width
        b, a = same_pads(image_size, 3, 2)
        self.stem = nn.Sequential(nn.ZeroPad2d((b, a, b, a)), nn.Conv2d(in_channels, w, 3, 2, 0, bias=False),
                                  nn.BatchNorm2d(w), nn.ReLU6())
        size = -(-image_size // 2)
        blocks, cfg = [], [(w, 1, 1), (w + 8, 2, 4), (w + 8, 1, 4), (2 * w, 2, 4), (2 * w, 1, 4)]
        cin = w
        for cout, stride, expand in cfg:
            blocks.append(InvertedResidualTF(cin, cout, stride, expand, size))
            size, cin = -(-size // stride), cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.Conv2d(cin, 4 * w, 3, bias=False),
                                  nn.BatchNorm2d(4 * w), nn.ReLU6())
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


def tf_style_mobilenet(num_classes: int = 10, in_channels: int = 3, width: int = 16,
                       image_size: int = 32, seed: int | None = 0) -> TFStyleMobileNet:
    """The network in eval mode with non-trivial BatchNorm statistics (random weights from ``seed``)."""
    if seed is not None:
        torch.manual_seed(seed)
    m = TFStyleMobileNet(num_classes, in_channels, width, image_size)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2), mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.6, 1.4), mod.bias.data.uniform_(-0.1, 0.1)
    return m.eval()
