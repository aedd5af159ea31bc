"""Deep mutual learning: the per-peer loss against a hand-written formula, one step against manual SGD."""

import copy

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.distill import Ensemble, mutual_learning, mutual_loss
from efficientml.train import TrainConfig, evaluate

PLAIN_SGD = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", warmup_frac=0.0)


def _hand_loss(logits, y, i, t, w):
    """CE + w·T²·mean_{j≠i} Σ_c p_j (log p_j − log p_i), softmax at T, averaged over the batch."""
    z = logits[i]
    ce = -(z - z.exp().sum(1, keepdim=True).log()).gather(1, y[:, None]).mean()
    log_pi = (z / t) - (z / t).exp().sum(1, keepdim=True).log()
    kls = []
    for j, zj in enumerate(logits):
        if j != i:
            log_pj = (zj / t) - (zj / t).exp().sum(1, keepdim=True).log()
            kls.append((log_pj.exp() * (log_pj - log_pi)).sum(1).mean())
    return ce + w * t * t * sum(kls) / len(kls)


@pytest.mark.parametrize("k", [2, 3])
def test_loss_equals_the_formula(k):
    g = torch.Generator().manual_seed(k)
    logits = [torch.randn(5, 7, generator=g, dtype=torch.float64) * 3 for _ in range(k)]
    y = torch.randint(0, 7, (5,), generator=g)
    losses, parts = mutual_loss(logits, y, temperature=2.5, kl_weight=0.7)
    assert len(losses) == k and len(parts["ce"]) == len(parts["kl"]) == k
    for i in range(k):
        torch.testing.assert_close(losses[i].double(), _hand_loss(logits, y, i, 2.5, 0.7), rtol=1e-5, atol=1e-6)


def test_other_peers_are_constants_in_a_peers_loss():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    losses, _ = mutual_loss([a, b], torch.tensor([0, 1, 2, 0]), temperature=3.0)
    (gb,) = torch.autograd.grad(losses[0], b, allow_unused=True)
    assert gb is None                                     # L_0 does not move peer 1


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_one_step_is_sgd_on_each_peers_own_loss():
    peers = [_mlp(0), _mlp(1)]
    ref = copy.deepcopy(peers)
    x, y = _data()[0]
    losses, _ = mutual_loss([m(x) for m in ref], y, temperature=2.0, kl_weight=0.5)
    expected = []
    for m, loss in zip(ref, losses):
        grads = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
        expected.append([p.detach() - 0.1 * g for p, g in zip(m.parameters(), grads)])
    h = mutual_learning(peers, _data(), TrainConfig(epochs=1, lr=0.1, max_steps=1, **PLAIN_SGD),
                        temperature=2.0, kl_weight=0.5, progress=False)
    assert h["steps"] == 1
    for m, exp, m0 in zip(peers, expected, ref):
        for p, e, p0 in zip(m.parameters(), exp, m0.parameters()):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
            assert not torch.equal(p.detach(), p0.detach())            # both peers moved


def test_three_peers_train_and_report_each_peer_and_the_ensemble():
    peers = [_mlp(s) for s in range(3)]
    before = [copy.deepcopy(m.state_dict()) for m in peers]
    data, test = _data(96, 0), _data(48, 1)
    h = mutual_learning(peers, data, TrainConfig(epochs=6, lr=0.1, **PLAIN_SGD), temperature=1.0,
                        eval_loader=test, progress=False)
    assert h["steps"] == 36 and len(h["epochs"]) == 6
    rec = h["epochs"][-1]
    for key in ("train_loss", "loss_ce", "loss_kl", "train_accuracy", "eval_accuracy"):
        assert len(rec[key]) == 3, key
    first, last = h["epochs"][0]["train_loss"], rec["train_loss"]
    assert all(b < a for a, b in zip(first, last)), (first, last)
    assert h["eval_accuracy"] == [evaluate(m, test)["accuracy"] for m in peers]
    assert h["ensemble_accuracy"] == evaluate(Ensemble(peers), test)["accuracy"]
    for m, s in zip(peers, before):
        assert any(not torch.equal(v, s[k]) for k, v in m.state_dict().items())


def test_needs_two_distinct_peers():
    m = _mlp(0)
    with pytest.raises(ConfigError, match="at least 2"):
        mutual_learning([m], _data(), TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="distinct"):
        mutual_learning([m, m], _data(), TrainConfig(epochs=1), progress=False)
