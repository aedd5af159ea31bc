import copy
import io

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import UnsupportedError
from efficientml.prune import DependencyGraph, PruneConfig, prune
from efficientml.prune.surgery import ChannelPlan

from .conftest import randomize_bn


def _half_plan(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for grp in graph.groups:
        removed = set()
        for p in set(grp.partition):
            free = [i for i in range(len(grp)) if grp.partition[i] == p and not grp.frozen[i]]
            perm = torch.randperm(len(free), generator=g).tolist()
            removed |= {free[j] for j in perm[: len(free) // 2]}
        kept[grp.id] = [i for i in range(len(grp)) if i not in removed]
    return ChannelPlan(graph, kept)


@pytest.mark.parametrize("name", ["vgg", "resnet20", "mlp"])
def test_surgery_equals_masked_model(name, request):
    model = request.getfixturevalue(name)
    x = torch.randn(3, 20) if name == "mlp" else torch.randn(3, 1, 28, 28)
    graph = DependencyGraph.build(model, x)
    plan = _half_plan(graph)
    masked = plan.zero_out(copy.deepcopy(model))
    pruned = plan.apply(copy.deepcopy(model))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)


def test_vgg_groups(vgg):
    graph = DependencyGraph.build(vgg, torch.randn(2, 1, 28, 28))
    prunable = [g for g in graph.groups if g.prunable]
    assert len(prunable) == 8                                   # one per conv
    g0 = prunable[0]
    assert g0.producers == ["backbone.bn0", "backbone.conv0"] and g0.consumers == ["backbone.conv1"]
    assert [g for g in graph.groups if g.name == "classifier"][0].prunable == 0  # logits fixed


def test_resnet_option_a_stream_is_one_group(resnet20):
    graph = DependencyGraph.build(resnet20, torch.randn(2, 1, 28, 28))
    stream = [g for g in graph.groups if "conv1" in g.producers][0]
    # width 0.5: stage widths 8/16/32 → the final stream has 32 channels: 8 from stage 1,
    # 4 pad pairs from stage 2 and 8 pad pairs from stage 3 → 8 + 4 + 8 channel ids
    assert len(stream) == 20 and len(set(stream.partition)) == 3
    assert "layer3.2.conv2" in stream.producers and "conv1" in stream.producers
    res = prune(resnet20, PruneConfig(method="channel", sparsity=0.5), example_inputs=torch.randn(2, 1, 28, 28))
    sc = res.model.layer2[0].shortcut
    assert (sc.out_channels - sc.in_channels) % 2 == 0            # padding stays symmetric
    assert res.model.layer3[2].conv2.out_channels == 16
    assert res.model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mobilenetv2_depthwise_groups():
    from efficientml.models import build_model

    torch.manual_seed(0)
    m = randomize_bn(build_model("mobilenetv2", width=0.35, num_classes=10, cifar_stem=True))
    x = torch.randn(2, 3, 32, 32)
    graph = DependencyGraph.build(m, x)
    plan = _half_plan(graph)
    masked, pruned = plan.zero_out(copy.deepcopy(m)), plan.apply(copy.deepcopy(m))
    torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)
    dw = pruned.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == m.features[2].conv[1][0].out_channels // 2
    # the block's residual stream: every member of a group keeps the same count
    assert pruned.features[2].conv[2].out_channels == pruned.features[3].conv[2].out_channels


def test_flatten_linear_and_concat():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
            self.c = nn.Conv2d(14, 10, 3, stride=2, padding=1)
            self.fc = nn.Linear(10 * 4 * 4, 5)

        def forward(self, x):
            y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
            return self.fc(torch.flatten(torch.relu(self.c(y)), 1))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    res = prune(net, PruneConfig(method="channel", sparsity=0.5), example_inputs=x)
    assert res.model.c.in_channels == 4 + 3 and res.model.fc.in_features == 5 * 16
    graph = DependencyGraph.build(net, x)
    plan = _half_plan(graph)
    # zeroing conv outputs leaves ReLU(bias) ≠ 0 unless biases are zeroed too: zero_out does both
    torch.testing.assert_close(plan.apply(copy.deepcopy(net))(x), plan.zero_out(copy.deepcopy(net))(x))


class Rolling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(torch.roll(self.conv1(x), 1, dims=1))


def test_unknown_op_names_op_and_layer():
    with pytest.raises(UnsupportedError, match=r"does not understand op 'torch.roll' \(node 'roll'\) in layer 'Rolling.forward'"):
        prune(Rolling(), PruneConfig(method="channel", sparsity=0.5), example_inputs=torch.randn(1, 3, 8, 8))


def test_unknown_op_skip_leaves_group_unpruned():
    res = prune(Rolling(), PruneConfig(method="channel", sparsity=0.5, on_unsupported="skip"),
                example_inputs=torch.randn(1, 3, 8, 8))
    assert res.model.conv1.out_channels == 8 and res.skipped and "roll" in res.skipped[0]
    assert res.model.conv2.out_channels == 4   # the logits stay


def test_pruned_model_is_plain_and_roundtrips(resnet20, tmp_path):
    from efficientml.models import build_model
    from efficientml.prune import channel_attrs, resize_like

    x = torch.randn(2, 1, 28, 28)
    pruned = prune(resnet20, PruneConfig(method="channel", sparsity=0.4), example_inputs=x).model.eval()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pruned.modules())
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    torch.testing.assert_close(again(x), pruned(x))
    fresh = resize_like(build_model("resnet20", in_channels=1, width=0.5), pruned.state_dict(),
                        channel_attrs(pruned))
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(fresh.eval()(x), pruned(x))
