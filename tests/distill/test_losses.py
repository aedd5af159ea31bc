"""Distillation losses against independent, naive implementations (loops, explicit formulas) and known values."""

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.distill import (HintAdapter, TeacherLoss, WeightMatcher, ab_loss, attention_loss, capture, fsp_loss,
                                 fsp_matrix, gradient_attention_maps, hint_loss, kd_loss, kd_per_sample,
                                 rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss, weight_loss)
from efficientml.train import TrainConfig, fit


def test_kd_loss_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    p_t = torch.softmax(t / 4, -1)
    ref = (p_t * (p_t.log() - torch.log_softmax(s / 4, -1))).sum(-1).mean() * 16
    torch.testing.assert_close(kd_loss(s, t, 4.0), ref)
    assert kd_loss(t, t).abs().item() < 1e-6


def test_teacher_loss_sees_the_students_batch_and_trains_towards_the_teacher():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(64, 4)
    data = [(x[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 64, 16)]
    with TeacherLoss(teacher, student, temperature=2.0) as kd:
        out = student(x)
        torch.testing.assert_close(kd(student, out, None), kd_loss(out, teacher(x).detach(), 2.0))
        before = kd_loss(student(x), teacher(x), 2.0).item()
        fit(student, data, TrainConfig(epochs=30, lr=0.1, optimizer="sgd", schedule="constant", warmup_frac=0.0),
            loss_fn=lambda logits, y: logits.sum() * 0, extra_loss=kd, progress=False)
    assert kd_loss(student(x), teacher(x), 2.0).item() < 0.2 * before
    assert not student._forward_pre_hooks                       # closed on exit
    assert all(not p.requires_grad for p in teacher.parameters())


def _naive_att_map(a, p, size):
    b, c, h, w = a.shape
    q = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        for ch in range(c):
            q[i] += a[i, ch].double().abs() ** p / c
    if (h, w) != size:  # integer pooling factor in these tests: plain block averages
        fh, fw = h // size[0], w // size[1]
        q = torch.stack([torch.stack([torch.stack([q[i, r * fh:(r + 1) * fh, s * fw:(s + 1) * fw].mean()
                                                   for s in range(size[1])]) for r in range(size[0])])
                         for i in range(b)])
    q = q.reshape(b, -1)
    return torch.stack([q[i] / math.sqrt(float((q[i] ** 2).sum())) for i in range(b)])


def test_attention_loss_matches_loops_and_resizes_to_the_smaller_map():
    s, t = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)
    ref = ((_naive_att_map(s, 2, (4, 4)) - _naive_att_map(t, 2, (4, 4))) ** 2).mean()
    torch.testing.assert_close(attention_loss(s, t).double(), ref, rtol=1e-5, atol=1e-7)
    ref3 = ((_naive_att_map(t, 3, (4, 4)) - _naive_att_map(s, 3, (4, 4))) ** 2).mean()
    torch.testing.assert_close(attention_loss(t, s, p=3).double(), ref3, rtol=1e-5, atol=1e-7)
    assert attention_loss(s, s).item() == 0.0
    assert attention_loss(s, 5 * s).item() < 1e-12         # maps are normalised: scale does not matter


def test_hint_adapter_is_a_1x1_conv_then_mse_and_trains():
    s, t = torch.randn(2, 3, 5, 5), torch.randn(2, 7, 5, 5)
    ad = HintAdapter(3, 7)
    w = ad.conv.weight[:, :, 0, 0]                       # (7, 3)
    proj = torch.zeros(2, 7, 5, 5)
    for b, o, c in itertools.product(range(2), range(7), range(3)):
        proj[b, o] += w[o, c] * s[b, c]
    torch.testing.assert_close(ad(s, t), ((proj - t) ** 2).mean())
    loss = ad(s, torch.randn(2, 7, 10, 10))              # spatial sizes differ: bilinear up-sampling
    loss.backward()
    assert ad.conv.weight.grad is not None and ad.conv.weight.grad.abs().sum() > 0
    assert hint_loss(t, t).item() == 0.0
    with pytest.raises(ShapeError, match="expects 3 student channels"):
        ad(torch.randn(2, 4, 5, 5), t)


def test_gradient_attention_maps_are_the_input_gradients_and_stay_differentiable():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 3])
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y).backward()
    g = xr.grad
    ref = torch.stack([(g[i].abs().sum(0) / 2).flatten() / (g[i].abs().sum(0) / 2).norm() for i in range(3)])
    got = gradient_attention_maps(model, x, y, p=1.0)
    torch.testing.assert_close(got, ref)
    model.zero_grad()
    student_map = gradient_attention_maps(model, x, y, p=1.0, create_graph=True)
    (student_map - torch.rand_like(student_map)).pow(2).sum().backward()   # double backprop reaches weights
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_ab_loss_matches_elementwise_hinge():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    total = 0.0
    for v_s, v_t in zip(s.flatten().tolist(), t.flatten().tolist()):
        total += max(0.0, 1.0 - v_s) ** 2 if v_t > 0 else max(0.0, 1.0 + v_s) ** 2
    torch.testing.assert_close(ab_loss(s, t), torch.tensor(total / s.numel()))
    agree = torch.where(t > 0, 2.0, -2.0)                # on/off as the teacher, beyond the margin
    assert ab_loss(agree, t).item() == 0.0


