import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.prune import CRITERIA, DependencyGraph, PruneConfig, bn_l1_penalty, prune
from efficientml.prune.refit import refit_layer

from .conftest import calib


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_gamma", "taylor", "apoz", "thinet", "input_l2", "first"])
def test_every_criterion_prunes_vgg(vgg, criterion):
    x = torch.randn(2, 1, 28, 28)
    res = prune(vgg, PruneConfig(method="channel", sparsity=0.5, criterion=criterion), example_inputs=x,
                calib=calib((1, 28, 28)))
    assert res.model.backbone.conv0.out_channels == vgg.backbone.conv0.out_channels // 2
    assert res.model(x).shape == (2, 10)


def test_l2_removes_the_smallest_filters(vgg):
    w = vgg.backbone.conv1.weight.detach()
    norms = w.flatten(1).pow(2).sum(1)
    res = prune(vgg, PruneConfig(method="channel", sparsity=0.5),
                example_inputs=torch.randn(1, 1, 28, 28), filter=("backbone.conv1",))
    kept = res.plan.layer_keep()["backbone.conv1"][1]
    assert sorted(kept) == sorted(norms.argsort(descending=True)[: len(kept)].tolist())


def test_data_criteria_need_data(vgg):
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune(vgg, PruneConfig(method="channel", criterion="taylor"), example_inputs=torch.randn(1, 1, 28, 28))


def test_channel_only_criterion_rejects_masks(vgg):
    with pytest.raises(ConfigError, match="ranks whole channels"):
        prune(vgg, PruneConfig(method="fine", criterion="bn_gamma"))


def test_taylor_fisher_element_scores(mlp):
    res = prune(mlp, PruneConfig(method="fine", sparsity=0.5, criterion="taylor"),
                calib=calib((20,), classes=5))
    assert res.masks.sparsity()["fc1"] == pytest.approx(0.5)


def test_thinet_refit_reduces_reconstruction_error(vgg):
    data = calib((1, 28, 28), n=3, bs=32)
    x = torch.randn(1, 1, 28, 28)
    res = prune(vgg, PruneConfig(method="channel", sparsity=0.5, criterion="thinet", refit=False),
                example_inputs=x, calib=data, filter=("backbone.conv2",))
    r = refit_layer(vgg, res.model, "backbone.conv3", None, data)
    assert r.error_after < 0.8 * r.error_before
    assert r.error_before > 0


def test_thinet_greedy_beats_random_on_reconstruction(vgg):
    data = calib((1, 28, 28), n=2, bs=32)
    graph = DependencyGraph.build(vgg, torch.randn(1, 1, 28, 28))
    crit = CRITERIA.get("thinet")
    state = crit.prepare(vgg, data, graph)
    group = [g for g in graph.groups if g.name == "backbone.bn2"][0]
    a = crit.contributions(vgg, group, state)
    scores = crit.channel_scores(vgg, group, state)
    half = len(group) // 2
    greedy = scores.argsort()[:half]
    err = lambda idx: a[:, idx].sum(1).pow(2).sum().item()
    g = torch.Generator().manual_seed(0)
    rand = [err(torch.randperm(len(group), generator=g)[:half]) for _ in range(10)]
    assert err(greedy) < min(rand)


def test_bn_l1_penalty_value(vgg):
    pen = bn_l1_penalty(1e-3)
    total = sum(m.weight.abs().sum() for m in vgg.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert pen(vgg, torch.zeros(1), torch.zeros(1)).item() == pytest.approx(1e-3 * total.item(), rel=1e-5)


def test_neuron_pruning_linear(mlp):
    res = prune(mlp, PruneConfig(method="channel", sparsity=0.25), example_inputs=torch.randn(2, 20))
    assert (res.model.fc1.out_features, res.model.fc2.in_features) == (24, 24)
    assert res.model.fc3.out_features == 5


def test_lab1_sort_preserves_function_and_orders(vgg):
    from efficientml.prune.sort import sort_channels
    import copy

    x = torch.randn(2, 1, 28, 28)
    m = copy.deepcopy(vgg)
    sort_channels(m, DependencyGraph.build(m, x))
    torch.testing.assert_close(m(x), vgg(x), atol=1e-5, rtol=1e-5)
    norms = m.backbone.conv2.weight.detach().pow(2).sum(dim=(0, 2, 3))
    assert (norms[:-1] >= norms[1:] - 1e-6).all()


def test_register_custom_criterion(vgg):
    from efficientml.prune.criteria import Criterion

    class Last(Criterion):
        name = "keep_last_test"
        channel_only = True

        def channel_scores(self, model, group, state):
            return torch.arange(len(group), dtype=torch.float32)

    if "keep_last_test" not in CRITERIA:
        CRITERIA.register("keep_last_test", Last())
    res = prune(vgg, PruneConfig(method="channel", sparsity=0.5, criterion="keep_last_test"),
                example_inputs=torch.randn(1, 1, 28, 28))
    n = vgg.backbone.conv0.out_channels
    assert res.plan.layer_keep()["backbone.conv0"][1] == list(range(n // 2, n))
