"""Patch-based inference (MCUNetV2, Lin et al. 2021): the first ``split + 1`` ops of the lowered graph
run once per cell of a ``grid × grid`` partition of op ``split``'s output, the rest per layer as before.

A :class:`~efficientml.engine.lower.Graph` → ``Graph`` transform, so the planner and the C generator
handle the result like any graph; per-patch buffers are small, so the arena's peak drops.

- **Regions.** For a cell of op ``split``'s output, every tensor of the stage gets the region it must
  be computed on, walking the ops backwards: a conv/pool output rect ``[y0, y1)`` needs input rows
  ``[y0·s − p, (y1 − 1)·s − p + d·(k − 1) + 1)``; elementwise ops (clamp, lut, add, same-shape mul)
  need the same rect. A tensor read by several ops (a residual block's input: its expand conv and its
  add) gets the bounding box of what they need; a reader that needs less gets a cropped copy. Regions
  are in the tensor's image coordinates and may leave the image (the halo of a padded conv at a
  border). Any DAG of these ops is handled, so MobileNetV2's residual blocks can sit inside the stage.
- **Exactness.** A region's tile is a (1, C, h, w) buffer. A conv or pool runs on it as a VALID one
  (padding 0): positions of its input tile outside the image hold the padding code — the conv's input
  zero point (the real zero a zero-padded conv sees), 0 for max-pool (codes are ≥ 0, PyTorch pads with
  −inf) — written when the stage input is copied in (``patch_copy`` with fill) or reset in place
  (``patch_fill``) on a tile computed by an earlier op; elsewhere the positions outside the image are
  junk no output inside the image reads. Op ``split``'s tile is the cell, copied into the full stage
  output buffer (``patch_copy``). The result is bit-exact with the per-layer graph.
- **Flash.** Per-patch convs share their parameter tensors, and
  :func:`~efficientml.engine.patch_emit.share_constants` folds the C generator's per-patch copies of
  their ``const`` arrays into the first patch's, so Flash does not grow with the number of patches.
  The two new op kinds' C and emitters live in :mod:`.patch_emit`, registered with the generator.
- **Cost.** Recompute overhead = (MACs of the patched graph − MACs of the original) / MACs of the
  original, exactly, from the regions (halos and positions outside the image included).

Restriction: the stage is ops 0..split, every one a conv/depthwise/pointwise/maxpool or a same-shape
elementwise op on whole 4-D buffers, reading only the graph input or the stage's own results, and no
stage tensor but op ``split``'s output is read after it (:func:`stage_error` says why a split fails).
The full input (in the arena) stays live through the stage and the full stage output from its first
patch on, so they bound the patched peak from below (3×224×224 + 32×28×28 bytes on MobileNetV2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from efficientml.engine import codegen
from efficientml.engine.patch_emit import share_constants
from efficientml.engine.errors import EngineUnsupportedError
from efficientml.engine.host import EngineModel, GeneratedModel, _build, host_compiler
from efficientml.engine.lower import Graph, Op, View, lower
from efficientml.engine.planner import MemoryPlan, plan_memory
from efficientml.quant.integer import IntegerModel

Rect = tuple[int, int, int, int]        # rows [y0, y1) × cols [x0, x1), image coordinates (may leave the image)
_WINDOWED = {"conv2d": "conv", "depthwise": "conv", "pointwise": "conv", "maxpool": "pool"}
_ELEMENTWISE = ("clamp", "lut", "add", "mul")
GRIDS = (2, 3, 4, 5, 6, 7, 8)


# -- region math ------------------------------------------------------------------------------
def input_rect(op: Op, r: Rect) -> Rect:
    """The rect of ``op``'s input(s) that its output rect ``r`` reads (halo included)."""
    if op.kind not in _WINDOWED:
        return r
    p = op.params[_WINDOWED[op.kind]]
    y0, y1, x0, x1 = r
    return (y0 * p["sh"] - p["ph"], (y1 - 1) * p["sh"] - p["ph"] + p["dh"] * (p["kh"] - 1) + 1,
            x0 * p["sw"] - p["pw"], (x1 - 1) * p["sw"] - p["pw"] + p["dw"] * (p["kw"] - 1) + 1)


