"""AWQ (Lin et al. 2024): protect the weights that meet large activations by scaling their input
channels up before quantization and folding the inverse scale into the predecessor.

Per scaling group (mappings.py), with x̄ the mean |x| of each input channel over all calibration
tokens: ``s = x̄^α`` (normalized by √(max·min)); α is chosen from a grid of ``n_grid`` values in [0, 1)
by the error of the group's ``inspect`` module output between the fp block and the block with
``Q(W·s)/s`` weights, on ``search_samples`` calibration sequences. Then a clipping search per linear
(except q/k, whose errors softmax amplifies) shrinks each group's range by the ratio minimizing
``‖WX − Q_clip(W)X‖``. The block's next inputs are the fp block's outputs (scaling is exact).

The salient-channel ablations are fields: ``salient_mode="fp16"`` keeps the top ``salient_fraction``
input channels (by x̄) unquantized (simulated: a packed checkpoint cannot hold them, so it forces
fake quantization), ``salient_mode="scale"`` multiplies them by ``salient_scale`` instead of searching,
and ``n_grid`` sets the α grid. ``use_gptq=True`` composes AWQ's scales with GPTQ (no clipping: GPTQ
compensates rounding itself); the Hessians are transformed exactly, H' = diag(1/s)·H·diag(1/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.quant.grid import GridSpec, fake_quantize, weight_grid
from efficientml.llm.compress.calib import BlockData
from efficientml.llm.compress.gptq import GRIDS, gptq_quantize_shared
from efficientml.llm.compress.mappings import ScalingGroup, scaling_groups, usable
from efficientml.llm.kernels.qlinear import install_quantized
from efficientml.llm.compress.rtn import quantize_weight
from efficientml.llm.compress.stats import SINK_RULES, collect_block


@dataclass(frozen=True)
class AWQConfig(Config):
    kind = "awq"
    w_bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    n_grid: int = 20
    search_samples: int = 4         # calibration sequences used by the α and clip searches
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512          # tokens (evenly sampled) for the clip search
    salient_mode: str = "none"      # "none" | "fp16": keep salient input channels unquantized | "scale": scale them
    salient_fraction: float = 0.01
    salient_scale: float = 2.0
    use_gptq: bool = False          # AWQ scales, then GPTQ instead of RTN (+clip)
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False    # with a group size: static groups (the packed layout's order)
    gptq_sink_share: float = 0.05   # see GPTQConfig.sink_share
    gptq_sink_rule: str = "tokens"  # see GPTQConfig.sink_rule
    gptq_grid: str = "minmax"       # see GPTQConfig.grid

    def validate(self) -> None:
        self.spec  # noqa: B018
        if self.n_grid < 1 or self.clip_grid < 1 or self.search_samples < 1 or self.clip_tokens < 1:
            raise ConfigError("n_grid, clip_grid, search_samples and clip_tokens must be positive")
        check_range("max_shrink", self.max_shrink, 0.0, 1.0, hi_open=True)
        check_choice("salient_mode", self.salient_mode, ("none", "fp16", "scale"))
        check_range("salient_fraction", self.salient_fraction, 0.0, 1.0, lo_open=True)
        check_range("gptq_damp", self.gptq_damp, 0.0, 1.0, lo_open=True)
        check_range("gptq_sink_share", self.gptq_sink_share, 0.0, 1.0, hi_open=True)
        check_choice("gptq_sink_rule", self.gptq_sink_rule, SINK_RULES)
        check_choice("gptq_grid", self.gptq_grid, GRIDS)

    @property
    def spec(self) -> GridSpec:
        return weight_grid(self.w_bits, self.group_size, self.symmetric)


@torch.no_grad()
def apply_scale(block: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """Multiply the group's input columns by ``s`` and divide the predecessor's outputs by ``s``:
    the block computes the same function (exactly, up to float rounding)."""
    prev = block.get_submodule(group.prev)
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])  # (out, in) · s over in
    if group.prev_is_norm:
        prev.weight.div_(s.to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])  # predecessor's output rows
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))


def _salient(x_mean: torch.Tensor, frac: float) -> torch.Tensor:
    k = max(1, int(round(frac * x_mean.numel())))
    return torch.topk(x_mean, k).indices


@torch.no_grad()
def search_scale(data: BlockData, group: ScalingGroup, x: torch.Tensor, x_mean: torch.Tensor,
                 spec: GridSpec, n_grid: int, rows: int = 1024) -> tuple[torch.Tensor, float, list[float]]:
    """Best per-channel scale for ``group`` by grid search over α. x: (n, T, in) sample inputs."""
    block = data.block
    mod = block.get_submodule(group.inspect)
    att = group.inspect == "self_attn"
    lins = [block.get_submodule(n) for n in group.linears]
    # the candidates go into one scratch weight per linear, filled a slice of rows at a time; the
    # original weights are swapped back at the end (no clones, no full-size temporaries)
    origs = [lin.weight for lin in lins]
    trial = [nn.Parameter(torch.empty_like(w), requires_grad=False) for w in origs]

    def run() -> torch.Tensor:
        return torch.cat([data.call(mod, xb.to(data.device), att).float() for xb in x.split(data.batch_size)])

    ref = run()
    best, best_a, best_s, errs = math.inf, 0.0, torch.ones_like(x_mean), []
    try:
        for lin, t in zip(lins, trial):
            lin.weight = t
        for i in range(n_grid):
            a = i / n_grid
            s = x_mean.pow(a).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for t, w in zip(trial, origs):
                for r in range(0, w.shape[0], rows):
                    t[r:r + rows] = fake_quantize(w[r:r + rows] * s[None, :], spec) / s[None, :]
            err = (ref - run()).pow(2).mean().item()
            errs.append(err)
            if err < best:
                best, best_a, best_s = err, a, s.clone()
    finally:
        for lin, w in zip(lins, origs):
            lin.weight = w
    return best_s, best_a, errs


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: GridSpec, grid: int, max_shrink: float,
                oc_batch: int = 256) -> torch.Tensor:
    """Per-group clipping threshold (out, G) minimizing the group-wise output error on tokens x (n, in)."""
    out, n = w.shape
    g = spec.group_len(n)
    G = n // g
    xg = x.float().reshape(-1, G, g)  # (tok, G, g)
    best_max = torch.empty(out, G, device=w.device)
    for o0 in range(0, out, oc_batch):
        wb = w[o0:o0 + oc_batch].float()
        wg = wb.reshape(-1, G, g)  # (ob, G, g)
        org_max = wg.abs().amax(-1)  # (ob, G)
        ref = torch.einsum("ogk,tgk->ogt", wg, xg)  # per-group partial outputs (ob, G, tok)
        best_err = torch.full_like(org_max, math.inf)
        bm = org_max.clone()
        for i in range(int(max_shrink * grid)):
            mx = org_max * (1 - i / grid)
            q = fake_quantize(wb, spec, max_abs=mx).reshape(-1, G, g)
            err = (torch.einsum("ogk,tgk->ogt", q, xg) - ref).pow(2).mean(-1)  # (ob, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            bm = torch.where(better, mx, bm)
        best_max[o0:o0 + oc_batch] = bm
    return best_max


def _input_sets(model: nn.Module) -> list[tuple[str, ...]]:
    """Linears of a block grouped by shared input (every linear appears in exactly one group)."""
    return [g.linears for g in scaling_groups(model)]


def _search_scales(data: BlockData, st, groups: list[ScalingGroup], X: dict, cfg: AWQConfig, cache: dict
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """Each usable group's input scale (by its first linear's name) and the α found (None: fixed)."""
    block, x_mean, spec = data.block, st.x_mean, cfg.spec
    scales: dict[str, torch.Tensor] = {}
    info = {}
    for grp in groups:
        k = grp.linears[0]
        if not usable(grp, block):
            continue
        if cfg.salient_mode == "scale":
            s = torch.ones_like(x_mean[k])
            s[_salient(x_mean[k], cfg.salient_fraction)] = cfg.salient_scale
            a = None
        elif cfg.salient_mode == "fp16":
            continue
        elif (data.index, "scale", k) in cache:
            s, a = cache[data.index, "scale", k]
        else:
            s, a, _ = search_scale(data, grp, X[k], x_mean[k], spec, cfg.n_grid)
            cache[data.index, "scale", k] = (s, a)
        scales[k] = s
        info[grp.inspect] = a
    return scales, info


def _gptq_set(block: nn.Module, st, names: tuple[str, ...], s: torch.Tensor | None, cfg: AWQConfig,
              consume: bool) -> dict:
    """GPTQ of one input set after scaling: H' = diag(1/s)·H·diag(1/s), since the inputs are x / s."""
    k = names[0]
    H = st.hessian.pop(k) if consume else st.hessian[k].clone()
    if s is not None:
        H.div_(s[:, None]).div_(s[None, :])  # inputs are x / s now: H' = diag(1/s) H diag(1/s)
    ws = [block.get_submodule(n).weight.detach().float() for n in names]
    gq = dict(zip(names, gptq_quantize_shared(ws, H, cfg.spec, cfg.gptq_damp, cfg.gptq_block_size,
                                              act_order=cfg.gptq_act_order,
                                              static_groups=cfg.gptq_act_order,  # packed order
                                              name=k, overwrite_h=True, grid=cfg.gptq_grid)))
    del H, ws
    return gq


