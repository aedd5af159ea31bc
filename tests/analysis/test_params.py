import math

import pytest
import torch
import torch.nn as nn

from efficientml.analysis import count_parameters, model_size_bits, model_size_bytes, tensor_bits
from efficientml.core.errors import ConfigError


def test_linear_param_count_and_size():
    m = nn.Linear(100, 10)
    assert count_parameters(m) == 1010
    assert model_size_bytes(m, 32) == 4040
    assert model_size_bytes(m, 8) == 1010
    assert model_size_bytes(m, 4) == 505


def test_trainable_and_nonzero_counts():
    m = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    m[1].weight.requires_grad_(False)
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].weight[0, 0] = 1.0
    assert count_parameters(m) == 16 + 8 + 2
    assert count_parameters(m, trainable_only=True) == 16 + 2
    nz = 1 + int(torch.count_nonzero(m[1].weight)) + int(torch.count_nonzero(m[1].bias))
    assert count_parameters(m, nonzero_only=True) == nz


def test_shared_parameters_counted_once():
    lin = nn.Linear(8, 8)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_parameters(m) == 72


def _sparse_weight():
    w = torch.zeros(4, 8)
    w[0, 1] = 1.0
    w[0, 7] = 2.0
    w[2, 3] = 3.0
    w[3, 0] = 4.0
    return w  # nnz = 4, rows = 4, cols = 8


def test_sparse_formats_by_hand():
    w = _sparse_weight()
    assert tensor_bits(w, 8, "dense") == 32 * 8
    assert tensor_bits(w, 8, "bitmask") == 4 * 8 + 32
    # CSR: values + ⌈log2 8⌉ = 3-bit column indices + 5 row pointers of ⌈log2 5⌉ = 3 bits
    assert tensor_bits(w, 8, "csr") == 4 * (8 + 3) + 5 * 3
    assert tensor_bits(w, 8, "csr", index_bits=32) == 4 * (8 + 32) + 5 * 32
    # relative, flattened positions 1, 7, 19, 24 → gaps 2, 6, 12, 5; 3-bit gaps reach 8,
    # so the gap of 12 needs one filler entry: 5 entries of 8 + 3 bits
    assert tensor_bits(w, 8, "relative", index_bits=3) == 5 * (8 + 3)
    # 2-bit gaps reach 4: ⌈2/4⌉ + ⌈6/4⌉ + ⌈12/4⌉ + ⌈5/4⌉ = 1 + 2 + 3 + 2 = 8 entries
    assert tensor_bits(w, 8, "relative", index_bits=2) == 8 * (8 + 2)


def test_sparse_applies_to_weights_only():
    m = nn.Linear(8, 4)
    with torch.no_grad():
        m.weight.copy_(_sparse_weight())
    bias_bits = 4 * 32
    assert model_size_bits(m, 32, sparse_format="bitmask") == 4 * 32 + 32 + bias_bits
    assert model_size_bytes(m, 32, sparse_format="bitmask") == (4 * 32 + 32 + bias_bits) / 8


def test_bad_format_and_bits():
    with pytest.raises(ConfigError, match="sparse format"):
        tensor_bits(torch.ones(2, 2), 8, "coo")
    with pytest.raises(ConfigError, match="bits"):
        tensor_bits(torch.ones(2, 2), 0)


@pytest.mark.parametrize("name,params", [
    ("resnet18", 11_689_512),       # torchvision ResNet-18
    ("mobilenetv2", 3_504_872),     # torchvision MobileNetV2
    ("vgg", 9_228_362),             # course VGG, 10 classes
    ("resnet20", 269_722),          # CIFAR ResNet-20, option-A shortcuts
])
def test_zoo_parameter_counts(zoo, name, params):
    assert count_parameters(zoo(name)) == params


def test_zoo_parameter_counts_rounded(zoo):
    assert round(count_parameters(zoo("resnet18")) / 1e6, 2) == 11.69
    assert round(count_parameters(zoo("mobilenetv2")) / 1e6, 2) == 3.50
    assert round(count_parameters(zoo("vgg")) / 1e6, 2) == 9.23
    assert round(count_parameters(zoo("resnet20")) / 1e6, 2) == 0.27
    assert math.isclose(model_size_bytes(zoo("resnet20"), 8), 269_722)
