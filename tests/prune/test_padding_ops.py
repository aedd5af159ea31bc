"""Channel pruning through padding ops (issue #16, part 2 item 1): ``nn.ZeroPad2d``, ``nn.ConstantPad2d``
and ``F.pad`` — TF "SAME" padding in ported networks — pass channels through, and a *function* can be
registered with ``register_channel_op`` (it used to accept module types only)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.channels import FUNCTION_OPS
from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.models.tf_style import tf_style_mobilenet
from efficientml.prune import DependencyGraph, Member, PruneConfig, prune, register_channel_op


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_tf_style_network_graph_has_no_skipped_ops_and_prunes_smaller():
    model = tf_style_mobilenet()
    x = torch.randn(2, 3, 32, 32)
    g = DependencyGraph.build(model, x)
    assert g.skipped == []
    # the padded depthwise conv shares its channels with the expand conv before it: one group per block
    grp = next(grp for grp in g.groups if "blocks.1.expand.0" in grp.producers)
    assert "blocks.1.dw" in grp.producers and len(grp) == grp.prunable == 16 * 4
    assert len(g.groups) == 10                      # stem+block 0 stream, 5 expansions, 2 streams, head, logits
    with torch.no_grad():
        ref = model(x)
        same = prune(model, PruneConfig(method="channel", sparsity=0.0), example_inputs=x).model.eval()
        assert torch.equal(same(x), ref)
        res = prune(model, PruneConfig(method="channel", sparsity=0.5), example_inputs=x)
        small = res.model.eval()
        out = small(x)
    assert out.shape == ref.shape
    assert small.blocks[1].dw.groups == small.blocks[1].dw.in_channels == 32          # 64 → 32
    assert small.blocks[1].expand[0].out_channels == 32
    assert _params(small) < 0.6 * _params(model)
    # pruning = zeroing the same channels in the full model (the padding moved no channel)
    masked = res.plan.zero_out(tf_style_mobilenet()).eval()
    torch.testing.assert_close(out, masked(x), atol=1e-5, rtol=1e-5)


class ChannelPad(nn.Module):
    def forward(self, x):
        return F.pad(x, (0, 0, 0, 0, 0, 2))                 # pads the channel dimension: 4 → 6


def test_padding_the_channel_dimension_is_refused_with_the_layer_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ChannelPad(), nn.Conv2d(6, 2, 1)).eval()
    with pytest.raises(UnsupportedError, match="pads the batch or channel dimension"):
        DependencyGraph.build(model, torch.randn(1, 3, 8, 8))


def channel_flip(x: torch.Tensor) -> torch.Tensor:
    """A user's own function that moves channels: output channel c is input channel C − 1 − c."""
    return torch.flip(x, dims=(1,))


torch.fx.wrap("channel_flip")


class FlipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(channel_flip(torch.relu(self.a(x))))


def _flip_trace(ctx, call, ids):
    assert call.fn is channel_flip and call.args[0].shape == ctx.in_shape   # tensors as TensorArg(shape)
    return ids[::-1]


def test_a_registered_function_moves_channel_ids_and_pruning_stays_exact():
    register_channel_op(channel_flip, _flip_trace)
    try:
        torch.manual_seed(0)
        model = FlipNet().eval()
        x = torch.randn(2, 3, 8, 8)
        g = DependencyGraph.build(model, x)
        grp = next(grp for grp in g.groups if grp.name == "a")
        for ch in grp.channels:                    # channel i of conv a is read by conv b at 7 − i
            out = next(m.index for m in ch if m.module == "a" and m.role == "out")
            assert Member("b", "in", 7 - out) in ch
        res = prune(model, PruneConfig(method="channel", sparsity=0.5), example_inputs=x)
        with torch.no_grad():
            masked = res.plan.zero_out(copy.deepcopy(model)).eval()
            torch.testing.assert_close(res.model.eval()(x), masked(x), atol=1e-5, rtol=1e-5)
        assert res.model.a.out_channels == 4 and res.model.b.in_channels == 4
    finally:
        FUNCTION_OPS.pop(channel_flip, None)
    with pytest.raises(UnsupportedError, match="channel_flip"):   # unregistered again: named
        DependencyGraph.build(model, x)


def test_register_channel_op_validates_functions():
    with pytest.raises(ConfigError, match="takes no shrink or attrs"):
        register_channel_op(channel_flip, _flip_trace, lambda m, a, b: m)
    with pytest.raises(ConfigError, match="nn.Module subclass or a function"):
        register_channel_op(int, _flip_trace)
    assert F.pad in FUNCTION_OPS                                  # built in, like the pad modules
