"""Zero-shot NAS proxies and rank correlation: closed forms on tiny nets, model untouched, scipy parity."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efficientml.core.errors import ConfigError, EfficientMLError, UnsupportedError
from efficientml.nas.proxies import PROXIES, gradsign, grad_norm, jacob_cov, naswot, score, snip, synflow, zen
from efficientml.nas.rank import kendall_tau, spearman


def _cnn(width: int = 4, classes: int = 3, pool_module: bool = False) -> nn.Module:
    """conv-BN-ReLU ×2 → global pool → linear, for (B, 3, 8, 8) inputs."""
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pool_module else [_MeanPool()]
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        *pool, nn.Dropout(0.2), nn.Linear(width, classes),
    )


class _MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, C): a functional global pool, no pool module


def _batch(b: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 3, 8, 8), torch.randint(0, classes, (b,))


def _linear_ce_grads(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ∂(mean CE)/∂(W, b) of a linear classifier: G = (softmax(XWᵀ + b) − onehot(y)) / B."""
    xf = x.flatten(1).double()
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    g = (torch.softmax(xf @ w.T + b, dim=1) - F.one_hot(y, w.shape[0]).double()) / x.shape[0]  # (B, classes)
    return g.T @ xf, g.sum(0)


def test_params_equals_numel_sum():
    m = _cnn(width=5)
    by_hand = 3 * 5 * 9 + 5 * 5 * 9 + 2 * 2 * 5 + 5 * 3 + 3  # two convs, two BN (γ, β), linear
    assert score(m, "params", _batch()[0]) == sum(p.numel() for p in m.parameters()) == by_hand


def test_synflow_closed_form_two_layer_linear():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    w1, w2 = m[1].weight.detach().double().abs(), m[3].weight.detach().double().abs()  # (3, 4), (2, 3)
    r = float(torch.ones(2, dtype=torch.float64) @ w2 @ w1 @ torch.ones(4, dtype=torch.float64))  # 1ᵀ|W2||W1|1
    # ∂R/∂W1_jk = Σ_i |W2|_ij (the all-ones input), ∂R/∂W2_ij = Σ_k |W1|_jk (the hidden unit)
    by_hand = float((w1 * w2.sum(0)[:, None]).sum() + (w2 * w1.sum(1)[None, :]).sum())
    got = synflow(m, torch.randn(5, 1, 2, 2))
    assert got == pytest.approx(by_hand, rel=1e-12)
    assert got == pytest.approx(2 * r, rel=1e-12)  # each layer of a homogeneous linear net carries R


def test_synflow_ignores_bn_buffers_and_input_values():
    m = _cnn()
    x = _batch()[0]
    ref = synflow(m, x)
    m[1].running_mean.fill_(-5.0)
    assert synflow(m, 3 * x) == pytest.approx(ref, rel=1e-12)


def test_grad_norm_and_snip_closed_form_linear():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(7, 1, 2, 2), torch.randint(0, 3, (7,))
    gw, gb = _linear_ce_grads(m[1], x, y)
    w, b = m[1].weight.detach().double(), m[1].bias.detach().double()
    assert grad_norm(m, x, y) == pytest.approx(math.sqrt(gw.pow(2).sum() + gb.pow(2).sum()), rel=1e-5)
    assert snip(m, x, y) == pytest.approx(float((w * gw).abs().sum() + (b * gb).abs().sum()), rel=1e-5)


def test_grad_norm_and_snip_match_autograd_in_train_mode():
    m = _cnn().eval()  # the proxies use batch statistics whatever the caller's mode
    x, y = _batch()
    ref = copy.deepcopy(m).train()
    ref[7] = nn.Identity()  # drop dropout so the reference needs no RNG
    m[7] = nn.Identity()
    ps = list(ref.parameters())
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), ps)
    assert grad_norm(m, x, y) == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)), rel=1e-5)
    assert snip(m, x, y) == pytest.approx(sum(float((p.detach() * g).abs().sum()) for p, g in zip(ps, grads)), rel=1e-5)


