import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.prune import MaskSet, PruneConfig, make_mask, prune
from efficientml.prune.masks import kernel_patterns, nm_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.9])
def test_fine_mask_sparsity_exact(sparsity):
    w = torch.randn(32, 16, 3, 3)
    m = make_mask(w.abs(), "fine", sparsity)
    assert int((~m).sum()) == round(sparsity * w.numel())
    kept = w.abs()[m]
    if sparsity > 0:
        assert kept.min() >= w.abs()[~m].max()  # the largest magnitudes survive


def test_nm_pattern_holds_conv_and_linear():
    for w in (torch.randn(8, 16, 3, 3), torch.randn(12, 32)):
        m = nm_mask(w.abs(), 2, 4)
        groups = m.movedim(1, -1).reshape(-1, 4)
        assert (groups.sum(dim=1) == 2).all()
        assert m.float().mean().item() == pytest.approx(0.5)
    m = nm_mask(torch.randn(4, 16), 1, 8)
    assert (m.reshape(-1, 8).sum(1) == 1).all()


def test_nm_errors():
    with pytest.raises(ConfigError, match="N ≤ M"):
        PruneConfig(method="nm", n=5, m=4)
    with pytest.raises(ShapeError, match="not divisible by M=4"):
        nm_mask(torch.randn(4, 6), 2, 4, layer="fc")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0.0, 1.0\)"):
        PruneConfig(sparsity=bad)


def test_unknown_layer_name(vgg):
    with pytest.raises(ConfigError, match="model has no layer named 'backbone.conv99'"):
        prune(vgg, PruneConfig(), filter=("backbone.conv99",))


def test_unknown_criterion():
    from efficientml.prune import CRITERIA

    with pytest.raises(ConfigError, match="unknown pruning criterion 'l3'"):
        CRITERIA.get("l3")


def test_granularities_group_shapes():
    w = torch.randn(8, 4, 3, 3)
    vec = make_mask(w.abs(), "vector", 0.5)
    assert (vec.all(dim=3) | (~vec).all(dim=3)).all()          # whole rows
    ker = make_mask(w.abs(), "kernel", 0.25)
    assert (ker.flatten(2).all(2) | (~ker).flatten(2).all(2)).all()
    assert int((~ker.flatten(2).all(2)).sum()) == 8             # 25% of 32 kernels
    ch = make_mask(w.abs(), "channel", 0.5)
    assert int((~ch.flatten(1).all(1)).sum()) == 4


def test_pattern_mask_library():
    w = torch.randn(16, 8, 3, 3)
    m = make_mask(w.abs(), "pattern", keep=4, num_patterns=6)
    assert (m.flatten(2).sum(2) == 4).all()
    assert len({tuple(k.flatten().tolist()) for k in m.flatten(0, 1)}) <= 6
    assert kernel_patterns(9, 4).shape == (126, 9)


def test_maskset_reapplies_after_optimizer_step(mlp):
    res = prune(mlp, PruneConfig(method="fine", sparsity=0.6))
    model = res.model
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        res.after_step(model)
        for name, m in res.masks.masks.items():
            assert (model.get_submodule(name).weight[~m] == 0).all()
    plain = res.masks.remove()
    assert not any(mod._forward_pre_hooks for mod in plain.modules())
    assert sum(int((~m).sum()) for m in res.masks.masks.values()) == res.masks.zeros()


def test_global_scope_exact_count(vgg):
    res = prune(vgg, PruneConfig(method="fine", sparsity=0.8, scope="global"))
    total = sum(m.numel() for m in res.masks.masks.values())
    assert res.masks.zeros() == round(0.8 * total)


def test_maskset_shape_mismatch(mlp):
    with pytest.raises(ShapeError, match="mask for layer 'fc1'"):
        MaskSet(mlp, {"fc1": torch.ones(3, 3, dtype=torch.bool)})
