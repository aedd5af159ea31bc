"""Blocks of the classic efficient architectures, the DARTS cell space and the block-level network space:
shapes, hand-counted parameters and MACs against analysis.profile, genotype serialization."""

import random

import pytest
import torch

from efficientml.analysis.profile import profile
from efficientml.core.errors import ConfigError
from efficientml.models.shufflenetv2 import channel_shuffle
from efficientml.nas.blocks import BLOCKS, block_choices, build_block
from efficientml.nas.cells import (OPS, BlockArch, BlockSpace, Cell, CellNet, Genotype, sample_genotype)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("c_in,c_out,stride,size", [(16, 16, 1, 8), (16, 32, 1, 8), (16, 32, 2, 8),
                                                    (16, 16, 2, 8), (8, 16, 2, 7)])
def test_block_output_shapes(name, c_in, c_out, stride, size):
    block = build_block(name, c_in, c_out, stride).eval()
    out = block(torch.randn(2, c_in, size, size))
    side = -(-size // stride)  # ⌈size / stride⌉
    assert out.shape == (2, c_out, side, side)


def test_parameter_counts_equal_hand_counts():
    bn = 2  # BatchNorm2d: weight and bias per channel
    assert n_params(build_block("resnet_basic", 16, 16, 1)) == 2 * (9 * 16 * 16) + 2 * bn * 16  # 4672
    # stride 2 and 16 → 32: two 3×3 convs plus the 1×1 projection shortcut, each with its BN
    assert n_params(build_block("resnet_basic", 16, 32, 2)) == (9 * 16 * 32 + 9 * 32 * 32 + 16 * 32
                                                                 + 3 * bn * 32)
    # bottleneck 64 → 64, ratio 4: 1×1 64→16, 3×3 16→16, 1×1 16→64
    assert n_params(build_block("resnet_bottleneck", 64, 64, 1)) == (
        64 * 16 + 9 * 16 * 16 + 16 * 64 + bn * (16 + 16 + 64))  # 4544
    # resnext 64 → 64, 4 groups × ⌊64/4 · 16/64⌋ = 4 channels: mid 16, the 3×3 sees 16/4 inputs per output
    rx = build_block("resnext", 64, 64, 1, groups=4, base_width=16)
    assert n_params(rx) == 64 * 16 + 9 * (16 // 4) * 16 + 16 * 64 + bn * (16 + 16 + 64)  # 2816
    assert rx.conv2.groups == 4
    assert n_params(build_block("resnext", 64, 64, 1, cardinality=4, base_width=16)) == n_params(rx)
    # dw_separable 8 → 16: depthwise 3×3 (9 per channel) + pointwise 8·16
    assert n_params(build_block("dw_separable", 8, 16, 1)) == 8 * 9 + bn * 8 + 8 * 16 + bn * 16  # 248
    # mbconv 16 → 16, expand 6: 1×1 16→96, depthwise 3×3, linear 1×1 96→16
    assert n_params(build_block("mbconv", 16, 16, 1, expand=6, kernel=3)) == (
        16 * 96 + 96 * 9 + 96 * 16 + bn * (96 + 96 + 16))  # 4352
    # transformer width 16, MLP ratio 2: 2 LayerNorms, MHA (q, k, v, out with biases), MLP 16→32→16
    assert n_params(build_block("transformer", 16, 16, 1, heads=2, mlp_ratio=2)) == (
        2 * 2 * 16 + (4 * 16 * 16 + 4 * 16) + (16 * 32 + 32 + 32 * 16 + 16))  # 2224


def test_profile_macs_equal_hand_counts():
    assert profile(build_block("resnet_basic", 16, 16, 1), (1, 16, 8, 8)).macs == 2 * (8 * 8 * 16 * 9 * 16)
    # stride 2, 16 → 32 at 8×8: outputs are 4×4; conv1 9·16 per output, conv2 9·32, shortcut 16
    assert profile(build_block("resnet_basic", 16, 32, 2), (1, 16, 8, 8)).macs == 4 * 4 * 32 * (
        9 * 16 + 9 * 32 + 16)  # 229376
    assert profile(build_block("dw_separable", 8, 16, 1), (1, 8, 8, 8)).macs == 8 * 8 * (8 * 9 + 16 * 8)  # 12800
    assert profile(build_block("dw_separable", 8, 16, 2), (1, 8, 8, 8)).macs == 4 * 4 * (8 * 9 + 16 * 8)


@pytest.mark.parametrize("c_in,stride,batch", [(16, 1, 1), (8, 2, 2)])
def test_transformer_macs(c_in, stride, batch):
    """profile counts nn.MultiheadAttention as its four E×E projections (q, k, v, out) plus QKᵀ and AV
    (L·S·E each, the head count cancels); softmax, scaling and LayerNorm are elementwise, not MACs."""
    e, h, w = 16, 8 // stride, 8 // stride
    n_tok = h * w
    reduce = batch * n_tok * e * c_in if stride == 2 else 0          # strided 1×1 conv c_in → 16
    proj = batch * 4 * n_tok * e * e
    attn = batch * 2 * n_tok * n_tok * e
    mlp = batch * 2 * n_tok * e * (2 * e)                            # 16 → 32 → 16
    p = profile(build_block("transformer", c_in, e, stride, heads=4, mlp_ratio=2), (batch, c_in, 8, 8))
    assert p.macs == reduce + proj + attn + mlp
    mha = next(l for l in p.layers if l.kind == "multi_head_attention_forward")
    assert mha.macs == proj + attn and mha.elementwise_ops == batch * 4 * n_tok * n_tok  # the softmax


def test_channel_shuffle_is_a_permutation():
    x = torch.arange(6.0).view(1, 6, 1, 1).expand(2, 6, 3, 3)
    out = channel_shuffle(x, 2)
    assert out[0, :, 0, 0].tolist() == [0, 3, 1, 4, 2, 5]  # the two halves interleaved
    assert sorted(out[0, :, 1, 1].tolist()) == list(range(6))
    unit = build_block("shuffle", 8, 8, 1).eval()
    x = torch.randn(2, 8, 5, 5)
    y = unit(x)
    torch.testing.assert_close(y[:, 0::2], x[:, :4], rtol=0, atol=0)  # the identity half lands on evens
    torch.testing.assert_close(y[:, 1::2], unit.branch2(x[:, 4:]), rtol=0, atol=0)


def test_block_errors_and_choices():
    assert block_choices("mbconv") == ["expand", "kernel"] and block_choices("shuffle") == []
    with pytest.raises(ConfigError, match="no choice 'kernal'"):
        build_block("mbconv", 8, 8, 1, kernal=3)
    with pytest.raises(ConfigError, match="did you mean 'mbconv'"):
        build_block("mbconvv", 8, 8, 1)
    with pytest.raises(ConfigError, match="odd width"):
        build_block("shuffle", 8, 15, 2)
    with pytest.raises(ConfigError, match="heads"):
        build_block("transformer", 8, 12, 1, heads=5)


# --- cells -------------------------------------------------------------------------------------


def test_genotype_json_round_trip_and_validation():
    g = sample_genotype(random.Random(0), nodes=3)
    assert len(g.normal) == len(g.reduce) == 6 and g.normal_concat == (2, 3, 4)
    assert Genotype.from_json(g.to_json()) == g
    with pytest.raises(ConfigError, match="reads input 3"):
        Genotype((("skip_connect", 0), ("skip_connect", 3)), (2,), g.reduce, g.reduce_concat)
    with pytest.raises(ConfigError, match="unknown cell op"):
        Genotype((("conv_9x9", 0), ("skip_connect", 1)), (2,), g.reduce, g.reduce_concat)


@pytest.mark.parametrize("seed", [0, 1])
def test_cellnet_forward_shapes(seed):
    g = sample_genotype(random.Random(seed))
    net = CellNet(g, C=8, layers=5, num_classes=10, in_channels=1)
    sizes = []
    hooks = [c.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for c in net.cells]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for hk in hooks:
        hk.remove()
    # reductions at cells 5 // 3 = 1 and 2·5 // 3 = 3 double C and halve the side
    assert [c.reduction for c in net.cells] == [False, True, False, True, False]
    assert sizes == [(8, 28, 28), (16, 14, 14), (16, 14, 14), (32, 7, 7), (32, 7, 7)]


@pytest.mark.parametrize("side", [8, 7])
def test_reduction_cell_halves_the_side(side):
    g = sample_genotype(random.Random(2))
    s0, s1 = torch.randn(2, 12, side, side), torch.randn(2, 6, side, side)
    red = Cell(g, 12, 6, 8, reduction=True, reduction_prev=False).eval()
    half = -(-side // 2)
    assert red(s0, s1).shape == (2, 8, half, half)
    assert Cell(g, 12, 6, 8, reduction=False, reduction_prev=False).eval()(s0, s1).shape == (2, 8, side, side)
    # after a reduction, input 0 is at twice the resolution and is factorized-reduced to match
    after = Cell(g, 12, 6, 8, reduction=False, reduction_prev=True).eval()
    assert after(s0, torch.randn(2, 6, half, half)).shape == (2, 8, half, half)


def test_none_contributes_zeros():
    x = torch.randn(2, 4, 7, 7)
    assert torch.count_nonzero(OPS["none"](4, 1)(x)) == 0
    assert OPS["none"](4, 2)(x).shape == (2, 4, 4, 4)
    pairs = (("none", 0), ("skip_connect", 1))  # one node: zeros + input 1
    g = Genotype(pairs, (2,), pairs, (2,))
    cell = Cell(g, 4, 4, 4, reduction=False, reduction_prev=False).eval()
    s0, s1 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(cell(s0, s1), cell.project(cell.pre1(s1)), rtol=0, atol=0)
    torch.testing.assert_close(cell(s0 * 100, s1), cell(s0, s1), rtol=0, atol=0)  # input 0 is not read


# --- block space -------------------------------------------------------------------------------


def test_block_space_samples_build_and_run():
    space = BlockSpace()
    # per stage: 1 + 2 + 2·2 + 2 + 2·3 + 1 + 3·2 = 22 block settings × 2 depths, three stages
    assert space.size() == (22 * 2) ** 3
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(4)]
    for a in archs:
        space.check(a)
        assert BlockArch.from_json(a.to_json()) == a
        net = space.build(a).eval()
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert [len(getattr(net, f"stage{i + 1}")) for i in range(3)] == list(a.depths)
        assert len(space.encode(a)) == len(space.encode(archs[0]))
    assert len({tuple(space.encode(a)) for a in archs}) == len(set(archs))
    assert BlockSpace.from_json(space.to_json()) == space


def test_block_space_mutate_crossover_and_errors():
    space = BlockSpace(stages=((8, 2, 1), (16, 1, 2)), blocks=("mbconv", "resnet_basic"))
    assert space.size() == (6 * 2 + 1 * 2) * (6 + 1)
    rng = random.Random(1)
    a, b = space.sample(rng), space.sample(rng)
    assert space.mutate(a, rng, 0.0) == a
    for _ in range(20):
        space.check(space.mutate(a, rng, 1.0))
        c = space.crossover(a, b, rng)
        space.check(c)
        assert all(blk in (x, y) for blk, x, y in zip(c.blocks, a.blocks, b.blocks))
    with pytest.raises(ConfigError, match="not in the space"):
        space.check(BlockArch(("mbconv", "resnet_basic"), (3, 1), ((("expand", 6), ("kernel", 3)), ())))
    with pytest.raises(ConfigError, match="did you mean 'resnext'"):
        BlockSpace(blocks=("resnxt",))
    with pytest.raises(ConfigError, match="no choice 'width'"):
        BlockSpace(options=(("mbconv", "width", (1, 2)),))
