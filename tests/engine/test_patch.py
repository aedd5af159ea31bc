"""Patch-based inference: the regions against a brute-force receptive field (the gradient of an output
cell of a float conv chain), exact MAC overhead on a hand-made graph, a sound and smaller arena, and
the generated C bit-exact with the Python integer reference on a conv chain (uneven grid, stride 2,
dilation, padded max-pool inside the stage) and on MobileNetV2 (residual blocks inside the stage)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.engine import Graph, Op, View, compile_engine, lower
from efficientml.engine.errors import EngineUnsupportedError
from efficientml.engine.patch import (compile_patched, grid_cells, op_macs, patch_graph, plan_patches,
                                      stage_error, stage_regions)
from tests.engine.conftest import integer_model, needs_cc

# (c_in, c_out, kernel, stride, padding, dilation, groups) of a float chain; "res": x + conv3x3(x)
CHAIN = [(2, 3, 3, 1, 1, 1, 1), (3, 3, 3, 2, 1, 1, 3), "res", (3, 4, 5, 1, 4, 2, 1), (4, 4, 1, 1, 0, 1, 1),
         (4, 4, 3, 2, 0, 1, 1)]


def _conv_op(x: View, buf: int, spec: tuple[int, ...]) -> Op:
    c, oc, k, s, p, d, g = spec
    ho, wo = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in x.shape[2:])
    conv = dict(c=c, h=x.shape[2], w=x.shape[3], o=oc, kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, dh=d, dw=d, groups=g,
                ho=ho, wo=wo, zin=0, zout=0, lo=0, hi=255)
    kind = "pointwise" if k == 1 else "depthwise" if g > 1 else "conv2d"
    return Op(kind, f"conv{buf}", [x], View(buf, 0, (1, oc, ho, wo)), dict(conv=conv))


def _chain_graph(h: int, w: int) -> tuple[Graph, object]:
    """CHAIN as an engine graph (shapes only; ops 0, 1, 2 conv + 3 add, 4, 5, 6, then a mean) and as a
    float function returning every op's output, with all-ones weights (so no gradient cancels)."""
    x = View(0, 0, (1, 2, h, w))
    ops: list[Op] = []
    buffers = [x.numel]
    for spec in CHAIN:
        if spec == "res":
            c = x.shape[1]
            ops.append(_conv_op(x, len(buffers), (c, c, 3, 1, 1, 1, 1)))
            buffers.append(ops[-1].out.numel)
            ops.append(Op("add", "add", [x, ops[-1].out], View(len(buffers), 0, x.shape), {}))
        else:
            ops.append(_conv_op(x, len(buffers), spec))
        buffers.append(ops[-1].out.numel)
        x = ops[-1].out
    head = View(len(buffers), 0, (1, 4))
    ops.append(Op("mean", "head", [x], head, {}))
    buffers.append(4)

    def forward(t: torch.Tensor) -> list[torch.Tensor]:
        ys = []
        for spec in CHAIN:
            if spec == "res":
                c = t.shape[1]
                ys.append(F.conv2d(t, torch.ones(c, c, 3, 3), padding=1))
                t = t + ys[-1]
            else:
                c, oc, k, s, p, d, g = spec
                t = F.conv2d(t, torch.ones(oc, c // g, k, k), stride=s, padding=p, dilation=d, groups=g)
            ys.append(t)
        return ys

    return Graph(ops, buffers, View(0, 0, (1, 2, h, w)), head), forward


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = mask.nonzero(as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@pytest.mark.parametrize("split,grid", [(1, 2), (3, 3), (6, 2), (6, 3)])
def test_regions_match_the_gradient_receptive_field(split, grid):
    h, w = 37, 30
    g, forward = _chain_graph(h, w)
    assert stage_error(g, split) is None
    _, _, ho, wo = g.ops[split].out.shape
    for cell in grid_cells(ho, wo, grid):
        x = torch.rand(1, 2, h, w, requires_grad=True)
        y = forward(x)[split]
        y[..., cell[0]:cell[1], cell[2]:cell[3]].sum().backward()
        y0, y1, x0, x1 = stage_regions(g, split, cell)[0]
        clipped = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        assert _bbox(x.grad[0].abs().sum(0) > 0) == clipped, cell


def test_grid_cells_cover_unevenly():
    cells = grid_cells(7, 5, 3)
    assert [c[:2] for c in cells[::3]] == [(0, 2), (2, 4), (4, 7)]
    assert [c[2:] for c in cells[:3]] == [(0, 1), (1, 3), (3, 5)]
    assert sum((a1 - a0) * (b1 - b0) for a0, a1, b0, b1 in cells) == 35


def test_mac_overhead_is_exact_on_two_convs():
    # two 3x3 pad-1 convs on 8x8, grid 2: each 4x4 output cell needs a 6x6 tile of the first conv's output
    c = 4
    conv = dict(c=c, h=8, w=8, o=c, kh=3, kw=3, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, groups=1, ho=8, wo=8, zin=0)
    a, b, out = View(0, 0, (1, c, 8, 8)), View(1, 0, (1, c, 8, 8)), View(2, 0, (1, c, 8, 8))
    g = Graph([Op("conv2d", "a", [a], b, dict(conv=conv)), Op("conv2d", "b", [b], out, dict(conv=conv)),
               Op("clamp", "c", [out], View(3, 0, (1, c, 8, 8)), dict(lo=0, hi=255))],
              [c * 64] * 4, a, View(3, 0, (1, c, 8, 8)))
    pp = plan_patches(g, split=1, grid=2)
    per_pixel = c * c * 9
    assert pp.macs == 2 * 64 * per_pixel
    assert pp.patched_macs == (4 * 36 + 4 * 16) * per_pixel
    assert pp.mac_overhead == pytest.approx(80 / 128)
    assert sum(op_macs(op) for op in pp.graph.ops) == pp.patched_macs


def test_stage_errors_name_the_reason(mbv2):
    g, _ = _chain_graph(16, 16)
    assert "before the last op" in stage_error(g, len(g.ops) - 1)
    with pytest.raises(EngineUnsupportedError, match="empty cells"):
        patch_graph(g, 6, 4)                                    # op 6 outputs 3x3
    lowered = lower(mbv2, torch.zeros(1, 3, 64, 64))
    mean = next(i for i, op in enumerate(lowered.ops) if op.kind == "mean")
    assert "not a spatial op" in stage_error(lowered, mean)
    inside = next(i for i, op in enumerate(lowered.ops) if op.kind == "add") - 1   # the conv before a residual add
    assert "other than the split's output" in stage_error(lowered, inside)
    with pytest.raises(EngineUnsupportedError, match="other than the split"):
        plan_patches(lowered, split=inside, grid=2)


def _check_plan(pp) -> None:
    """Buffers live during a common op never overlap; the arena holds them all."""
    plan = pp.plan
    live = [(b, plan.lifetimes[b], off, plan.graph.buffers[b]) for b, off in enumerate(plan.offsets) if off >= 0]
    for i, (a, (fa, la), sa, na) in enumerate(live):
        assert sa + na <= plan.arena_bytes
        for b, (fb, lb), sb, nb in live[i + 1:]:
            if fa <= lb and fb <= la:
                assert sa + na <= sb or sb + nb <= sa, (a, b)


def _conv_chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.ReLU6(),
                         nn.Conv2d(8, 16, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(16, 16, 3, 1, 2, dilation=2),
                         nn.Flatten(), nn.Linear(16 * 5 * 5, 10)).eval()


@needs_cc
@pytest.mark.parametrize("split,grid", [(1, 3), (4, 3)])
def test_conv_chain_bitexact(split, grid):
    im = integer_model(_conv_chain(), (3, 19, 19))          # 19x19: no grid divides the stage outputs evenly
    x = torch.randn(3, 3, 19, 19, generator=torch.Generator().manual_seed(2))
    eng = compile_patched(im, x[:1], split=split, grid=grid)
    assert torch.equal(eng.run(x), im.integer_output(x))
    _check_plan(eng.patch)
    if split < 4:                      # past the max-pool, halos outgrow this tiny model's savings
        assert eng.patch.plan.arena_bytes < eng.patch.base.arena_bytes


@pytest.fixture(scope="module")
def mbv2():
    from efficientml.models import build_model

    torch.manual_seed(0)
    model = build_model("mobilenetv2", width=0.35, num_classes=10).eval()
    return integer_model(model, (3, 64, 64))


@needs_cc
def test_mobilenetv2_bitexact_with_residuals_in_the_stage(mbv2):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    eng = compile_patched(mbv2, x[:1], split=9, grid=3)         # op 9: a residual add, 16x16 in 3 uneven cells
    assert torch.equal(eng.run(x), mbv2.integer_output(x))
    pp, rep = eng.patch, eng.patch.to_dict()
    assert [op.kind for op in pp.base.graph.ops[:10]].count("add") == 1
    _check_plan(pp)
    assert rep["patch_arena_bytes"] * 2 < rep["per_layer_arena_bytes"]
    # one copy of each weight array, however many patches: as many int8 weight arrays as the per-layer C
    base = compile_engine(mbv2, x[:1]).generated.c_source
    count = lambda src: len(re.findall(r"static const int8_t L\d+_w\[", src))   # noqa: E731
    assert count(eng.generated.c_source) == count(base)
    assert len(eng.generated.c_source) < 1.2 * len(base)


def test_chooser_respects_the_overhead_bound(mbv2):
    g = lower(mbv2, torch.zeros(1, 3, 64, 64))
    loose, tight = plan_patches(g, max_overhead=0.3), plan_patches(g, max_overhead=0.05)
    assert loose.mac_overhead <= 0.3 and tight.mac_overhead <= 0.05
    assert loose.plan.arena_bytes * 3 < loose.base.arena_bytes
    assert loose.plan.arena_bytes <= tight.plan.arena_bytes <= tight.base.arena_bytes
    rep = loose.to_dict()
    assert rep["patch_peak_reduction"] == loose.base.arena_bytes / loose.plan.arena_bytes
    assert rep["rest_peak_bytes"] <= rep["patch_live_peak_bytes"] and rep["grid"] == loose.grid
    fast = plan_patches(g, target_reduction=3.0)             # the least overhead that reaches 3x
    assert fast.plan.arena_bytes * 3 <= fast.base.arena_bytes and fast.mac_overhead <= loose.mac_overhead
    with pytest.raises(EngineUnsupportedError, match="MAC overhead"):
        plan_patches(g, max_overhead=-1.0)
