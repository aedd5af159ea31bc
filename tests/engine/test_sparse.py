"""Sparse execution (issue #22 item 6): kernel maps against a brute-force neighbour search, sparse conv
against dense conv3d at the active sites, grouped == per-offset, EIE against dense on the pruned weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.engine.sparse.conv import GROUPINGS, SparseConv3d, SparseVoxels, plan_groups, sparse_conv3d
from efficientml.engine.sparse.eie import SparseLinear, eie_matvec, quantize_activations, to_csc
from efficientml.engine.sparse.kernel_map import build_kernel_map, kernel_offsets
from efficientml.engine.sparse.voxel import dense_conv_reference, densify, synthetic_voxels


@pytest.fixture(scope="module")
def cloud():
    coords, feats = synthetic_voxels(grid=24, occupancy=0.05, batch=2, channels=5, seed=3)
    return coords, feats


def _brute_force_map(coords, out_coords, stride):
    """Per offset, the (input row, output row) pairs by a dictionary of sites."""
    where = {tuple(c): i for i, c in enumerate(coords.tolist())}
    pairs = []
    for d in kernel_offsets(3).tolist():
        found = []
        for o, (b, x, y, z) in enumerate(out_coords.tolist()):
            i = where.get((b, stride * x + d[0], stride * y + d[1], stride * z + d[2]))
            if i is not None:
                found.append((i, o))
        pairs.append(sorted(found))
    return pairs


@pytest.mark.parametrize("stride,submanifold,method", [(1, True, "sort"), (1, True, "table"), (2, False, "sort"),
                                                       (2, False, "table"), (1, False, "auto")])
def test_kernel_map_matches_brute_force(cloud, stride, submanifold, method):
    coords = cloud[0][:300]
    kmap = build_kernel_map(coords, 3, stride, submanifold, method=method)
    got = [sorted(zip(i.tolist(), o.tolist())) for i, o in zip(kmap.in_idx, kmap.out_idx)]
    assert got == _brute_force_map(coords, kmap.out_coords, stride)
    assert sum(kmap.sizes()) > coords.shape[0]          # neighbours were found, not only the centre


def test_regular_output_sites_are_exactly_the_dense_support(cloud):
    coords, feats = cloud
    feats = feats.abs() + 1.0                            # positive inputs and weights: no cancellation
    for stride in (1, 2):
        kmap = build_kernel_map(coords, 3, stride, submanifold=False)
        w = torch.ones(1, feats.shape[1], 3, 3, 3)
        support = F.conv3d(densify(coords, feats, (30,) * 3, offset=2), w, stride=stride, padding=1)[:, 0] > 0
        p = 2 // stride                                  # dense output index of site o is o + 2 / stride
        o = kmap.out_coords + torch.tensor([0, p, p, p])
        assert int(support.sum()) == o.shape[0]
        assert bool(support[o[:, 0], o[:, 1], o[:, 2], o[:, 3]].all())


@pytest.mark.parametrize("stride,submanifold", [(1, True), (1, False), (2, False)])
def test_sparse_conv_equals_dense_conv3d_at_active_sites(cloud, stride, submanifold):
    coords, feats = cloud
    torch.manual_seed(0)
    conv = SparseConv3d(5, 7, 3, stride, submanifold=submanifold, bias=True)
    with torch.no_grad():
        y = conv(SparseVoxels(coords, feats))
        ref = dense_conv_reference(coords, feats, conv.dense_weight(), y.coords, stride, conv.bias)
    if submanifold:
        assert torch.equal(y.coords, coords)
    torch.testing.assert_close(y.feats, ref, rtol=1e-5, atol=1e-5)


def test_grouped_equals_per_offset(cloud):
    coords, feats = cloud
    kmap = build_kernel_map(coords)
    w = torch.randn(27, 5, 6)
    ref = sparse_conv3d(feats, kmap, w, grouping="none")
    for g, eps in [("adaptive", 0.0), ("adaptive", 0.3), ("all", 0.1)]:
        torch.testing.assert_close(sparse_conv3d(feats, kmap, w, grouping=g, eps=eps), ref, rtol=1e-5, atol=1e-5)
    groups = plan_groups(kmap.sizes(), 0.0, (13,))
    assert sorted(sum(groups, [])) == [k for k in range(27) if k != 13 and kmap.sizes()[k]]
    assert all(len({kmap.sizes()[k] for k in g}) == 1 for g in groups)   # eps 0: equal sizes only


def test_submanifold_stack_reuses_the_map(cloud):
    coords, feats = cloud
    x = SparseVoxels(coords, feats)
    y = SparseConv3d(5, 5)(SparseConv3d(5, 5)(x))
    assert y.maps is x.maps and len(x.maps) == 1


def _relu_input(n, sparsity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(2, n, generator=gen))
    x[torch.rand(2, n, generator=gen) < sparsity] = 0.0
    return x


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_eie_fp32_equals_dense_on_pruned_weight(sparsity):
    torch.manual_seed(0)
    lin = nn.Linear(300, 130)
    layer = SparseLinear.from_dense(lin, sparsity, parts=3)
    w = layer.dense_weight()
    assert abs(float((w == 0).float().mean()) - sparsity) < 0.01
    nz = lin.weight.detach() * (w != 0)
    assert torch.equal(w, nz)                            # the stored weight is the magnitude-pruned one
    x = _relu_input(300, 0.7)
    y = layer(x)
    ref = F.linear(x, w, lin.bias.detach())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    x[:, :150] = 0.0                                     # zero activations contribute nothing
    torch.testing.assert_close(layer(x), F.linear(x[:, 150:], w[:, 150:], lin.bias.detach()), rtol=1e-5, atol=1e-5)


def test_eie_int8_accumulators_are_exact():
    torch.manual_seed(1)
    layer = SparseLinear.from_dense(nn.Linear(257, 70), 0.8, dtype="int8", parts=4)
    x = _relu_input(257, 0.6)
    acc = layer.int_accumulators(x)
    qx, xs = quantize_activations(x)
    assert torch.equal(acc.to(torch.int64), qx.to(torch.int64) @ layer.int_weight().to(torch.int64).t())
    y = layer(x)
    expect = acc.float() * (layer.csc.scale[None] * xs[:, None]) + layer.bias
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_project_errors(cloud):
    coords, feats = cloud
    with pytest.raises(ShapeError, match="integer"):
        build_kernel_map(coords.float())
    with pytest.raises(ShapeError, match=r"\(N, 4\)"):
        build_kernel_map(coords[:, :3])
    with pytest.raises(ShapeError, match="twice"):
        build_kernel_map(torch.cat([coords[:3], coords[:1]]))
    with pytest.raises(ShapeError, match="rows like coords"):
        SparseVoxels(coords, feats[:-1])
    with pytest.raises(ShapeError, match="input channels"):
        SparseConv3d(4, 8)(SparseVoxels(coords, feats))
    with pytest.raises(ConfigError, match="odd"):
        SparseConv3d(5, 8, kernel_size=2)
    with pytest.raises(ConfigError, match="submanifold"):
        SparseConv3d(5, 8, stride=2, submanifold=True)
    with pytest.raises(ConfigError, match="grouping"):
        sparse_conv3d(feats, build_kernel_map(coords), torch.randn(27, 5, 2), grouping="bogus")
    csc = to_csc(torch.randn(6, 10))
    with pytest.raises(ShapeError, match="in_features=10"):
        eie_matvec(csc, torch.randn(2, 9))
    with pytest.raises(ConfigError, match="sparsity"):
        SparseLinear.from_dense(nn.Linear(4, 4), 1.5)
    assert set(GROUPINGS) == {"adaptive", "none", "all"}
