"""Gradient-based NAS on a tiny space: the DARTS mixture, one-hot α equal to the extracted plain subnet,
the ProxylessNAS two-path estimator against its closed form, the expected latency against a hand sum
from a fake table, the latency loss reaching the cheapest network, and the derivation rule for skips."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.nas.gradient import (_alpha_step, _weight_step, candidate_keys, darts_search, expected_latency,
                                      proxyless_search, slot_latencies)
from efficientml.nas.gradient_ops import MixedNet, MixedOp
from efficientml.nas.latency import LatencyTable, all_op_keys
from efficientml.nas.space import Arch, MBSpace
from tests.prune.conftest import randomize_bn

TINY = MBSpace(stem=8, stages=((16, 2, 2), (24, 2, 2)), head=32, min_depths=(1, 1), resolutions=(16,))
# TINY's slots by hand: (c_in, c_out, stride, input size); the stem is 1→8 at 16², the head 24→32 at 4²
TINY_SLOTS = [(8, 16, 2, 16), (16, 16, 1, 8), (16, 24, 2, 8), (24, 24, 1, 4)]


def _randomize_bn(net: nn.Module) -> nn.Module:
    return randomize_bn(net).train(net.training)  # the prune tests' helper, in the caller's mode


def _set_choices(net: MixedNet, idx: list[int], logit: float = 60.0) -> None:
    with torch.no_grad():
        for a, i in zip(net.alphas, idx):
            a.zero_()
            a[i] = logit


def _fake_table(space: MBSpace, seed: int = 0) -> LatencyTable:
    rng = random.Random(seed)
    return LatencyTable(space, threads=1, entries={k: rng.uniform(0.1, 2.0) for k in all_op_keys(space)})


def _batches(n: int, b: int = 4, res: int = 16) -> list:
    return [(torch.randn(b, 1, res, res), torch.randint(0, 10, (b,))) for _ in range(n)]


def test_mixed_op_is_the_softmax_weighted_sum():
    op = _randomize_bn(MixedOp(8, 8, 1, [(3, 3), (5, 6), (3, 6)], skip=True)).eval()
    alpha, x = torch.randn(4), torch.randn(2, 8, 6, 6)
    w = alpha.exp() / alpha.exp().sum()
    with torch.no_grad():
        hand = w[0] * op.candidates[0](x) + w[1] * op.candidates[1](x) + w[2] * op.candidates[2](x) + w[3] * x
        torch.testing.assert_close(op(x, alpha, "mixed"), hand, atol=1e-6, rtol=0)
        for seed in range(4):  # binary: exactly the one sampled candidate
            y = op(x, alpha, "binary", torch.Generator().manual_seed(seed))
            assert torch.equal(y, op.candidates[op.last_sample[0]](x))
    assert op.choices == [(3, 3), (5, 6), (3, 6), None] and isinstance(op.candidates[3], nn.Identity)
    with pytest.raises(ConfigError):
        MixedOp(8, 16, 1, [(3, 3)], skip=True)


def test_alpha_and_weights_are_separate_parameter_sets():
    net = MixedNet(TINY)
    arch, weights = net.arch_parameters(), net.weight_parameters()
    assert [a.shape[0] for a in arch] == [9, 10, 9, 10]  # 3 kernels × 3 expands (+ skip beyond min depth)
    assert not {id(p) for p in arch} & {id(p) for p in weights}
    assert {id(p) for p in arch} | {id(p) for p in weights} == {id(p) for p in net.parameters()}
    a_opt, w_opt = torch.optim.Adam(arch, lr=0.1), torch.optim.SGD(weights, lr=0.1)
    (train,), (val,) = _batches(1), _batches(1)
    for method in ("darts", "proxyless"):
        net.zero_grad(set_to_none=True)
        w0, a0 = [p.detach().clone() for p in weights], [a.detach().clone() for a in arch]
        _alpha_step(net, a_opt, val, method, 0.0, None)  # moves α only
        assert all(torch.equal(p, q) for p, q in zip(weights, w0)) and all(p.grad is None for p in weights)
        assert any(not torch.equal(a, b) for a, b in zip(arch, a0))
        a1 = [a.detach().clone() for a in arch]
        _weight_step(net, w_opt, train, method)  # moves weights only
        assert all(torch.equal(a, b) for a, b in zip(arch, a1))
        assert any(not torch.equal(p, q) for p, q in zip(weights, w0))


def test_one_hot_alpha_equals_the_extracted_subnet():
    net = _randomize_bn(MixedNet(TINY)).eval()
    x = torch.randn(3, 1, 16, 16)
    rng = random.Random(0)
    for trial in range(4):
        idx = [rng.randrange(a.shape[0]) for a in net.alphas]
        if trial == 0:
            idx[1], idx[3] = 9, 9  # both stages end after their first block
        _set_choices(net, idx)
        arch = net.derive()
        picks = [op.choices[i] for op, i in zip(net.slots, idx)]
        assert arch.depths == tuple(1 if picks[s] is None else 2 for s in (1, 3))
        if trial == 0:
            assert arch.depths == (1, 1)
        sub = net.extract()
        assert sub.arch == arch and len(sub.features) == sum(arch.depths) + 2
        with torch.no_grad():
            torch.testing.assert_close(net(x), sub(x), atol=1e-5, rtol=0)


def test_derivation_rule_for_skips():
    space = MBSpace(stem=8, stages=((16, 3, 2), (24, 3, 1)), head=32, kernels=(3, 5), expands=(3, 6),
                    min_depths=(1, 2), resolutions=(16,))
    net = MixedNet(space)
    assert [a.shape[0] for a in net.alphas] == [4, 5, 5, 4, 4, 5]  # no skip below the min depth
    op, skip = 1, 4  # candidate 1 is (3, 6); 4 is skip where there is one
    cases = {  # stage 1 argmax per slot → depth; stage 2 keeps its min depth 2 or takes 3
        (op, skip, op, op, op, skip): (1, 2),  # a skip before a block ends the stage: the later block is dropped
        (op, op, skip, op, op, op): (2, 3),
        (op, skip, skip, op, op, op): (1, 3),
        (op, op, op, op, op, skip): (3, 2),
    }
    for idx, depths in cases.items():
        _set_choices(net, list(idx))
        arch = net.derive()
        assert arch.depths == depths, idx
        assert arch == space.canonical(arch)
        space.check(arch)
        used = [s for s, *_ in space.blocks(arch)]
        assert all(arch.kernels[s] == 3 and arch.expands[s] == 6 for s in used)
        assert all(arch.kernels[s] == 5 and arch.expands[s] == 6 for s in range(6) if s not in used)  # canonical


def test_derived_archs_are_valid():
    net = MixedNet(TINY)
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(40):
        with torch.no_grad():
            for a in net.alphas:
                a.copy_(3 * torch.randn(a.shape, generator=gen))
        arch = net.derive()
        TINY.check(arch)
        assert arch == TINY.canonical(arch) and arch.resolution == 16 and arch.width == 1.0
        seen.add(arch.depths)
    assert len(seen) >= 3 and seen <= {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_two_path_estimator_matches_the_closed_form():
    """L = ⟨w, y⟩ is linear in the gates: ∂L/∂g_j = ⟨w, op_j(x)⟩ = c_j, and over the sampled pair S
    ∂L/∂α_i = Σ_{j∈S} c_j p̃_j (δ_ij − p̃_i), zero outside S."""
    op = _randomize_bn(MixedOp(8, 8, 1, [(3, 3), (5, 3), (3, 6)], skip=True)).eval()
    x, w = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    pairs = set()
    for seed in range(8):
        alpha = torch.randn(4, requires_grad=True)
        op.zero_grad(set_to_none=True)
        y = op(x, alpha, "two_path", torch.Generator().manual_seed(seed))
        (w * y).sum().backward()
        a, b = op.last_sample
        pairs.add(frozenset((a, b)))
        assert torch.equal(y, op.candidates[a](x))  # the output is the active path's, exactly
        with torch.no_grad():
            c = {j: float((w * op.candidates[j](x)).sum()) for j in (a, b)}
            pt = dict(zip((a, b), F.softmax(alpha[[a, b]], dim=0).tolist()))
        want = [sum(c[j] * pt[j] * ((i == j) - pt[i]) for j in (a, b)) if i in (a, b) else 0.0 for i in range(4)]
        torch.testing.assert_close(alpha.grad, torch.tensor(want), atol=1e-5, rtol=1e-5)
        for j, cand in enumerate(op.candidates):  # only the active path's weights get a gradient
            assert all((p.grad is not None) == (j == a) for p in cand.parameters())
    assert len(pairs) >= 3


def test_expected_latency_equals_the_hand_sum():
    table = _fake_table(TINY)
    n_entries = len(table.entries)
    net = MixedNet(TINY)
    with torch.no_grad():
        for a in net.alphas:
            a.normal_(0, 1.5)
    hand = table.entries[("stem", 1, 8, 16)] + table.entries[("head", 24, 32, 10, 4)]
    for (c_in, c_out, s, h), a, op in zip(TINY_SLOTS, net.alphas, net.slots):
        p = a.detach().exp() / a.detach().exp().sum()
        for pi, ch in zip(p.tolist(), op.choices):
            hand += 0.0 if ch is None else pi * table.entries[("mb", c_in, c_out, s, float(ch[1]), ch[0], h)]
    e = expected_latency(net, table)
    assert e.requires_grad and abs(e.item() - hand) < 1e-5
    assert len(table.entries) == n_entries  # every key was in the table: nothing was timed
    assert candidate_keys(net)[1][1][9] is None  # slot 1's skip has no op and costs 0
    _set_choices(net, [4, 2, 7, 5])  # one-hot, no skip: E[lat] is the table's prediction of the derived arch
    assert abs(expected_latency(net, slot_latencies(net, table)).item() - table.predict(net.derive())) < 1e-4
    with pytest.raises(ConfigError):
        expected_latency(net, _fake_table(MBSpace(stem=8, stages=((16, 2, 2),), head=32, min_depths=(1,))))


def test_two_path_step_keeps_the_unsampled_paths_probabilities():
    net = MixedNet(TINY)
    opt = torch.optim.Adam(net.arch_parameters(), lr=0.2, betas=(0.0, 0.999))
    p0 = net.probs()
    _alpha_step(net, opt, _batches(1)[0], "proxyless", 0.0, None)
    for op, p, q in zip(net.slots, p0, net.probs()):
        pair = list(op.last_sample)
        rest = [i for i in range(len(p)) if i not in pair]
        torch.testing.assert_close(q[rest], p[rest], atol=1e-6, rtol=0)  # the rescaling's invariant
        assert abs(float(q[pair].sum() - p[pair].sum())) < 1e-6 and not torch.allclose(q[pair], p[pair])


@pytest.mark.parametrize("search", [darts_search, proxyless_search])
def test_a_large_latency_weight_reaches_the_cheapest_network(search):
    """Blocks cost 1–2 ms but one candidate of each min-depth slot costs 0.2 ms; skip costs 0."""
    rng = random.Random(1)
    table = LatencyTable(TINY, threads=1, entries={k: rng.uniform(1.0, 2.0) for k in all_op_keys(TINY)})
    cheapest = {}
    for s in (0, 2):
        c_in, c_out, st, h = TINY_SLOTS[s]
        cheapest[s] = (rng.choice(TINY.kernels), rng.choice(TINY.expands))
        table.entries[("mb", c_in, c_out, st, float(cheapest[s][1]), cheapest[s][0], h)] = 0.2
    net = MixedNet(TINY)
    data = _batches(2)
    hist = search(net, data, data, steps=8, lr_w=0.01, lr_alpha=0.3, latency_weight=100.0, table=table)
    arch = Arch.from_dict(hist["arch"])
    TINY.check(arch)
    assert arch.depths == (1, 1)
    assert (arch.kernels[0], arch.expands[0]) == cheapest[0] and (arch.kernels[2], arch.expands[2]) == cheapest[2]
    assert hist["choices"][1] == hist["choices"][3] == "skip"
    best = table.predict(arch)
    assert hist["predicted_latency_ms"] == pytest.approx(best)
    lats = [r["expected_latency_ms"] for r in hist["steps"]]
    assert len(lats) == 8 and lats[-1] < lats[0] and best < hist["expected_latency_ms"] < lats[0]


def test_searches_fit_the_data_and_check_arguments():
    data = _batches(1, b=8)
    for search in (darts_search, proxyless_search):
        net = MixedNet(TINY)
        hist = search(net, data, data, steps=6, lr_w=0.1, lr_alpha=0.05)
        assert hist["steps"][-1]["train_loss"] < hist["steps"][0]["train_loss"]
        assert hist["expected_latency_ms"] is None and hist["costs"]["macs"] > 0
        TINY.check(Arch.from_dict(hist["arch"]))
    with pytest.raises(ConfigError):
        darts_search(MixedNet(TINY), data, data, 1, 0.1, 0.1, latency_weight=1.0)
    with pytest.raises(ConfigError):
        proxyless_search(MixedNet(TINY), [], data, 1, 0.1, 0.1)
    with pytest.raises(ConfigError):
        MixedNet(TINY, width=0.5)
