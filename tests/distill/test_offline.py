"""Offline distillation on the shared loop: KD helps on a tiny task, every method trains, `none` is `fit`."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.data.loader import ImageTensors, TensorLoader
from efficientml.distill import (METHODS, DistillConfig, Distiller, distill, gradient_attention_loss,
                                 gradient_attention_maps, kd_per_sample)
from efficientml.models import build_model
from efficientml.train import TrainConfig, fit

CONST = dict(optimizer="sgd", schedule="constant", warmup_frac=0.0, weight_decay=0.0)


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = ((x[:, 0] > 0).long() + 2 * (x[:, 1] * x[:, 2] > 0).long())     # 4 classes, not linearly separable
    return x, y


def _batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def _kl(teacher, student, x):
    with torch.no_grad():
        return kd_per_sample(student(x), teacher(x), 1.0).mean().item()


def test_kd_brings_the_student_closer_to_the_teacher_than_ce_alone():
    torch.manual_seed(0)
    x, y = _blobs(512, 0)
    teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    fit(teacher, _batches(x, y, 64), TrainConfig(epochs=40, lr=0.1, **CONST), progress=False)
    student0 = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    cfg = TrainConfig(epochs=15, lr=0.1, **CONST)
    data = _batches(x[:256], y[:256], 32)
    arms = {}
    for method in ("none", "kd"):
        student = copy.deepcopy(student0)
        distill(student, teacher, data, DistillConfig(method=method, alpha=0.9, temperature=4.0), cfg, progress=False)
        arms[method] = _kl(teacher, student, _blobs(512, 1)[0])
    assert arms["kd"] < 0.7 * arms["none"], arms        # seeded: 0.160 vs 0.264


def test_method_none_is_plain_fit_bit_for_bit():
    data = ImageTensors(torch.randint(0, 255, (48, 1, 12, 12), dtype=torch.uint8), torch.randint(0, 10, (48,)),
                        (0.5,), (0.25,))
    student = build_model("small_cnn", in_channels=1, width=0.25, hidden=8)
    teacher = build_model("small_cnn", in_channels=1, width=0.5, hidden=8)
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    cfg = TrainConfig(epochs=2, lr=0.05, label_smoothing=0.1)
    fit(a, TensorLoader(data, 16, shuffle=True, augment=True), cfg, progress=False)
    h = distill(b, teacher, TensorLoader(data, 16, shuffle=True, augment=True), DistillConfig(method="none"), cfg,
                progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert h.steps == 6 and "loss_ce" in h.epochs[0]


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_every_method_trains_with_decreasing_loss(method):
    x, y = _images()
    student = build_model("small_cnn", in_channels=1, width=0.25, hidden=16)
    teacher = build_model("resnet20", in_channels=1, width=0.25).eval()
    t_state = copy.deepcopy(teacher.state_dict())
    loader = TensorLoader(ImageTensors((x * 40 + 128).clamp(0, 255).to(torch.uint8), y, (0.5,), (0.2,)), 16)
    h = distill(student, teacher, loader, DistillConfig(method=method),
                TrainConfig(epochs=8, lr=0.02, **CONST), progress=False)
    losses = [e["train_loss"] for e in h.epochs]
    assert losses[-1] < 0.9 * losses[0], losses
    assert f"loss_{method}" in h.epochs[-1] or method == "kd"
    assert loader.epoch == 8                            # the adapters' peek at a batch did not count
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())   # frozen teacher
    assert not student._forward_pre_hooks and not any(m._forward_hooks for m in student.modules())


def test_distiller_parameters_are_exactly_the_adapters_and_train_with_the_student():
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    student = build_model("small_cnn", in_channels=1, width=0.25)
    teacher = build_model("vgg", in_channels=1, width=0.125)
    with Distiller(student, teacher, DistillConfig(method="hint", alpha=0.0), x[:2]) as d:
        assert d.student_layers == ("features.relu0", "features.relu1")
        assert d.teacher_layers == ("backbone.relu5", "backbone.relu7")       # the deepest two of four
        params = list(d.parameters())
        assert params == [a.conv.weight for a in d.adapters.values()]
        assert [tuple(p.shape) for p in params] == [(64, 8, 1, 1), (64, 16, 1, 1)]
        d.train()
        assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
        loss, parts = d.loss(x, y, student(x))
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert student.features.conv0.weight.grad.abs().sum() > 0
        ce = F.cross_entropy(student(x), y)
        assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5) and loss.item() == pytest.approx(
            parts["ce"] + parts["hint"], rel=1e-5)


def test_only_where_teacher_correct_matches_a_hand_computed_loss():
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    teacher, student = nn.Linear(3, 3), nn.Linear(3, 3)
    cfg = DistillConfig(method="kd", alpha=0.7, temperature=2.0, only_where_teacher_correct=True)
    with Distiller(student, teacher, cfg) as d:
        s = student(x)
        loss, parts = d.loss(x, y, s)
    with torch.no_grad():
        t = teacher(x)
    total, taught = 0.0, 0
    for i in range(6):
        p_t, p_s = torch.softmax(t[i], 0), torch.softmax(s[i], 0)
        ce = -torch.log_softmax(s[i], 0)[y[i]]
        if t[i].argmax() == y[i] and p_t[y[i]] > p_s[y[i]]:
            q_t, q_s = torch.softmax(t[i] / 2, 0), torch.log_softmax(s[i] / 2, 0)
            kd = 4 * (q_t * (q_t.log() - q_s)).sum()
            total, taught = total + 0.3 * ce + 0.7 * kd, taught + 1
        else:
            total = total + ce
    assert loss.detach().item() == pytest.approx(float(total.detach()) / 6, rel=1e-5)
    assert parts["taught_fraction"] == pytest.approx(taught / 6)


def test_at_grad_reuses_the_training_forward_for_the_students_gradient_map():
    student = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 36, 5))
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 5))
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    with Distiller(student, teacher, DistillConfig(method="at_grad", alpha=0.0, beta=1.0)) as d:
        _, parts = d.loss(x, y, student(x))
    ref = gradient_attention_loss(gradient_attention_maps(student, x, y, 2.0, create_graph=True),
                                  gradient_attention_maps(teacher, x, y, 2.0))
    assert parts["at_grad"] == pytest.approx(ref.item(), rel=1e-5)


def test_config_validates_and_round_trips():
    cfg = DistillConfig(method="fsp", student_layers=("a", "b"), teacher_layers=("c", "d"), beta=2.0)
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    assert DistillConfig(method="at").feature_weight == 1000.0 and cfg.feature_weight == 2.0
    with pytest.raises(ConfigError, match="method must be one of"):
        DistillConfig(method="fitnet")
    with pytest.raises(ConfigError, match="pair up one to one; got 2 and 1"):
        DistillConfig(method="hint", student_layers=("a", "b"), teacher_layers=("c",))
    with pytest.raises(ConfigError, match="uses no intermediate layers"):
        DistillConfig(method="kd", student_layers=("a",), teacher_layers=("b",))
    with pytest.raises(ConfigError, match=r"alpha must be in \[0.0, 1.0\]"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="at least 2 layers"):
        DistillConfig(method="fsp", student_layers=("a",), teacher_layers=("b",))
    with pytest.raises(ConfigError, match="beta must be a non-negative number"):
        DistillConfig(beta=float("nan"))
    with pytest.raises(ConfigError, match="needs example_input"):
        Distiller(nn.Linear(2, 2), nn.Linear(2, 2), DistillConfig(method="hint"))
    with pytest.raises(ConfigError, match="has no module named 'features.relu9'"):
        Distiller(build_model("small_cnn", in_channels=1), build_model("small_cnn", in_channels=1),
                  DistillConfig(method="hint", student_layers=("features.relu9",), teacher_layers=("features.relu1",)),
                  torch.randn(2, 1, 8, 8))