def test_weight_matcher_maps_out_and_in_dims_and_low_rank():
    ws, wt = torch.randn(4, 3, 3, 3), torch.randn(6, 5, 3, 3)
    m = WeightMatcher(ws.shape, wt.shape)
    P, Q = m.out_map.matrix(), m.in_map.matrix()          # (6, 4), (5, 3)
    ref = torch.zeros(6, 5, 3, 3)
    for p, q, o, i in itertools.product(range(6), range(5), range(4), range(3)):
        ref[p, q] += P[p, o] * ws[o, i] * Q[q, i]
    torch.testing.assert_close(m.mapped(ws), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(ws, wt), ((ref - wt) ** 2).mean(), rtol=1e-5, atol=1e-6)
    lr = WeightMatcher((4, 30), (60, 30), rank=2)         # linear weights, only the out dim differs
    assert lr.in_map is None and sum(p.numel() for p in lr.parameters()) == (60 + 4) * 2
    same = WeightMatcher((5, 7), (5, 7))
    w57 = torch.randn(5, 7)
    assert not list(same.parameters()) and same(w57, w57).item() == 0
    torch.testing.assert_close(same(w57, 2 * w57), (w57 ** 2).mean())
    assert weight_loss(ws, ws).item() == 0.0
    with pytest.raises(ShapeError, match="same kernel size"):
        WeightMatcher((4, 3, 3, 3), (4, 3, 1, 1))
    with pytest.raises(ConfigError, match="rank"):
        WeightMatcher((4, 30), (60, 30), rank=9)


def test_fsp_matrix_and_loss_match_loops():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    g = torch.zeros(2, 3, 5)
    for n, i, j in itertools.product(range(2), range(3), range(5)):
        g[n, i, j] = (a[n, i] * b[n, j]).sum() / 16
    torch.testing.assert_close(fsp_matrix(a, b), g)
    a2, b2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)   # b is pooled 2×2 to a's size
    torch.testing.assert_close(fsp_matrix(a2, b2), fsp_matrix(a2, F.avg_pool2d(b2, 2)))
    torch.testing.assert_close(fsp_loss(a, b, a2, b2), ((g - fsp_matrix(a2, b2)) ** 2).mean())
    assert fsp_loss(a, b, a, b).item() == 0.0
    with pytest.raises(ShapeError, match="channel counts must equal"):
        fsp_loss(a, b, torch.randn(2, 4, 4, 4), b)


def _naive_rkd(s, t):
    b = s.shape[0]
    def dists(e):
        d = {(i, j): math.dist(e[i].tolist(), e[j].tolist()) for i in range(b) for j in range(b) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}
    def cosines(e):
        out = {}
        for i, j, k in itertools.product(range(b), repeat=3):
            if j != i and k != i:
                u, v = e[j] - e[i], e[k] - e[i]
                out[i, j, k] = float(u @ v / (u.norm() * v.norm()))
        return out
    def huber(x, y):
        return sum(0.5 * (x[k] - y[k]) ** 2 if abs(x[k] - y[k]) < 1 else abs(x[k] - y[k]) - 0.5 for k in x) / len(x)
    return huber(dists(s), dists(t)), huber(cosines(s), cosines(t))


def test_rkd_losses_match_loops_and_ignore_embedding_scale():
    s, t = torch.randn(5, 3, dtype=torch.float64), 3 * torch.randn(5, 3, dtype=torch.float64)
    d_ref, a_ref = _naive_rkd(s, t)
    assert rkd_distance_loss(s, t).item() == pytest.approx(d_ref, rel=1e-5)
    assert rkd_angle_loss(s, t).item() == pytest.approx(a_ref, rel=1e-5)
    assert rkd_loss(s, t).item() == pytest.approx(d_ref + 2 * a_ref, rel=1e-5)
    torch.testing.assert_close(rkd_loss(7.5 * s, t), rkd_loss(s, t))
    assert rkd_loss(s, 0.1 * s).item() < 1e-12
    with pytest.raises(ShapeError, match="at least 2 samples"):
        rkd_loss(s[:1], t[:1])


def test_sp_loss_matches_the_formula():
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 5, 3, 3)
    def g(f):
        f = f.reshape(4, -1)
        m = f @ f.T
        return torch.stack([m[i] / m[i].norm() for i in range(4)])
    ref = sum(float((g(s)[i, j] - g(t)[i, j]) ** 2) for i in range(4) for j in range(4)) / 16
    assert sp_loss(s, t).item() == pytest.approx(ref, rel=1e-5)
    assert sp_loss(s, s).item() == 0.0


def test_kd_gradient_scale_does_not_depend_on_temperature():
    # for T ≫ logits, ∂KL/∂s ≈ (s − t)/(C·T²); T² scaling cancels that, leaving a T-independent gradient
    s0, t = 0.3 * torch.randn(4, 10), 0.3 * torch.randn(4, 10)
    norms = {}
    for temp in (10.0, 20.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, temp).backward()
        norms[temp] = s.grad.norm().item()
    assert norms[20.0] / norms[10.0] == pytest.approx(1.0, abs=0.02)    # unscaled KL would give 0.25
    torch.testing.assert_close(kd_per_sample(s0, t, 3.0).mean(), kd_loss(s0, t, 3.0))


def test_capture_names_a_missing_module_and_lists_valid_ones():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
    with capture(model, ["0", "1"]) as feats:
        model(torch.randn(4, 2))
    assert feats["0"].shape == (4, 3) and torch.equal(feats["1"], feats["0"].clamp(min=0))
    assert (feats["0"] < 0).any()                       # cloned: the in-place ReLU did not overwrite it
    assert not model[0]._forward_hooks                  # removed on exit
    with pytest.raises(ConfigError, match=r"no module named '3'.*valid names include '0', '1', '2'"):
        capture(model, ["0", "3"])
    assert not model[0]._forward_hooks                  # nothing left behind by the failed call
