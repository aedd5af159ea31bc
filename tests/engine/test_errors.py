"""An op the engine has no kernel for is refused at lowering with an error that names it and its layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import EfficientMLError, UnsupportedError
from efficientml.engine import EngineUnsupportedError, generate, lower
from efficientml.quant.integer import IntegerConfig, convert_integer


class _Net(nn.Module):
    def __init__(self, tail: nn.Module):
        super().__init__()
        self.conv, self.tail = nn.Conv2d(1, 4, 3), tail

    def forward(self, x):
        return self.tail(self.conv(x))


@pytest.mark.parametrize("tail", [nn.AvgPool2d(2), nn.Upsample(scale_factor=2)])
def test_float_fallback_is_named(tail):
    im = convert_integer(_Net(tail), [torch.randn(4, 1, 12, 12)],
                         IntegerConfig(observer="minmax", skip_unsupported=True))
    name = type(tail).__name__
    with pytest.raises(EngineUnsupportedError, match=rf"no kernel for op '{name}' \(layer 'tail'\).*float") as e:
        lower(im, torch.zeros(1, 1, 12, 12))
    assert (e.value.op, e.value.layer) == (name, "tail")
    assert isinstance(e.value, UnsupportedError) and isinstance(e.value, EfficientMLError)
    assert isinstance(e.value, NotImplementedError)       # UnsupportedError's contract


class _TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.relu(y)


def test_several_outputs_are_refused():
    im = convert_integer(_TwoOut(), [torch.randn(2, 1, 8, 8)], IntegerConfig(observer="minmax"))
    with pytest.raises(EngineUnsupportedError, match="multiple outputs"):
        lower(im, torch.zeros(1, 1, 8, 8))


def test_unsupported_model_fails_before_any_c_is_written(tmp_path):
    im = convert_integer(_Net(nn.AvgPool2d(2)), [torch.randn(2, 1, 8, 8)],
                         IntegerConfig(observer="minmax", skip_unsupported=True))
    with pytest.raises(EngineUnsupportedError):
        generate(im, torch.zeros(1, 1, 8, 8)).write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_c_prefix_is_refused():
    from efficientml.core.errors import ConfigError
    from efficientml.engine.codegen import check_prefix

    with pytest.raises(ConfigError, match="not a C identifier"):
        check_prefix("my-model")
    assert check_prefix("my_model2") == "my_model2"