def test_gradsign_by_hand():
    m = nn.Sequential(nn.Flatten(), nn.Linear(3, 2, bias=False))
    nn.init.zeros_(m[1].weight)  # softmax (½, ½): g_i = (p − e_{y_i}) x_iᵀ, row y_i −½x_i, the other +½x_i
    x = torch.tensor([[1.0, -2.0, 3.0], [2.0, 1.0, -1.0], [-1.0, 1.0, 1.0]]).reshape(3, 1, 1, 3)
    y = torch.tensor([0, 1, 0])
    # row 0 signs: −[1,−1,1] + [1,1,−1] − [−1,1,1] = [1,1,−3] → 5; row 1 is its negation → 5
    assert gradsign(m, x, y) == 10.0


def test_gradsign_closed_form_random():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    x, y = torch.randn(9, 1, 2, 2), torch.randint(0, 3, (9,))
    xf, w = x.flatten(1).double(), m[1].weight.detach().double()
    g = torch.softmax(xf @ w.T, dim=1) - F.one_hot(y, 3).double()  # (B, 3): per-sample ∂L_i/∂logits
    per_sample = g[:, :, None] * xf[:, None, :]  # (B, 3, 4)
    assert gradsign(m, x, y) == float(per_sample.sign().sum(0).abs().sum())


class _FunctionalReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(torch.relu(x.flatten(1)), -1.0, 1.0)  # the relu is a unit, a (−1, 1) hardtanh is not


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(inplace=True), _FunctionalReLU()], ids=["relu", "relu6", "F"])
def test_naswot_known_kernel(act):
    m = nn.Sequential(nn.Flatten(), act)
    x = torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]]).reshape(3, 1, 1, 3)
    # codes 101, 110, 000: every pair differs in 2 of N_A = 3 units → K = [[3,1,1],[1,3,1],[1,1,3]], det 20
    assert naswot(m, x) == pytest.approx(math.log(20.0), rel=1e-12)


def test_naswot_identical_codes():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU())
    with torch.no_grad():
        m[1].weight.zero_()  # every sample gets the code bias > 0 on N_A = 6 units
        m[1].bias.copy_(torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, 0.5]))
    assert naswot(m, torch.randn(1, 1, 2, 2)) == pytest.approx(math.log(6.0), rel=1e-12)  # K = [N_A]
    assert naswot(m, torch.randn(4, 1, 2, 2)) == -math.inf  # K = N_A·11ᵀ has rank 1


def test_jacob_cov_identical_jacobians_closed_form():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # J_i = Wᵀ1 for every sample: C = 11ᵀ, λ = B, 0, …
    b, k = 5, 1e-5
    expected = -(math.log(b + k) + 1 / (b + k)) - (b - 1) * (math.log(k) + 1 / k)
    assert jacob_cov(m, torch.randn(b, 3, 2, 2)) == pytest.approx(expected, rel=1e-9)


def test_jacob_cov_matches_numpy_on_relu_mlp():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).double()  # λ ≈ 0 amplify fp32
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    w1, b1, w2 = (t.detach().double() for t in (m[1].weight, m[1].bias, m[3].weight))
    active = (x.flatten(1).double() @ w1.T + b1 > 0).double()  # (B, 16)
    jac = ((active * w2.sum(0)) @ w1).numpy()  # J_i = W1ᵀ diag(active_i) W2ᵀ 1, (B, 12)
    lam = np.linalg.eigvalsh(np.corrcoef(jac)).clip(0)
    assert jacob_cov(m, x) == pytest.approx(float(-np.sum(np.log(lam + 1e-5) + 1 / (lam + 1e-5))), rel=1e-9)


def test_zen_ignores_caller_state_and_is_seeded():
    m = _cnn()
    x = _batch()[0]
    ref = zen(m, x)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    m[1].running_var.fill_(7.0)
    m.eval()
    assert zen(m, 5 * x) == ref  # Gaussian re-init and Gaussian inputs: only the architecture and seed count
    assert zen(m, x, seed=1) != ref


def test_zen_finds_the_feature_map_behind_either_pool():
    x = _batch()[0]
    assert zen(_cnn(pool_module=True), x) == pytest.approx(zen(_cnn(pool_module=False), x), rel=1e-12)


