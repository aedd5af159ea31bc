import pytest
import torch.nn as nn

from efficientml.analysis import conv_output_size, receptive_field, receptive_fields
from efficientml.core.errors import ConfigError


def test_conv_output_size_formula():
    assert conv_output_size(224, 7, stride=2, padding=3) == 112
    assert conv_output_size(112, 3, stride=2, padding=1) == 56
    assert conv_output_size(32, 3, padding=1) == 32
    assert conv_output_size(32, 3, padding=2, dilation=2) == 32
    assert conv_output_size(7, 3, stride=2) == 3
    with pytest.raises(ConfigError, match="does not fit"):
        conv_output_size(2, 5)


def test_receptive_field_of_stacks():
    assert receptive_field([(3, 1)] * 3) == [(3, 1), (5, 1), (7, 1)]
    assert receptive_field([(3, 2), (3, 1)]) == [(3, 2), (7, 2)]
    assert receptive_field([(3, 1, 2)]) == [(5, 1)]                    # dilation 2


def test_traced_sequential_stack():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    rows = receptive_fields(net, (1, 1, 32, 32))
    assert [r.name for r in rows] == ["0", "2", "3", "4"]
    assert [r.out_size for r in rows] == [(32, 32), (16, 16), (8, 8), (8, 8)]
    # r: 3; 3 + 2·1 = 5 (j 2); 5 + 1·2 = 7 (j 4); 7 + 2·4 = 15
    assert [r.receptive_field for r in rows] == [(3, 3), (5, 5), (7, 7), (15, 15)]
    assert rows[-1].jump == (4, 4)


def test_shortcut_does_not_inflate_main_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
            self.short = nn.Conv2d(2, 2, 1, stride=2)
            self.head = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.head(self.conv2(self.conv1(x)) + self.short(x))

    rows = {r.name: r for r in receptive_fields(Block(), (1, 2, 16, 16))}
    assert rows["conv2"].receptive_field == (7, 7)      # 3, then 3 + 2·2
    assert rows["short"].receptive_field == (1, 1)
    assert rows["head"].receptive_field == (11, 11)     # max(7, 1) + 2·2


def test_resnet18_stem(zoo):
    rows = receptive_fields(zoo("resnet18"), (1, 3, 224, 224))
    stem, pool = rows[0], rows[1]
    assert (stem.kernel, stem.stride, stem.out_size, stem.receptive_field) == \
        ((7, 7), (2, 2), (112, 112), (7, 7))
    assert (pool.op, pool.out_size, pool.receptive_field) == ("max_pool2d", (56, 56), (11, 11))
    assert rows[-1].op == "adaptive_avg_pool2d" and rows[-1].out_size == (1, 1)
