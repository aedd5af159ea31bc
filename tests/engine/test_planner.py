"""The memory planner: placement never overlaps two buffers that are live together, the arena is at
least the live peak and well under the no-reuse sum, in-place depthwise and elementwise ops are merged
into their input's buffer, exact figures on hand-made graphs, and the plan against analysis' per-layer
peak."""

from __future__ import annotations

import pytest
import torch

from efficientml.engine import Graph, Op, View, compare_with_analysis, lower, plan_memory
from tests.engine.conftest import ZOO


def _plan(zoo_integer, name: str, inplace: bool = True):
    model, im, shape = zoo_integer(name)
    return model, shape, plan_memory(lower(im, torch.zeros(1, *shape)), inplace=inplace)


def _check_placement(plan) -> None:
    sizes = plan.graph.buffers
    placed = [b for b, off in enumerate(plan.offsets) if off >= 0]
    assert placed, "nothing was placed"
    for b in placed:
        assert plan.offsets[b] % 4 == 0 and plan.offsets[b] + sizes[b] <= plan.arena_bytes
    for i, a in enumerate(placed):
        (fa, la), (sa, ea) = plan.lifetimes[a], (plan.offsets[a], plan.offsets[a] + sizes[a])
        for b in placed[i + 1:]:
            (fb, lb), (sb, eb) = plan.lifetimes[b], (plan.offsets[b], plan.offsets[b] + sizes[b])
            if fa <= lb and fb <= la:                       # live during a common op ...
                assert ea <= sb or eb <= sa, f"buffers {a} and {b} are live together and overlap"
    for v in plan.graph.views():                            # every view lies inside its buffer
        assert 0 <= v.offset and v.offset + v.numel <= sizes[v.buf] and plan.offsets[v.buf] >= 0


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("inplace", [True, False])
def test_placement_is_sound_and_beats_no_reuse(zoo_integer, name, inplace):
    _, _, plan = _plan(zoo_integer, name, inplace)
    _check_placement(plan)
    assert plan.arena_bytes >= plan.live_peak_bytes == max(plan.op_live_bytes)
    assert plan.arena_bytes < 0.5 * plan.no_reuse_bytes     # measured: 0.23–0.42 on these models
    assert (len(plan.inplace_ops) > 0) == (inplace and name != "vgg")


def test_inplace_depthwise_and_elementwise_share_their_input(zoo_integer):
    _, _, plan = _plan(zoo_integer, "mobilenetv3_large")
    by_name = {op.name: op for op in plan.graph.ops}
    kinds = {by_name[n].kind for n in plan.inplace_ops}
    assert kinds >= {"depthwise", "lut", "mul", "add"}
    for n in plan.inplace_ops:
        op = by_name[n]
        assert any(v.buf == op.out.buf for v in op.ins), f"{op.kind} {n} does not write over an input"
        if op.kind == "depthwise":                          # one output plane of scratch, live for this op
            p, scratch = op.params["conv"], op.params["scratch"]
            assert plan.graph.buffers[scratch.buf] == p["ho"] * p["wo"] <= p["h"] * p["w"]
            i = plan.graph.ops.index(op)
            assert plan.lifetimes[scratch.buf] == (i, i)


def test_inplace_lowers_the_mobilenetv2_arena(zoo_integer):
    _, _, with_inplace = _plan(zoo_integer, "mobilenetv2")
    _, _, without = _plan(zoo_integer, "mobilenetv2", inplace=False)
    assert with_inplace.arena_bytes == 14336 and without.arena_bytes == 15360    # 32×32 input, width 0.35
    assert with_inplace.no_reuse_bytes < without.no_reuse_bytes


def _chain(sizes: list[int], kinds: list[str]) -> Graph:
    """in → op0 → buf1 → op1 → … (each op reads the previous buffer whole)."""
    views = [View(b, 0, (s,)) for b, s in enumerate(sizes)]
    ops = [Op(k, f"op{i}", [views[i]], views[i + 1]) for i, k in enumerate(kinds)]
    return Graph(ops, list(sizes), views[0], views[-1])


def test_greedy_placement_on_a_chain_has_known_offsets():
    plan = plan_memory(_chain([100, 200, 50, 300], ["conv2d", "conv2d", "conv2d"]))
    # by size: 300 (ops 2–3) at 0; 200 (ops 0–1) at 0, disjoint in time; 100 above the 200; 50 above the 300
    assert plan.offsets == [200, 0, 300, 0]
    assert plan.lifetimes == [(-1, 0), (0, 1), (1, 2), (2, 3)]
    assert plan.op_live_bytes == [300, 250, 350]
    assert (plan.live_peak_bytes, plan.arena_bytes, plan.no_reuse_bytes) == (350, 352, 650)   # 350 aligned to 4
    assert plan.inplace_ops == []


def test_inplace_clamp_merges_into_its_dying_input():
    g = _chain([64, 64, 64, 10], ["conv2d", "clamp", "linear"])
    plan = plan_memory(g)
    assert plan.inplace_ops == ["op1"] and plan.offsets[2] == -1 and plan.graph.buffers[2] == 0
    clamp = plan.graph.ops[1]
    assert clamp.out.buf == clamp.ins[0].buf == 1 and plan.graph.ops[2].ins[0].buf == 1
    assert plan.no_reuse_bytes == 138 and plan.op_live_bytes == [128, 64, 74]
    assert g.buffers == [64, 64, 64, 10] and g.ops[1].out.buf == 2    # the caller's graph is left unchanged
    no = plan_memory(g, inplace=False)
    assert no.no_reuse_bytes == 202 and no.op_live_bytes == [128, 128, 74]


def test_a_live_input_is_not_overwritten():
    """The clamp's input is read again later (a residual): writing over it would corrupt that read."""
    v = [View(b, 0, (64,)) for b in range(3)]
    ops = [Op("clamp", "relu", [v[0]], v[1]), Op("add", "res", [v[0], v[1]], v[2])]
    plan = plan_memory(Graph(ops, [64, 64, 64], v[0], v[2]))
    assert "relu" not in plan.inplace_ops and plan.inplace_ops == ["res"]


def test_plan_against_the_per_layer_analysis(zoo_integer):
    model, shape, plan = _plan(zoo_integer, "mobilenetv2")
    cmp = compare_with_analysis(plan, model, (1, *shape))
    assert cmp["arena_bytes"] == plan.arena_bytes
    assert cmp["per_layer_peak_bytes"] == 24576                  # analysis: the int8 peak of the float model
    assert cmp["arena_vs_per_layer"] == pytest.approx(14336 / 24576) and cmp["arena_vs_per_layer"] < 0.7
    d = plan.to_dict()
    assert d["arena_bytes"] == 14336 and d["op_live_bytes"][d["peak_op"]] == plan.live_peak_bytes
