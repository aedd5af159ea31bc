"""The generated C, compiled on this machine, against the Python integer reference: bit for bit on
zoo models that between them use every op kind the engine lowers, on random and real inputs; the
compiled library is cached by its source."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from efficientml.engine import compile_engine, lower
from tests.engine.conftest import ZOO, integer_model, needs_cc

pytestmark = needs_cc


def _exact(eng, im, x: torch.Tensor) -> None:
    got, ref = eng.run(x), im.integer_output(x)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    assert torch.equal(got, ref), f"{int((got != ref).sum())} of {ref.numel()} output codes differ"


@pytest.mark.parametrize("name", [*ZOO, pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_zoo_model_is_bit_exact(zoo_integer, name):
    model, im, shape = zoo_integer(name)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    eng = compile_engine(im, x[:1])
    _exact(eng, im, x)
    assert eng.plan.arena_bytes > 0 and eng.input_shape == (1, *shape)


def test_every_op_kind_is_covered(zoo_integer):
    """The zoo cases above (plus the clamp of the next test) reach every kernel lower.py emits."""
    kinds = set()
    for name, (_, shape) in ZOO.items():
        _, im, shape = zoo_integer(name)
        kinds |= {op.kind for op in lower(im, torch.zeros(1, *shape)).ops}
    assert kinds >= {"conv2d", "depthwise", "pointwise", "linear", "maxpool", "mean", "add", "mul", "lut",
                     "gather", "cat"}


class _ClampNet(nn.Module):
    """A ReLU after a max-pool and a ReLU6 after a residual add: neither fuses into a conv (clamp ops)."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4 * 13 * 13, 5)

    def forward(self, x):
        y = torch.relu(self.pool(self.conv(x)))
        y = nn.functional.relu6(self.dw(y) + y)
        return self.fc(torch.flatten(y, 1))


def test_standalone_clamp_is_bit_exact():
    im = integer_model(_ClampNet(), (1, 28, 28))
    x = torch.randn(4, 1, 28, 28)
    eng = compile_engine(im, x[:1])
    assert "clamp" in {op.kind for op in eng.plan.graph.ops}
    _exact(eng, im, x)


def test_vgg_on_real_fashion_mnist_is_bit_exact():
    """Calibrated on real training images and checked on 32 real test images."""
    from efficientml.data import fashion_mnist_loaders
    from efficientml.models import build_model

    train, test = fashion_mnist_loaders(batch_size=32, augment=False, train_subset=64, test_subset=32,
                                        eval_batch_size=32)
    model = build_model("vgg", width=0.25, in_channels=1).eval()
    im = integer_model(model, (1, 28, 28), [x for x, _ in train])
    x = next(iter(test))[0]
    eng = compile_engine(im, x[:1], prefix="vgg_fm")
    _exact(eng, im, x)
    codes = im.program.instrs[0].step.integer(x)
    assert torch.equal(eng.run_codes(codes), im.integer_output(x))     # the codes path is the same run
    assert len(torch.unique(codes)) > 16                                # real images, not a constant


def test_wrong_input_shape_is_refused(zoo_integer):
    from efficientml.core.errors import ShapeError

    _, im, shape = zoo_integer("vgg")
    eng = compile_engine(im, torch.zeros(1, *shape))
    with pytest.raises(ShapeError, match=r"inputs shaped \(B, 1, 28, 28\)"):
        eng.run_codes(torch.zeros(1, 1, 32, 32, dtype=torch.int32))


def test_compiled_library_is_cached(zoo_integer, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTML_CACHE", str(tmp_path))
    _, im, shape = zoo_integer("resnet20")
    x = torch.randn(2, *shape)
    first = compile_engine(im, x[:1])
    lib = first.library
    assert lib.is_file() and tmp_path in lib.parents
    stamp = lib.stat().st_mtime_ns
    second = compile_engine(im, x[:1])                  # same source: the same file, not rebuilt
    assert second.library == lib and lib.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in lib.parent.iterdir() if p.suffix == ".so") == [lib.name]
    _exact(second, im, x)
    other = compile_engine(im, x[:1], prefix="other")   # another source: another library
    assert other.library != lib and other.library.is_file()