def test_zen_switches_dropout_off():
    def net(mid: nn.Module) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), mid, nn.Conv2d(4, 4, 3),
                             _MeanPool(), nn.Linear(4, 3))

    x = _batch()[0]
    assert zen(net(nn.Dropout2d(0.5)), x) == zen(net(nn.Identity()), x)  # f(x) and f(x + αε): one function


class _SlicedBN(nn.Module):
    """A supernet-style BN: owns an nn.BatchNorm2d but calls F.batch_norm on its first C channels."""

    def __init__(self, max_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(max_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, bn = x.shape[1], self.bn
        return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], bn.training)


def test_zen_counts_functional_batch_norm():
    plain, sliced = _cnn(), _cnn()
    sliced[1], sliced[4] = _SlicedBN(8), _SlicedBN(8)  # its BN term needs the F.batch_norm calls
    x = _batch()[0]
    assert zen(sliced, x) == pytest.approx(zen(plain, x), rel=1e-12)


def test_zen_prefers_the_wider_net():
    x = _batch(8)[0]
    for seed in range(3):
        assert zen(_cnn(width=32), x, seed=seed) > zen(_cnn(width=2), x, seed=seed) + 1.0


@pytest.mark.parametrize("train", [True, False])
def test_every_proxy_leaves_the_model_unchanged(train):
    m = _cnn().train(train)
    m[0].weight.requires_grad_(False)
    m[1].running_mean.normal_()
    x, y = _batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = [mod.training for mod in m.modules()]
    frozen = [p.requires_grad for p in m.parameters()]
    rng = torch.random.get_rng_state()
    for name in PROXIES:
        first = score(m, name, x, y, seed=3)
        assert math.isfinite(first), name
        assert score(m, name, x, y, seed=3) == first, name  # deterministic for a fixed seed
        after = m.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name
        assert [mod.training for mod in m.modules()] == modes, name
        assert all(p.grad is None for p in m.parameters()), name
        assert [p.requires_grad for p in m.parameters()] == frozen, name
    assert torch.equal(torch.random.get_rng_state(), rng)  # proxies draw from a forked RNG


def test_unknown_proxy_and_missing_labels():
    x = _batch()[0]
    with pytest.raises(UnsupportedError, match="naswot needs ReLU activations"):
        score(nn.Sequential(nn.Flatten(), nn.Tanh()), "naswot", x)
    with pytest.raises(ConfigError, match=r"^unknown zero-shot proxy 'zenn' \(did you mean 'zen'\?\); expected one of"):
        score(_cnn(), "zenn", x)
    with pytest.raises(ValueError):  # ConfigError is also a ValueError
        score(_cnn(), "flops", x)
    with pytest.raises(EfficientMLError, match="proxy 'snip' needs labels y"):
        score(_cnn(), "snip", x)


@pytest.mark.parametrize("n", [2, 7, 40, 300])
def test_rank_correlations_match_scipy_with_ties(n):
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(n)
    a = torch.randint(0, max(2, n // 4), (n,), generator=gen).double()  # many ties
    b = a + torch.randint(-3, 4, (n,), generator=gen).double()
    b[: n // 3] = torch.randint(0, 5, (n // 3,), generator=gen).double()
    for x, y in ((a, b), (a, torch.rand(n, generator=gen, dtype=torch.float64))):
        rho, tau = stats.spearmanr(x.numpy(), y.numpy()).statistic, stats.kendalltau(x.numpy(), y.numpy()).statistic
        assert spearman(x, y) == pytest.approx(rho, abs=1e-12, nan_ok=True)
        assert kendall_tau(x, y) == pytest.approx(tau, abs=1e-12, nan_ok=True)


def test_rank_correlation_edge_cases():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0, abs=1e-15)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)
    assert kendall_tau([-math.inf, 0.0, 2.0], [1, 2, 3]) == pytest.approx(1.0, abs=1e-15)  # naswot's −inf ranks last
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ConfigError, match="same items, got 3 and 2"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ConfigError, match="NaN"):
        kendall_tau([1.0, math.nan], [1.0, 2.0])
