"""Channel graph on layouts the zoo did not exercise: one stateless module reused at several widths
(torchvision's Bottleneck calls one nn.ReLU three times) and grouped convs (RegNet) under skip."""

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import UnsupportedError
from efficientml.prune import PruneConfig, prune
from efficientml.prune.graph import DependencyGraph


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.relu = nn.ReLU()                       # used on 16, 8 and 16 channels
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.b(self.relu(self.a(x)))
        return self.fc(self.relu(x + y).mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.g(self.a(x))))).mean((2, 3)))


def test_reused_relu_does_not_couple_different_widths():
    torch.manual_seed(0)
    model, x = SharedReLU().eval(), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph.build(model, x)
    sizes = sorted(len(g) for g in graph.groups if g.prunable)
    assert sizes == [8, 16]                         # the 8 mid channels are their own group
    pruned = prune(model, PruneConfig(method="channel", sparsity=0.5), example_inputs=x).model
    assert (pruned.a.out_channels, pruned.stem.out_channels) == (4, 8)
    assert pruned(x).shape == (2, 5)


def test_grouped_conv_is_named_or_skipped():
    torch.manual_seed(0)
    model, x = Grouped().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedError, match="grouped conv"):
        prune(model, PruneConfig(method="channel", sparsity=0.5), example_inputs=x)
    res = prune(model, PruneConfig(method="channel", sparsity=0.5, on_unsupported="skip"), example_inputs=x)
    assert any("Conv2d in g" in s for s in res.skipped), res.skipped
    assert (res.model.g.in_channels, res.model.g.out_channels, res.model.b.out_channels) == (16, 16, 6)
    assert res.model(x).shape == (2, 5)
