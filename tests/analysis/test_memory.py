import torch
import torch.nn as nn

from efficientml.analysis import activation_memory, peak_activation_memory


def test_sequential_net_by_hand():
    # input 3·16 = 48, conv1 out 8·16 = 128, relu out 128 (a new tensor), conv2 out 4·16 = 64
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    mem = activation_memory(net, (1, 3, 4, 4))
    assert mem.live_elements == [48 + 128, 128 + 128, 128 + 64]
    assert mem.peak_elements == 256 and mem.peak_step == "1"
    assert peak_activation_memory(net, (1, 3, 4, 4), bits=32) == 256 * 4
    assert peak_activation_memory(net, (1, 3, 4, 4), bits=8) == 256


def test_inplace_and_views_take_no_new_memory():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 10))
    mem = activation_memory(net, (1, 3, 4, 4))
    # conv1: 48+128; relu in place: 128; conv2: 128+64; flatten (a view): 64; linear: 64+10
    assert mem.live_elements == [176, 128, 192, 64, 74]
    assert mem.peak_elements == 192


class Residual(nn.Module):
    """x → conv → relu → conv → (+ x) → relu, every op writing a new tensor."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)


def test_residual_block_by_hand():
    n = 4 * 6 * 6  # every tensor has the same size
    mem = activation_memory(Residual(4), (1, 4, 6, 6))
    assert mem.steps == ["conv1", "relu1", "conv2", "add", "relu2"]
    # x stays live until the add: conv1 {x, a}, relu1 {x, a, b}, conv2 {x, b, c},
    # add {x, c, d}, relu2 {d, e}
    assert mem.live_elements == [2 * n, 3 * n, 3 * n, 3 * n, 2 * n]
    assert mem.peak_elements == 3 * n
    assert mem.peak_bytes(32) == 3 * n * 4 and mem.peak_bytes(8) == 3 * n


def test_concat_branches_hold_both_outputs():
    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 1)
            self.b = nn.Conv2d(2, 5, 1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=1)

    hw = 16
    mem = activation_memory(Inception(), (1, 2, 4, 4))
    # a {x, a}; b {x, a, b}; cat {a, b, out}
    assert mem.live_elements == [(2 + 3) * hw, (2 + 3 + 5) * hw, (3 + 5 + 8) * hw]


def test_resnet20_peak(zoo):
    # the first stage holds 16×32×32 = 16384-element maps: the shortcut, conv1's and bn1's outputs
    mem = activation_memory(zoo("resnet20"), (1, 3, 32, 32))
    assert mem.peak_elements == 3 * 16 * 32 * 32
    assert mem.peak_bytes(8) == 49152


def test_batch_scales_peak():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    assert peak_activation_memory(net, (3, 3, 4, 4), bits=8) == 3 * 256
