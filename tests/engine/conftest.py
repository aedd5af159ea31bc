"""Shared builders for the engine tests: small zoo models converted to integer-only int8 once per
session (calibrated on random batches, or on real Fashion-MNIST images where the model takes them),
and the skip marks for the host compiler and the Cortex-M tool chain."""

from __future__ import annotations

import shutil

import pytest
import torch

# name → (builder kwargs, input shape C,H,W): every op kind the engine lowers, at sizes that compile fast
ZOO = {
    "vgg": (dict(width=0.25, in_channels=1), (1, 28, 28)),                      # conv2d, maxpool, mean, linear
    "resnet20": (dict(), (3, 32, 32)),                                          # add, strided gather
    "mobilenetv2": (dict(width=0.35, num_classes=10), (3, 32, 32)),             # depthwise, pointwise
    "shufflenetv2": (dict(width=0.5, num_classes=10), (3, 32, 32)),             # cat, chunk, shuffle gather
    "mobilenetv3_large": (dict(width=0.35, num_classes=10), (3, 32, 32)),       # lut (hardswish), SE mul
}
EXTRA = {"efficientnet_b0": (dict(num_classes=10), (3, 32, 32))}               # SiLU lut, SE, TF-same pad

needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                              reason="the engine's C is compiled with the system C compiler (cc/gcc/clang)")


def _mcu_missing() -> list[str]:
    from efficientml.engine.mcu import missing_tools

    return missing_tools()


needs_mcu = pytest.mark.skipif(bool(_mcu_missing()), reason=f"the Cortex-M test needs {', '.join(_mcu_missing())} "
                               "(Debian: gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")


def integer_model(model: torch.nn.Module, shape: tuple[int, ...], batches: list[torch.Tensor] | None = None):
    """``model`` as an integer-only int8 model, min/max-calibrated on ``batches`` (default: two random)."""
    from efficientml.quant.integer import IntegerConfig, convert_integer

    gen = torch.Generator().manual_seed(1)
    calib = batches or [torch.randn(4, *shape, generator=gen) for _ in range(2)]
    return convert_integer(model.eval(), calib, IntegerConfig(observer="minmax"))


@pytest.fixture(scope="session")
def zoo_integer():
    """``zoo_integer(name)`` → (float model, integer model, input shape C,H,W), built once per session."""
    from efficientml.models import build_model

    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            kwargs, shape = {**ZOO, **EXTRA}[name]
            torch.manual_seed(0)
            model = build_model(name, **kwargs).eval()
            made[name] = (model, integer_model(model, shape), shape)
        return made[name]

    return get


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory):
    """One compiled-library cache for the session (the user's ~/.cache is left alone)."""
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(autouse=True)
def _cache_env(engine_cache, monkeypatch):
    monkeypatch.setenv("EFFICIENTML_CACHE", str(engine_cache))
