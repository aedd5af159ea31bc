"""Small models for quick tests: a two-conv CNN and an MLP.

``small_cnn``: two conv3×3-BN-ReLU-maxpool blocks (32, 64 channels), adaptive average pooling to
4×4, then a 1024→64→classes MLP head. 85,162 parameters for 1×28×28 (Fashion-MNIST) and 85,738
for 3×32×32 inputs at 10 classes; any input of at least 4×4 works. The flatten → linear step gives
channel pruning a conv-to-linear dependency to handle.

``mlp``: flatten, then Linear-ReLU(-Dropout) layers; 235,146 parameters for 784→256→128→10.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from efficientml.core.config import check_range
from efficientml.core.errors import ConfigError, ShapeError
from efficientml.models.registry import MODELS


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 channels: tuple[int, ...] = (32, 64), hidden: int = 64, pool_size: int = 4):
        super().__init__()
        check_range("width", width, 0.0, 16.0, lo_open=True)
        if not channels:
            raise ConfigError("small_cnn needs at least one conv block in channels, got ()")
        layers: list[tuple[str, nn.Module]] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            c_out = max(1, int(round(c * width)))
            layers += [(f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)),
                       (f"bn{i}", nn.BatchNorm2d(c_out)),
                       (f"relu{i}", nn.ReLU(inplace=True)),
                       (f"pool{i}", nn.MaxPool2d(2))]
            c_in = c_out
        layers.append(("avgpool", nn.AdaptiveAvgPool2d(pool_size)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc0", nn.Linear(c_in * pool_size * pool_size, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("fc1", nn.Linear(hidden, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                  # (B, 64w, 4, 4)
        return self.classifier(torch.flatten(x, 1))  # flatten is channel-major: (B, 64w·16)


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        check_range("dropout", dropout, 0.0, 1.0, hi_open=True)
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        d = in_features
        for i, h in enumerate(hidden):
            layers += [(f"fc{i}", nn.Linear(d, h)), (f"relu{i}", nn.ReLU(inplace=True))]
            if dropout > 0:
                layers.append((f"drop{i}", nn.Dropout(dropout)))
            d = h
        layers.append((f"fc{len(hidden)}", nn.Linear(d, num_classes)))
        self.layers = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.layers[1].in_features:
            raise ShapeError(f"MLP expects {self.layers[1].in_features} features per sample, "
                              f"got input of shape {tuple(x.shape)}")
        return self.layers(x)


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: float = 1.0, hidden: int = 64) -> SmallCNN:
    """Two conv-BN-ReLU-pool blocks and a small MLP head (~85k parameters)."""
    return SmallCNN(num_classes, in_channels, width, hidden=hidden)


@MODELS.register("mlp")
def mlp(num_classes: int = 10, in_features: int = 784, hidden: tuple[int, ...] = (256, 128),
        dropout: float = 0.0, in_channels: int | None = None) -> MLP:
    """Flatten + Linear-ReLU layers; ``in_features`` is C·H·W of the input (784 for 28×28×1)."""
    del in_channels  # accepted so every zoo model takes the same keywords; in_features decides
    return MLP(in_features, tuple(hidden), num_classes, dropout)