def _union(a: Rect, b: Rect) -> Rect:
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def stage_regions(graph: Graph, split: int, cell: Rect) -> dict[int, Rect]:
    """Buffer → the rect it must be computed on so that op ``split`` can produce its output ``cell``."""
    need = {graph.ops[split].out.buf: cell}
    for op in reversed(graph.ops[:split + 1]):
        r = input_rect(op, need[op.out.buf])
        for v in op.ins:
            need[v.buf] = _union(need[v.buf], r) if v.buf in need else r
    return need


def grid_cells(h: int, w: int, grid: int) -> list[Rect]:
    """The ``grid × grid`` cells of an h × w image, row-major; sizes differ by at most one."""
    ys = [i * h // grid for i in range(grid + 1)]
    xs = [j * w // grid for j in range(grid + 1)]
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(grid) for j in range(grid)]


def _pad_code(op: Op) -> int | None:
    """The code positions outside the image must hold for ``op`` (None: it has no padding)."""
    if op.kind not in _WINDOWED:
        return None
    p = op.params[_WINDOWED[op.kind]]
    if (p["ph"], p["pw"]) == (0, 0):
        return None
    return 0 if op.kind == "maxpool" else int(p["zin"])


def op_macs(op: Op, hw: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of a conv or linear op (0 for the rest); ``hw``: another output size."""
    if op.kind == "linear":
        return op.params["rows"] * op.params["f"] * op.params["o"]
    if op.kind not in ("conv2d", "depthwise", "pointwise"):
        return 0
    p = op.params["conv"]
    ho, wo = hw or (p["ho"], p["wo"])
    return p["o"] * ho * wo * (p["c"] // p["groups"]) * p["kh"] * p["kw"]


def patched_macs(graph: Graph, split: int, grid: int) -> int:
    """MACs of ``graph`` with ops 0..split run on a ``grid × grid`` partition, from the regions alone."""
    _, _, h, w = graph.ops[split].out.shape
    total = sum(op_macs(op) for op in graph.ops[split + 1:])
    for cell in grid_cells(h, w, grid):
        need = stage_regions(graph, split, cell)
        for op in graph.ops[:split + 1]:
            r = need[op.out.buf]
            total += op_macs(op, (r[1] - r[0], r[3] - r[2]))
    return total


def stage_error(graph: Graph, split: int) -> str | None:
    """Why ops 0..split cannot run patch by patch (one sentence), or None when they can."""
    if not 0 <= split < len(graph.ops) - 1:
        return f"split {split} is not an op index before the last op (0..{len(graph.ops) - 2})"
    produced = {graph.input.buf}
    for op in graph.ops[:split + 1]:
        if op.kind not in _WINDOWED and op.kind not in _ELEMENTWISE:
            return f"op {op.name!r} ({op.kind}) is not a spatial op the patch stage runs"
        views = [*op.ins, op.out]
        if not all(len(v.shape) == 4 and v.shape[0] == 1 and v.offset == 0 and v.numel == graph.buffers[v.buf]
                   for v in views):
            return f"op {op.name!r} reads or writes part of a buffer (or not an NCHW tensor)"
        if any(v.buf not in produced for v in op.ins):
            return f"op {op.name!r} reads a tensor made outside the stage"
        if op.kind not in _WINDOWED and any(v.shape != op.out.shape for v in op.ins):
            return f"op {op.name!r} broadcasts"
        produced.add(op.out.buf)
    keep = {graph.ops[split].out.buf, graph.input.buf}
    for op in graph.ops[split + 1:]:
        if any(v.buf in produced and v.buf not in keep for v in op.ins):
            return f"op {op.name!r} after the split reads a stage tensor other than the split's output"
    if graph.output.buf in produced - keep:
        return "the graph output is made inside the stage"
    return None


# -- the transform ----------------------------------------------------------------------------
class _Patcher:
    """Builds the patched op list; ``tiles`` maps an original buffer to (its tile view, its rect)."""

    def __init__(self, graph: Graph, split: int):
        self.g, self.split = graph, split
        self.ops: list[Op] = []
        self.buffers = list(graph.buffers)
        self.filled: dict[int, int] = {}           # tile buffer -> code its positions outside the image hold

    def tile(self, c: int, r: Rect) -> View:
        self.buffers.append(c * (r[1] - r[0]) * (r[3] - r[2]))
        return View(len(self.buffers) - 1, 0, (1, c, r[1] - r[0], r[3] - r[2]))

    def copy(self, name: str, src: View, sr: Rect, dst: View, dr: Rect, hw: tuple[int, int], fill: int) -> None:
        """``dst`` (rect dr) ← ``src`` (rect sr) where both are inside the image; ``fill`` elsewhere (−1: kept)."""
        self.ops.append(Op("patch_copy", name, [src], dst, dict(
            c=src.shape[1], src=(src.shape[2], src.shape[3], sr[0], sr[2]),
            dst=(dst.shape[2], dst.shape[3], dr[0], dr[2]), image=hw, fill=fill)))

    def operand(self, op: Op, v: View, tiles: dict[int, tuple[View, Rect]], want: Rect, tag: str) -> View:
        """A tile of ``v`` on exactly ``want``, holding ``op``'s padding code outside the image."""
        t, r = tiles[v.buf]
        hw = (v.shape[2], v.shape[3])
        code = _pad_code(op)
        outside = want[0] < 0 or want[2] < 0 or want[1] > hw[0] or want[3] > hw[1]
        if r != want:                                 # a reader that needs less than the tile: a cropped copy
            crop = self.tile(v.shape[1], want)
            self.copy(f"{op.name}@{tag}:in", t, r, crop, want, hw, 0 if code is None else code)
            self.filled[crop.buf] = 0 if code is None else code
            return crop
        if code is not None and outside and self.filled.get(t.buf) != code:
            self.ops.append(Op("patch_fill", f"{op.name}@{tag}:pad", [t], t,
                               dict(c=v.shape[1], tile=(r[1] - r[0], r[3] - r[2], r[0], r[2]), image=hw, fill=code)))
            self.filled[t.buf] = code
        return t

    def patch(self, tag: str, cell: Rect) -> None:
        g = self.g
        need = stage_regions(g, self.split, cell)
        hw = tuple(g.input.shape[2:])
        tiles: dict[int, tuple[View, Rect]] = {g.input.buf: (g.input, (0, hw[0], 0, hw[1]))}
        for j, op in enumerate(g.ops[:self.split + 1]):
            r_out = need[op.out.buf]
            want = input_rect(op, r_out)
            ins = [self.operand(op, v, tiles, want, tag) for v in op.ins]
            out = self.tile(op.out.shape[1], r_out)
            self.ops.append(Op(op.kind, f"{op.name}@{tag}", ins, out, _tile_params(op, j, ins[0], out)))
            tiles[op.out.buf] = (out, r_out)
        full = g.ops[self.split].out
        t, r = tiles[full.buf]
        self.copy(f"{full.buf}@{tag}:place", t, r, View(full.buf, 0, full.shape),
                  (0, full.shape[2], 0, full.shape[3]), tuple(full.shape[2:]), -1)


def _tile_params(op: Op, index: int, x: View, out: View) -> dict[str, Any]:
    """``op``'s params on tiles: a VALID conv/pool of tile dims; a mul's shape of the tile. Weight tensors
    are the original objects (shared by every patch); ``patch_of`` is the op's index in the original graph."""
    p = dict(op.params)
    if op.kind in _WINDOWED:
        key = _WINDOWED[op.kind]
        p[key] = {**p[key], "h": x.shape[2], "w": x.shape[3], "ph": 0, "pw": 0,
                  "ho": out.shape[2], "wo": out.shape[3]}
    elif op.kind == "mul":                             # same-shape product (stage_error refuses broadcasting)
        n, c, h, w = out.shape
        p["shape4"], p["bstride"] = out.shape, (c * h * w, h * w, w, 1)
    p["patch_of"] = index
    return p


def patch_graph(graph: Graph, split: int, grid: int) -> Graph:
    """``graph`` with ops 0..split run per cell of a ``grid × grid`` partition of op ``split``'s output.

    The ops after the split (and every weight tensor) are shared with ``graph``, not copied; the
    planner copies before it rewrites. Raises :class:`EngineUnsupportedError` when the split cannot be
    patched (see :func:`stage_error`) or a cell would be empty."""
    why = stage_error(graph, split)
    if why is None and grid > min(graph.ops[split].out.shape[2:]):
        why = f"a {grid}×{grid} grid leaves empty cells on a {graph.ops[split].out.shape[2:]} output"
    if why is not None:
        raise EngineUnsupportedError("patch", graph.ops[min(max(split, 0), len(graph.ops) - 1)].name, why)
    pt = _Patcher(graph, split)
    _, _, h, w = graph.ops[split].out.shape
    for i, cell in enumerate(grid_cells(h, w, grid)):
        pt.patch(f"p{i // grid}{i % grid}", cell)
    for op in graph.ops[:split]:                      # stage buffers now unused (all but the split's output)
        pt.buffers[op.out.buf] = 0
    return Graph(pt.ops + graph.ops[split + 1:], pt.buffers, graph.input, graph.output)


# -- choosing the split and the grid ----------------------------------------------------------
@dataclass
class PatchPlan:
    """A patched graph and its memory plan, against the per-layer plan of the same graph."""

    split: int
    grid: int
    graph: Graph                 # the patched graph
    plan: MemoryPlan             # its memory plan
    base: MemoryPlan             # the per-layer (unpatched) plan
    macs: int                    # MACs of the per-layer graph
    patched_macs: int

    @property
    def mac_overhead(self) -> float:
        """Recomputed MACs over the per-layer graph's MACs."""
        return (self.patched_macs - self.macs) / self.macs if self.macs else 0.0

    def to_dict(self) -> dict[str, Any]:
        base_g, k = self.base.graph, self.split
        n_stage = len(self.graph.ops) - (len(base_g.ops) - k - 1)
        stage_macs = sum(op_macs(op) for op in base_g.ops[:k + 1])
        return {"split": k, "split_op": base_g.ops[k].name, "grid": self.grid,
                "split_output_shape": list(base_g.ops[k].out.shape), "patch_ops": n_stage,
                "per_layer_arena_bytes": self.base.arena_bytes, "per_layer_live_peak_bytes": self.base.live_peak_bytes,
                "patch_arena_bytes": self.plan.arena_bytes, "patch_live_peak_bytes": self.plan.live_peak_bytes,
                "patch_peak_reduction": self.base.arena_bytes / max(self.plan.arena_bytes, 1),
                "stage_peak_bytes": max(self.plan.op_live_bytes[:n_stage], default=0),
                "rest_peak_bytes": max(self.plan.op_live_bytes[n_stage:], default=0),
                "macs": self.macs, "patched_macs": self.patched_macs, "mac_overhead": self.mac_overhead,
                "stage_mac_overhead": (self.patched_macs - self.macs) / stage_macs if stage_macs else 0.0}


def patch_report(pp: PatchPlan) -> dict[str, Any]:
    """Per-layer vs patched peak (arena and live bytes), the split, the grid and the recompute overhead."""
    return pp.to_dict()


def _build_plan(graph: Graph, base: MemoryPlan, split: int, grid: int, macs: int, inplace: bool,
                align: int) -> PatchPlan:
    pg = patch_graph(graph, split, grid)
    return PatchPlan(split, grid, pg, plan_memory(pg, inplace, align), base, macs,
                     sum(op_macs(op) for op in pg.ops))


def plan_patches(graph: Graph, split: int | None = None, grid: int | None = None, max_overhead: float = 0.3,
                 grids: Iterable[int] = GRIDS, inplace: bool = True, align: int = 4,
                 target_reduction: float | None = None) -> PatchPlan:
    """The patched plan of smallest arena whose MAC overhead is at most ``max_overhead`` (ties: the
    smaller overhead), over every valid split (or ``split``) and every grid in ``grids`` (or ``grid``;
    with both given, that plan whatever its overhead). With ``target_reduction``: instead the plan of
    least MAC overhead whose arena is at most the per-layer arena / ``target_reduction`` (small tiles
    cost more time than their MACs say, so the least overhead that reaches a target is the faster plan).

    A candidate is planned only while the per-layer graph's live bytes after its split (a lower bound
    on its arena) are below the best arena so far. Raises :class:`EngineUnsupportedError` for an
    invalid ``split`` or when no candidate keeps within the bound."""
    if split is not None and stage_error(graph, split) is not None:
        patch_graph(graph, split, grid or 1)                 # raises, naming the reason
    base = plan_memory(graph, inplace, align)
    macs = sum(op_macs(op) for op in graph.ops)
    splits = [split] if split is not None else [k for k in range(len(graph.ops) - 1) if stage_error(graph, k) is None]
    cands = []
    for k in splits:
        bound = max(base.op_live_bytes[k + 1:], default=0)
        for p in [grid] if grid is not None else sorted(set(grids)):
            if grid is None and p > min(graph.ops[k].out.shape[2:]):
                continue                                      # a cell would be empty
            over = (patched_macs(graph, k, p) - macs) / macs if macs else 0.0
            if over <= max_overhead or (split is not None and grid is not None):
                cands.append((bound, over, k, p))
    best: PatchPlan | None = None
    if target_reduction is not None:
        cap = base.arena_bytes / target_reduction
        for bound, over, k, p in sorted(cands, key=lambda c: c[1]):
            if bound > cap:
                continue
            pp = _build_plan(graph, base, k, p, macs, inplace, align)
            if pp.plan.arena_bytes <= cap:
                return pp
        raise EngineUnsupportedError("patch", graph.ops[0].name, f"no split and grid within MAC overhead "
                                     f"{max_overhead} reduce the arena {target_reduction}×")
    for bound, over, k, p in sorted(cands):
        if best is not None and bound >= best.plan.arena_bytes:
            break
        pp = _build_plan(graph, base, k, p, macs, inplace, align)
        if best is None or (pp.plan.arena_bytes, pp.mac_overhead) < (best.plan.arena_bytes, best.mac_overhead):
            best = pp
    if best is None:
        raise EngineUnsupportedError("patch", graph.ops[0].name if graph.ops else "",
                                     f"no split and grid keep the MAC overhead within {max_overhead}")
    return best


# -- generate, build, run ---------------------------------------------------------------------
class PatchedEngineModel(EngineModel):
    """An :class:`EngineModel` built from a patched graph; ``patch`` is its :class:`PatchPlan`."""

    def __init__(self, im: IntegerModel, gen: GeneratedModel, library: Any, patch: PatchPlan, **options: Any):
        super().__init__(im, gen, library, **options)
        self.patch = patch


def generate_patched(im: IntegerModel, example: torch.Tensor, prefix: str = "model", split: int | None = None,
                     grid: int | None = None, max_overhead: float = 0.3, inplace: bool = True,
                     target_reduction: float | None = None, **codegen_options: Any) -> tuple[GeneratedModel, PatchPlan]:
    """Lower ``im``, choose (or take) the split and grid, plan and generate its C (per-patch constants
    shared); ``codegen_options`` go to :func:`~efficientml.engine.codegen.generate_c` (``conv_algo``)."""
    pp = plan_patches(lower(im, example), split, grid, max_overhead, inplace=inplace, target_reduction=target_reduction)
    c_source = share_constants(codegen.generate_c(pp.plan, prefix, **codegen_options), pp.plan.graph)
    return GeneratedModel(prefix, c_source, codegen.generate_header(pp.plan, prefix), pp.plan), pp


def compile_patched(im: IntegerModel, example: torch.Tensor, split: int | None = None, grid: int | None = None,
                    max_overhead: float = 0.3, prefix: str = "model", inplace: bool = True,
                    num_threads: int | None = None, isa: str | None = None, target_reduction: float | None = None,
                    **codegen_options: Any) -> PatchedEngineModel:
    """:func:`~efficientml.engine.host.compile_engine` with patch-based inference (split and grid chosen by
    :func:`plan_patches` unless given): ``run`` is bit-exact with ``im.integer_output``; ``.patch`` is
    the :class:`PatchPlan` (``.patch.to_dict()``: arena before/after, split, grid, MAC overhead)."""
    from efficientml.core.errors import UnsupportedError

    gen, pp = generate_patched(im, example, prefix, split, grid, max_overhead, inplace, target_reduction,
                               **codegen_options)
    cc = host_compiler()
    if cc is None:
        raise UnsupportedError("no C compiler found to build the engine's C (set CC or install gcc/clang)")
    return PatchedEngineModel(im, gen, _build(gen, cc), pp, num_threads=num_threads, isa=isa)
