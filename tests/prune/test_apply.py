"""efficientml.apply for PruneConfig: the same masks and smaller models as prune() (its older
spelling) and compute_masks, the layer filter in place of layers/exclude, copy vs in place."""

import copy

import pytest
import torch

from efficientml import apply
from efficientml.core.transform import LayerFilter, TransformResult
from efficientml.prune import PruneConfig, PruneResult, compute_masks, prune

from .conftest import calib

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cfg", [PruneConfig(method="fine", sparsity=0.6), PruneConfig(method="nm", n=2, m=4),
                                 PruneConfig(method="fine", sparsity=0.3, scope="global")])
def test_mask_pruning_equals_prune_and_compute_masks(vgg, cfg):
    new = apply(vgg, cfg)
    old = prune(vgg, cfg)
    direct, _ = compute_masks(copy.deepcopy(vgg), cfg)
    assert isinstance(new, PruneResult) and isinstance(new, TransformResult) and new.path == "simulated"
    assert new.masks.masks.keys() == old.masks.masks.keys() == direct.keys()
    assert all(torch.equal(new.masks.masks[n], direct[n]) for n in direct)
    assert _state_equal(new.model, old.model)
    assert new.layers == new.masks.sparsity() and new.to_dict()["config"]["__kind__"] == "prune"


@pytest.mark.parametrize("criterion", ["l2", "thinet"])
def test_channel_pruning_equals_prune(vgg, criterion):
    cfg = PruneConfig(method="channel", sparsity=0.5, criterion=criterion)
    data = calib((1, 28, 28), n=2, bs=16)
    new = apply(vgg, cfg, calib=data, example_inputs=X)
    old = prune(vgg, cfg, example_inputs=X, calib=data)
    inplace = prune(copy.deepcopy(vgg), cfg, example_inputs=X, calib=data, inplace=True)
    assert new.path == "real" and new.model.backbone.conv0.out_channels == vgg.backbone.conv0.out_channels // 2
    with torch.no_grad():
        assert torch.equal(new.model(X), old.model(X)) and torch.equal(new.model(X), inplace.model(X))
    assert new.layers == new.summary()["channels"] and len(new.layers) == len(new.plan.graph.groups)


def test_filter_replaces_layers_and_exclude(vgg):
    res = apply(vgg, PruneConfig(sparsity=0.5), filter=LayerFilter(exclude=("classifier", "backbone.conv0")))
    assert "classifier" not in res.layers and "backbone.conv0" not in res.layers and len(res.layers) == 7
    res = apply(vgg, PruneConfig(sparsity=0.5), filter="backbone.conv[12]")
    assert list(res.layers) == ["backbone.conv1", "backbone.conv2"]
    assert res.layers["backbone.conv1"] == pytest.approx(0.5)
    ch = apply(vgg, PruneConfig(method="channel", sparsity=0.5), example_inputs=X,
               filter=LayerFilter(exclude=("backbone.conv1",)))
    assert ch.model.backbone.conv1.out_channels == vgg.backbone.conv1.out_channels            # excluded group kept
    assert ch.model.backbone.conv2.out_channels == vgg.backbone.conv2.out_channels // 2


def test_copy_by_default_in_place_on_request(vgg):
    orig = copy.deepcopy(vgg)
    res = apply(vgg, PruneConfig(method="channel", sparsity=0.5), example_inputs=X)
    assert res.model is not vgg and _state_equal(vgg, orig)
    res = apply(vgg, PruneConfig(method="channel", sparsity=0.5), example_inputs=X, inplace=True)
    assert res.model is vgg and vgg.backbone.conv0.out_channels == orig.backbone.conv0.out_channels // 2
