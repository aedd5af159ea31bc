"""The host engine's kernel paths (portable C, AVX2, AVX-512 VNNI; im2col or Winograd for 3x3 convs)
are bit-exact with the Python integer reference; the portable path is forced, so it is tested on
every machine."""

import pytest
import torch

from efficientml.engine import compile_engine
from efficientml.engine.host import host_compiler
from efficientml.models import build_model
from efficientml.quant.integer import IntegerConfig, convert_integer

pytestmark = pytest.mark.skipif(host_compiler() is None, reason="no C compiler")

CASES = {  # name: (build kwargs, input shape) — im2col + 3x3 (VGG), depthwise/pointwise/linear (MobileNetV2)
    "vgg": (dict(width=0.25, in_channels=1), (1, 28, 28)),
    "mobilenetv2": ({}, (3, 32, 32)),
}


def _integer_model(name):
    torch.manual_seed(0)
    kwargs, shape = CASES[name]
    m = build_model(name, **kwargs).eval()
    im = convert_integer(m, [torch.randn(4, *shape) for _ in range(2)], IntegerConfig(observer="minmax"))
    return im, torch.randn(3, *shape)


@pytest.mark.parametrize("name,algo", [("vgg", "im2col"), ("vgg", "winograd"), ("mobilenetv2", "auto")])
def test_isa_paths_bit_exact(name, algo):
    im, x = _integer_model(name)
    ref = im.integer_output(x)
    eng = compile_engine(im, x[:1], num_threads=2, conv_algo=algo)
    for isa in ("portable", "auto"):            # one library, the path switched at run time
        used = eng.set_isa(isa)
        assert used == "portable" if isa == "portable" else used in ("portable", "avx2", "vnni")
        assert torch.equal(eng.run(x), ref), (name, algo, used)


def test_isa_from_environment(monkeypatch):
    im, x = _integer_model("vgg")
    eng = compile_engine(im, x[:1], num_threads=1)
    monkeypatch.setenv("EFFICIENTML_ENGINE_ISA", "portable")
    assert eng.set_isa() == "portable"
    assert torch.equal(eng.run(x), im.integer_output(x))
