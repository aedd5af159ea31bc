import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import CheckpointError, ConfigError
from efficientml.data.loader import ImageTensors, TensorLoader
from efficientml.train import (TrainConfig, evaluate, fit, load_checkpoint, load_optimizer_state,
                               make_optimizer, save_checkpoint)
from efficientml.train.schedule import triangular


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    img = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    img[y == 1, :, :4] = 200          # class 1: top half bright — linearly separable
    img += torch.randint(0, 40, img.shape, generator=g, dtype=torch.uint8)
    return ImageTensors(img, y, (0.5,), (0.5,))


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def test_triangular_schedule_peaks_at_30_percent_and_ends_at_zero():
    f = triangular(100, 0.3)
    vals = [f(s) for s in range(100)]
    assert max(vals) == pytest.approx(1.0) and vals.index(max(vals)) == 29
    assert vals[-1] == 0.0 and vals[0] == pytest.approx(1 / 30)


def test_fit_learns_a_separable_problem_and_after_step_runs():
    data = _toy()
    calls = []
    model = _net()
    fit(model, TensorLoader(data, 32, shuffle=True), TrainConfig(epochs=3, lr=0.1),
        after_step=lambda m: calls.append(1))
    assert len(calls) == 3 * 8
    assert evaluate(model, TensorLoader(_toy(seed=1), 64))["accuracy"] == 100.0


def test_fit_is_deterministic():
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _net()
        fit(model, TensorLoader(_toy(), 32, shuffle=True, augment=True), TrainConfig(epochs=1, seed=3))
        outs.append(model[1].weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_bad_train_config_values():
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="epochs must be in"):
        TrainConfig(epochs=0)
    assert TrainConfig(lr=0.1).finetune(0.01).lr == pytest.approx(0.001)


def test_checkpoint_round_trip_with_optimizer(tmp_path):
    model = _net()
    opt = make_optimizer(model, TrainConfig())
    fit(model, TensorLoader(_toy(), 32), TrainConfig(epochs=1), optimizer=opt)
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, model, {"note": "toy"}, optimizer=opt)
    m2, meta = load_checkpoint(p, model=_net())
    assert meta == {"note": "toy"}
    torch.testing.assert_close(m2[1].weight, model[1].weight, rtol=0, atol=0)
    opt2 = make_optimizer(m2, TrainConfig())
    load_optimizer_state(p, opt2)
    k = next(iter(opt.state))
    k2 = next(iter(opt2.state))
    torch.testing.assert_close(opt.state[k]["momentum_buffer"], opt2.state[k2]["momentum_buffer"])
    with pytest.raises(CheckpointError, match="does not name its model"):
        load_checkpoint(p)


def test_zoo_checkpoint_rebuilds_model(tmp_path):
    from efficientml.models import build_model

    m = build_model("vgg", in_channels=1, width=0.125)
    p = tmp_path / "vgg.safetensors"
    save_checkpoint(p, m, {"model": "vgg", "model_kwargs": {"in_channels": 1, "width": 0.125}})
    m2, _ = load_checkpoint(p)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(m.eval()(x), m2.eval()(x))
