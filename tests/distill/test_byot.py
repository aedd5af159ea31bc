"""BYOT: the loss against a hand computation, automatic stages, the model unchanged by its heads."""

import copy

import pytest
import torch
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.data.loader import ImageTensors, TensorLoader
from efficientml.distill import HeadOutputs, SelfDistillHeads, byot_loss, byot_train
from efficientml.models import build_model
from efficientml.train import TrainConfig


def _softmax_log(z, t):
    return (z / t) - (z / t).exp().sum(1, keepdim=True).log()


def test_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    heads = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    feats = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    deep = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 4, 1])
    a, t, lam = 0.3, 3.0, 0.03

    def ce(logits):
        return -_softmax_log(logits, 1.0).gather(1, y[:, None]).mean()

    ref = ce(z)
    lp_deep = _softmax_log(z, t)
    for zk, fk in zip(heads, feats):
        kl = (lp_deep.exp() * (lp_deep - _softmax_log(zk, t))).sum(1).mean()
        ref = ref + (1 - a) * ce(zk) + a * t * t * kl + lam * ((fk - deep) ** 2).sum(1).mean()
    loss, parts = byot_loss(HeadOutputs(z, heads, feats, deep), y, a, t, lam)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"ce", "head0_ce", "head0_kd", "head0_feature", "head1_ce", "head1_kd", "head1_feature"}


def test_gradients_of_the_deepest_outputs_come_from_its_own_ce_only():
    z = torch.randn(3, 4, requires_grad=True)
    deep = torch.randn(3, 2, requires_grad=True)
    out = HeadOutputs(z, [torch.randn(3, 4, requires_grad=True)], [torch.randn(3, 2, requires_grad=True)], deep)
    y = torch.tensor([0, 1, 2])
    loss, _ = byot_loss(out, y)
    gz, gd = torch.autograd.grad(loss, [z, deep], allow_unused=True)
    (gz_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    torch.testing.assert_close(gz, gz_ce)                             # the heads do not pull the teacher
    assert gd is None


def test_automatic_stages():
    x = torch.randn(2, 1, 16, 16)
    with SelfDistillHeads(build_model("small_cnn", in_channels=1, width=0.25), example_input=x) as h:
        assert h.stages == ("features.relu0",)
        assert h.heads[0].bottleneck[0].weight.shape == (64, 8, 1, 1) and h.heads[0].fc.out_features == 10
    with SelfDistillHeads(build_model("resnet20", in_channels=1, width=0.25), example_input=x) as h:
        assert h.stages == ("layer1", "layer2")
    with pytest.raises(ConfigError, match="no module named"):
        SelfDistillHeads(build_model("small_cnn", in_channels=1), ["features.relu9"], example_input=x)


def _loader(n=48, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 255, (n, 1, 12, 12), dtype=torch.uint8, generator=g)
    return TensorLoader(ImageTensors(imgs, torch.randint(0, 10, (n,), generator=g), (0.5,), (0.25,)), 16,
                        shuffle=shuffle)


def _structure(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.shape for k, v in model.state_dict().items()}


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_training_leaves_the_model_unchanged_in_structure_and_reports_each_head():
    model = build_model("small_cnn", in_channels=1, width=0.25, hidden=16)
    structure, state0 = _structure(model), copy.deepcopy(model.state_dict())
    test = _loader(32, 1, shuffle=False)
    r = byot_train(model, _loader(), TrainConfig(epochs=3, lr=0.05), eval_loader=test, progress=False)
    assert _structure(model) == structure and _hooks(model) == 0
    assert any(not torch.equal(v, state0[k]) for k, v in model.state_dict().items())
    ep = r["history"]["epochs"]
    assert len(ep) == 3 and {"loss_ce", "loss_head0_ce", "loss_head0_kd", "loss_head0_feature"} <= set(ep[0])
    heads = r["heads"]
    model.eval()
    x, y = next(iter(test))
    bare = model(x)
    with heads.attach():
        heads.eval()
        out = heads(x)
        assert torch.equal(out.logits, bare)                         # hooks do not change the forward
        relu0 = model.features[:3](x)
        torch.testing.assert_close(out.head_logits[0], heads.heads[0](relu0)[1])
        torch.testing.assert_close(out.deep_feature, model.classifier[:2](torch.flatten(model.features(x), 1)))
    assert _hooks(model) == 0
    ev = heads.evaluate(test)                                        # attaches and removes its own hooks
    assert _hooks(model) == 0
    acc = [0.0]
    with heads.attach():
        for xb, yb in test:
            acc[0] += float((heads(xb).head_logits[0].argmax(1) == yb).sum())
    assert ev["head_accuracy"] == [100.0 * acc[0] / 32] == r["head_accuracy"]
    assert ev["accuracy"] == r["accuracy"] == ep[-1]["eval_accuracy"]
