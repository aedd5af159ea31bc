"""The memory planner: every activation of the lowered graph gets an offset in one static arena.

1. **Lifetimes.** Buffer b is live from the op that writes it (the input buffer: before op 0) to the
   last op that reads any view of it (the output buffer: to the end). Aliases (views, flatten, chunk)
   share their source buffer, so they cost nothing and keep it alive.
2. **In place.** An op may write over an input that dies at that op: elementwise ops (ReLU clamp,
   table activations, add, squeeze-excite mul) element for element, and depthwise convs channel by
   channel (MCUNet/TinyEngine: channel k goes to a one-plane scratch, then over input channel k; legal
   when the output plane is no larger than the input's). The output buffer is then merged into the
   input's, which lives on.
3. **Placement** (TFLite Micro's greedy planner): buffers sorted by size, largest first, each put at
   the lowest ``align``-ed offset where it overlaps no already placed buffer whose lifetime it shares.

The arena is at least ``live_peak_bytes`` (the most bytes live during one op); greedy placement can
leave gaps above that. ``no_reuse_bytes`` is every buffer summed (no planning at all).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from efficientml.engine.lower import Graph, View

# op kind -> inputs it may overwrite
INPLACE: dict[str, tuple[int, ...]] = {"clamp": (0,), "lut": (0,), "add": (0, 1), "mul": (0,), "depthwise": (0,)}


@dataclass
class MemoryPlan:
    """Offsets and lifetimes of a graph's buffers (``graph``: the plan's rewritten copy)."""

    graph: Graph
    offsets: list[int]               # per buffer; merged-away buffers: -1
    lifetimes: list[tuple[int, int]]  # (first op, last op) per buffer; −1: before op 0
    arena_bytes: int
    live_peak_bytes: int
    no_reuse_bytes: int
    op_live_bytes: list[int]         # bytes live during each op (its inputs, outputs and everything held)
    inplace_ops: list[str] = field(default_factory=list)

    def address(self, v: View) -> int:
        """The arena byte offset of view ``v``."""
        return self.offsets[v.buf] + v.offset

    def to_dict(self) -> dict[str, Any]:
        peak_op = max(range(len(self.op_live_bytes)), key=self.op_live_bytes.__getitem__, default=0)
        return {"arena_bytes": self.arena_bytes, "live_peak_bytes": self.live_peak_bytes,
                "no_reuse_bytes": self.no_reuse_bytes, "buffers": sum(o >= 0 for o in self.offsets),
                "inplace_ops": list(self.inplace_ops),
                "peak_op": self.graph.ops[peak_op].name if self.graph.ops else "",
                "op_live_bytes": {op.name: b for op, b in zip(self.graph.ops, self.op_live_bytes)}}


def _lifetimes(g: Graph) -> tuple[dict[int, int], dict[int, int]]:
    first = {g.input.buf: -1}
    last = {g.input.buf: -1}
    for i, op in enumerate(g.ops):
        for v in op.ins:
            last[v.buf] = max(last.get(v.buf, i), i)
        first.setdefault(op.out.buf, i)
        last[op.out.buf] = max(last.get(op.out.buf, i), i)
    last[g.output.buf] = len(g.ops)
    return first, last


def _can_overwrite(g: Graph, op_i: int, j: int, last: dict[int, int]) -> bool:
    op = g.ops[op_i]
    x, out = op.ins[j], op.out
    if last.get(x.buf) != op_i or x.buf == out.buf or out.offset != 0 or g.buffers[out.buf] != out.numel:
        return False
    if any(v.buf == x.buf and v.offset != x.offset for k, v in enumerate(op.ins) if k != j):
        return False                     # another input shifted inside the same buffer would be clobbered
    if op.kind == "depthwise":
        p = op.params["conv"]
        return p["ho"] * p["wo"] <= p["h"] * p["w"]
    return x.numel == out.numel


def _merge_inplace(g: Graph, first: dict[int, int], last: dict[int, int]) -> list[str]:
    """Rewrite each op that can run in place to write into its dying input's buffer."""
    names = []
    views = g.views()
    for i, op in enumerate(g.ops):
        for j in INPLACE.get(op.kind, ()):
            if not _can_overwrite(g, i, j, last):
                continue
            x, dead = op.ins[j], op.out.buf
            for v in views:
                if v.buf == dead:
                    v.buf, v.offset = x.buf, v.offset + x.offset
            last[x.buf] = last.pop(dead)
            first.pop(dead)
            g.buffers[dead] = 0
            if op.kind == "depthwise":       # one output plane, live during this op only
                p = op.params["conv"]
                g.buffers.append(p["ho"] * p["wo"])
                sb = len(g.buffers) - 1
                op.params["scratch"] = View(sb, 0, (p["ho"] * p["wo"],))
                first[sb] = last[sb] = i
            names.append(op.name)
            break
    return names


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _place(sizes: dict[int, int], first: dict[int, int], last: dict[int, int], align: int) -> dict[int, int]:
    """Greedy by size: each buffer at the lowest free offset among the placed buffers it meets in time."""
    order = sorted(sizes, key=lambda b: (-sizes[b], first[b], b))
    offsets: dict[int, int] = {}
    for b in order:
        busy = sorted((offsets[p], offsets[p] + sizes[p]) for p in offsets
                      if first[p] <= last[b] and first[b] <= last[p])
        off = 0
        for start, end in busy:
            if off + sizes[b] <= start:
                break
            off = max(off, _align(end, align))
        offsets[b] = off
    return offsets


def plan_memory(graph: Graph, inplace: bool = True, align: int = 4) -> MemoryPlan:
    """Plan ``graph`` (left unchanged; the plan holds a rewritten copy): in-place merges when
    ``inplace``, then greedy placement with ``align``-byte offsets."""
    g = copy.deepcopy(graph)
    first, last = _lifetimes(g)
    names = _merge_inplace(g, first, last) if inplace else []
    sizes = {b: g.buffers[b] for b in first if g.buffers[b] > 0}
    placed = _place(sizes, first, last, align)
    n = len(g.ops)
    op_live = [sum(s for b, s in sizes.items() if first[b] <= i <= last[b]) for i in range(n)]
    arena = max((placed[b] + sizes[b] for b in sizes), default=0)
    offsets = [placed.get(b, -1) for b in range(len(g.buffers))]
    lifetimes = [(first.get(b, -1), last.get(b, -1)) for b in range(len(g.buffers))]
    return MemoryPlan(g, offsets, lifetimes, _align(arena, align), max(op_live, default=0),
                      sum(sizes.values()), op_live, names)


def compare_with_analysis(plan: MemoryPlan, model: Any, input_shape: tuple[int, ...]) -> dict[str, float]:
    """The plan against :mod:`efficientml.analysis.memory`'s per-layer schedule of the float ``model``
    (every activation int8, batch 1): bytes, and the arena's ratio to that peak."""
    from efficientml.analysis.memory import activation_memory

    shape = (1, *tuple(input_shape)[1:])
    naive = activation_memory(model, shape).peak_bytes(8)
    return {"arena_bytes": plan.arena_bytes, "per_layer_peak_bytes": naive,
            "arena_vs_per_layer": plan.arena_bytes / naive if naive else float("nan")}
