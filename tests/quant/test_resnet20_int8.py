import pytest
import torch

from efficientml.quant import IntegerConfig, convert_integer


@pytest.fixture(scope="module")
def resnet_and_samples(pretrained_cifar):
    model, x, _ = pretrained_cifar("resnet20")
    return model, x


def test_pretrained_resnet20_int8_keeps_predictions(resnet_and_samples):
    model, x = resnet_and_samples
    im = convert_integer(model, [x], IntegerConfig(observer="minmax", reduce_range=False))
    with torch.no_grad():
        ref, out = model(x), im(x)
    agree = int((out.argmax(1) == ref.argmax(1)).sum())
    sqnr = float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))
    assert agree >= 19 and sqnr >= 25, (agree, sqnr)