def _quantize_set(data: BlockData, st, names: tuple[str, ...], scales: dict, X: dict, cfg: AWQConfig,
                  cache: dict, pack: bool, consume: bool) -> None:
    """Quantize (clip search + RTN, or GPTQ) and install every linear of one input set."""
    block, spec, k = data.block, cfg.spec, names[0]
    xs = X[k].reshape(-1, X[k].shape[-1])
    gq = _gptq_set(block, st, names, scales.get(k), cfg, consume) if cfg.use_gptq else {}
    for name in names:
        lin = block.get_submodule(name)
        w = lin.weight.detach().float()
        if cfg.use_gptq:
            qw = gq.pop(name)
        else:
            max_abs = None
            if cfg.clip and not name.endswith(("q_proj", "k_proj")):
                if (data.index, "clip", name) not in cache:
                    step = max(1, xs.shape[0] // cfg.clip_tokens)
                    cache[data.index, "clip", name] = search_clip(w, xs[::step], spec, cfg.clip_grid, cfg.max_shrink)
                max_abs = cache[data.index, "clip", name]
            qw = quantize_weight(w, spec, max_abs, name)
        if cfg.salient_mode == "fp16":
            keep = _salient(st.x_mean[k], cfg.salient_fraction)
            deq = qw.dequantize()
            deq[:, keep] = w[:, keep]
            lin.weight.copy_(deq)
        else:
            install_quantized(block, name, qw, pack)
        del w, qw


def awq_transform(model: nn.Module, cfg: AWQConfig, pack: bool = True, log: dict | None = None,
                  search_cache: dict | None = None, consume: bool = True):
    """A ``transform(data, stats)`` applying AWQ (optionally + GPTQ) to one block from its statistics
    (mean |x| per input set, search samples, and Hessians when ``use_gptq``).

    ``search_cache``: searched scales and clip thresholds by (block, layer); a later run with the same
    model, calibration tokens and bit width/group size reuses them instead of searching again (AWQ then
    AWQ+GPTQ, or a fake-quant run then a packed one). ``consume``: the Hessians may be overwritten."""
    cache = search_cache if search_cache is not None else {}
    groups = scaling_groups(model)
    sets = _input_sets(model)
    pack = pack and cfg.salient_mode != "fp16"
    log = log if log is not None else {}

    @torch.no_grad()
    def transform(data: BlockData, st) -> None:
        block = data.block
        n_s = min(cfg.search_samples, next(iter(st.samples.values())).shape[0])
        X = {k: v[:n_s] for k, v in st.samples.items()}  # (n_s, T, in)
        scales, info = _search_scales(data, st, groups, X, cfg, cache)
        for grp in groups:  # apply all scales after all searches (each search saw the fp block)
            k = grp.linears[0]
            if k in scales:
                apply_scale(block, grp, scales[k])
                X[k] = X[k] / scales[k]
        log[data.index] = {"alpha": info}
        for names in sets:
            _quantize_set(data, st, names, scales, X, cfg, cache, pack, consume)

    return transform


def awq_processor(model: nn.Module, cfg: AWQConfig, pack: bool = True, log: dict | None = None,
                  search_cache: dict | None = None, keep: list | None = None):
    """A ``process(data)`` for :func:`run_blockwise`: one pass collects the block's statistics and fp
    outputs (the next block's inputs: scaling is exact), then :func:`awq_transform`. ``keep``: a list
    that receives each block's statistics (then they are copied, not consumed)."""
    sets = _input_sets(model)
    transform = awq_transform(model, cfg, pack, log, search_cache, consume=keep is None)

    @torch.no_grad()
    def process(data: BlockData) -> torch.Tensor:
        st, fp_out = collect_block(data, sets, x_mean=True, hessian=cfg.use_gptq, n_samples=cfg.search_samples,
                                   sink_share=cfg.gptq_sink_share, sink_rule=cfg.gptq_sink_rule)
        if keep is not None:
            keep.append(st.to("cpu"))
        transform(data, st)
        return fp_out

    return process
