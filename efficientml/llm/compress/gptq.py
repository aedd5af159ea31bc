"""GPTQ (Frantar et al. 2023): quantize one column at a time and push its rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
``‖WX − ŴX‖²`` (H = 2XXᵀ/N from calibration inputs).

Lazy blocked updates (``block_size`` columns at a time), dampening (``damp``·mean diag H), optional
act-order (columns by decreasing diag H) with static groups (group qparams from the original weight
in the original column order, so a packed checkpoint needs no column permutation), and a heavier
weight for the first position of each calibration sequence (``sink_share``, see stats.py: GPTQ
otherwise trades that attention-sink token's accuracy for the others'). Hessians of all
linears of a block come from one pass of the unquantized block; the quantized block is then run to
produce the next block's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.quant.grid import GridSpec, QTensor, qparams, qparams_mse, weight_grid
from efficientml.llm.compress.stats import SINK_RULES, BlockStats, collect_block


GRIDS = ("minmax", "mse")


def _grid_fn(grid: str):
    return qparams_mse if grid == "mse" else qparams


@dataclass(frozen=True)
class GPTQConfig(Config):
    kind = "gptq"
    w_bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    propagate: str = "quantized"  # next block's inputs from the quantized block, or "fp"
    sink_share: float = 0.05      # share of each sequence's Hessian weight on its first token (0: plain GPTQ)
    sink_rule: str = "tokens"     # that share of the tokens, or "trace": of each Hessian's trace (stats.py)
    grid: str = "minmax"          # each group's range: its min/max, or "mse": shrunk to the weight-MSE optimum

    def validate(self) -> None:
        self.spec  # noqa: B018
        check_range("damp", self.damp, 0.0, 1.0, lo_open=True)
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        check_choice("propagate", self.propagate, ("quantized", "fp"))
        check_range("sink_share", self.sink_share, 0.0, 1.0, hi_open=True)
        check_choice("sink_rule", self.sink_rule, SINK_RULES)
        check_choice("grid", self.grid, GRIDS)
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise ConfigError("act_order with a group size needs static_groups=True (the packed layout keeps "
                              "groups in the original column order)")

    @property
    def spec(self) -> GridSpec:
        return weight_grid(self.w_bits, self.group_size, self.symmetric)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: GridSpec, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  name: str = "layer", overwrite_h: bool = False,
                  qparams: tuple[torch.Tensor, torch.Tensor] | None = None, grid: str = "minmax") -> QTensor:
    """GPTQ on one weight (out, in) given its input Hessian (in, in); ``overwrite_h`` lets it use H's
    memory as scratch (the caller's H is then garbage) — for wide layers H dominates peak memory.
    ``qparams``: a given grid, (scale, zero) each (out, G), instead of one chosen from W (re-quantizing
    onto an existing model's grid, e.g. an adapter merged into a 4-bit base); ``grid``: how a grid is
    chosen from W otherwise ("minmax" or "mse", :func:`~efficientml.quant.grid.qparams_mse`)."""
    Wt = torch.empty(W.shape[1], W.shape[0], dtype=torch.float32, device=W.device)
    Wt.copy_(W.detach().t())
    return _gptq(Wt, H, spec, damp, block_size, act_order, static_groups, name, overwrite_h, fixed=qparams,
                 grid=grid)


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Dampen H, then its inverse's upper Cholesky factor U (H⁻¹ = UᵀU), all in H's memory."""
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    # one (in, in) buffer (8192² fp32 = 268 MB): L, then H⁻¹, then its upper Cholesky factor, all in place
    torch.linalg.cholesky(H, out=H)
    H.tril_()
    torch.cholesky_inverse(H, out=H)
    torch.linalg.cholesky(H, upper=True, out=H)
    return H.triu_()  # row i of U drives the updates after column i


class _Columns:
    """The column loop's state: Wt (in, out) updated in place, U = chol(H⁻¹), per-group qparams."""

    def __init__(self, Wt: torch.Tensor, Hinv: torch.Tensor, spec: GridSpec, gs: int, group_of: list[int],
                 scale: torch.Tensor, zero: torch.Tensor, dynamic_groups: bool, grid: str = "minmax") -> None:
        self.Wt, self.Hinv, self.spec, self.gs, self.group_of = Wt, Hinv, spec, gs, group_of
        self.grid_fn = _grid_fn(grid)
        self.scale, self.zero, self.dynamic_groups = scale, zero, dynamic_groups
        self.codes_t = torch.empty(Wt.shape, dtype=torch.uint8, device=Wt.device)  # (in, out)
        self.cur = None  # (group, scale, zero) of the current column

    def _qparams(self, col: int, i1: int, i2: int, i: int, Err1: torch.Tensor) -> tuple:
        """(scale, zero) of the column's group; a dynamic group takes them from its updated weights."""
        Wt, gs, g = self.Wt, self.gs, self.group_of[col]
        new_group = self.dynamic_groups and col % gs == 0
        if new_group:  # group starts: qparams from its updated weights
            span = Wt[col:min(col + gs, i2)]
            if col + gs > i2:  # the group runs past this block: add the block's pending updates
                rest = Wt[i2:col + gs] - self.Hinv[i1:col, i2:col + gs].t() @ Err1[:i]
                span = torch.cat([span, rest])
            s_g, z_g = self.grid_fn(span.t(), self.spec.replace(granularity="channel"))
            self.scale[:, g], self.zero[:, g] = s_g[:, 0], z_g[:, 0]
        if new_group or self.cur is None or self.cur[0] != g:
            self.cur = (g, self.scale[:, g].contiguous(), self.zero[:, g].float())
        return self.cur[1], self.cur[2]

    def block(self, i1: int, i2: int) -> None:
        """Quantize columns i1 … i2−1, each pushing its error onto the later columns of the block;
        then one lazy GEMM update of the columns after the block."""
        Wt, Hinv, qmax = self.Wt, self.Hinv, self.spec.code_max
        out = Wt.shape[1]
        Err1 = torch.empty(i2 - i1, out, dtype=torch.float32, device=Wt.device)  # (cols, out) scaled errors
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s_c, z_c = self._qparams(col, i1, i2, i, Err1)
            w = Wt[col]                                          # (out,) this column, with all updates so far
            u = torch.round(w / s_c + z_c).clamp_(0, qmax)       # its codes
            self.codes_t[col] = u.to(torch.uint8)
            err = (w - (u - z_c) * s_c) / Hinv1[i, i]
            Wt[col:i2].addr_(Hinv1[i, i:], err, alpha=-1.0)      # push the error onto this block's columns
            Err1[i] = err
        if i2 < Wt.shape[0]:  # lazy update of the columns after the block: one GEMM, in place
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)


@torch.no_grad()
def _gptq(Wt: torch.Tensor, H: torch.Tensor, spec: GridSpec, damp: float, block_size: int, act_order: bool,
          static_groups: bool, name: str, overwrite_h: bool,
          fixed: tuple[torch.Tensor, torch.Tensor] | None = None, grid: str = "minmax") -> QTensor:
    """GPTQ on the transposed weight ``Wt`` (in, out), updated in place: a column of W is a contiguous
    row of Wt, so the column updates and the lazy block update write in place (no (out, in) temporaries).
    Memory: Wt, H (factored and inverted in place) and the uint8 codes."""
    n, out = Wt.shape
    gs = spec.group_len(n, name)
    G = n // gs
    H = H.detach().float() if overwrite_h else H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    Wt[dead] = 0.0

    scale = torch.zeros(out, G, dtype=torch.float32, device=Wt.device)
    zero = torch.zeros(out, G, dtype=torch.int32, device=Wt.device)
    if fixed is not None:  # a given grid
        scale, zero = fixed[0].float().clone(), fixed[1].to(torch.int32).clone()
    elif spec.group_size is None or static_groups:  # qparams fixed up front from the original weight
        scale, zero = _grid_fn(grid)(Wt.t(), spec)

    perm = torch.arange(n, device=Wt.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        Wt, H = Wt[perm], H[perm][:, perm]
    group_of = (perm // gs).tolist()

    Hinv = _inverse_hessian_factor(H, damp)
    cols = _Columns(Wt, Hinv, spec, gs, group_of, scale, zero,
                    spec.group_size is not None and not static_groups and fixed is None, grid)
    for i1 in range(0, n, block_size):
        cols.block(i1, min(i1 + block_size, n))
    codes_t = cols.codes_t
    del Hinv, H, cols
    if act_order:
        codes_t = codes_t[torch.argsort(perm)]
    return QTensor(codes_t.t().contiguous(), scale, zero, spec)


def gptq_quantize_shared(ws: list[torch.Tensor], H: torch.Tensor, spec: GridSpec, damp: float = 0.01,
                         block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                         name: str = "layer", overwrite_h: bool = False, grid: str = "minmax") -> list[QTensor]:
    """GPTQ for linears sharing one input (q/k/v, gate/up): their rows are independent given H, so
    they are quantized as one stacked weight — the same result with one column loop."""
    Wt = torch.cat([w.detach().t().float() for w in ws], dim=1)  # (in, Σ out): the only fp32 copy
    qw = _gptq(Wt, H, spec, damp, block_size, act_order, static_groups, name, overwrite_h, grid=grid)
    del Wt
    out, i = [], 0
    for w in ws:
        r = slice(i, i + w.shape[0])
        out.append(QTensor(qw.codes[r], qw.scale[r], qw.zero[r], spec))
        i += w.shape[0]
    return out


def gptq_transform(model, cfg: GPTQConfig, pack: bool = True, consume: bool = True):
    """A ``transform(data, stats)``: GPTQ of one block's linears from its Hessians (``consume``: use the
    Hessians' memory as scratch; pass False when the statistics are reused)."""
    from efficientml.llm.compress.mappings import scaling_groups
    from efficientml.llm.kernels.qlinear import install_quantized

    sets = [g.linears for g in scaling_groups(model)]
    spec = cfg.spec

    @torch.no_grad()
    def transform(data, st: BlockStats) -> None:
        block = data.block
        for names in sets:
            H = st.hessian.pop(names[0]) if consume else st.hessian[names[0]]
            ws = [block.get_submodule(n).weight.detach().float() for n in names]
            qws = gptq_quantize_shared(ws, H, spec, cfg.damp, cfg.block_size, cfg.act_order, cfg.static_groups,
                                       names[0], overwrite_h=consume, grid=cfg.grid)
            del H, ws
            for name, qw in zip(names, qws):
                install_quantized(block, name, qw, pack)

    return transform


def gptq_processor(model, cfg: GPTQConfig, pack: bool = True, log: dict | None = None,
                   keep: list | None = None):
    """A ``process(data)`` for :func:`~efficientml.llm.compress.calib.run_blockwise`; ``keep``: a list
    that receives each block's statistics (then the Hessians are copied, not consumed)."""
    from efficientml.llm.compress.mappings import scaling_groups

    sets = [g.linears for g in scaling_groups(model)]
    transform = gptq_transform(model, cfg, pack, consume=keep is None)

    @torch.no_grad()
    def process(data):
        st, fp_out = collect_block(data, sets, x_mean=False, hessian=True, keep_outputs=cfg.propagate == "fp",
                                   sink_share=cfg.sink_share, sink_rule=cfg.sink_rule)
        if keep is not None:
            keep.append(st.to("cpu"))
        transform(data, st)
        return fp_out  # None: run_blockwise re-runs the quantized block

    return process
