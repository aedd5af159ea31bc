"""GPTQ (Frantar et al. 2023): quantize one column at a time and push its rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
``‖WX − ŴX‖²`` (H = 2XXᵀ/N from calibration inputs).

Lazy blocked updates (``block_size`` columns at a time), dampening (``damp``·mean diag H), optional
act-order (columns by decreasing diag H) with static groups (group qparams from the original weight
in the original column order, so a packed checkpoint needs no column permutation). Hessians of all
linears of a block come from one pass of the unquantized block; the quantized block is then run to
produce the next block's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.llm.compress.rtn import QuantizedWeight, WeightQuantSpec, compute_qparams, quantize_codes


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

    def validate(self) -> None:
        self.spec  # noqa: B018
        check_range("damp", self.damp, 0.0, 1.0, lo_open=True)
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        check_choice("propagate", self.propagate, ("quantized", "fp"))
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise ConfigError("act_order with a group size needs static_groups=True (the packed layout keeps "
                              "groups in the original column order)")

    @property
    def spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.w_bits, self.group_size, self.symmetric)


class HessianAccumulator:
    """Running H = 2/N · Σ x xᵀ over batches of inputs (tokens, features)."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.H.addmm_(x.t(), x)
        self.count += x.shape[0]

    def value(self, inplace: bool = False) -> torch.Tensor:
        """H; ``inplace`` scales the accumulator itself (no second (n, n) buffer; it is then spent)."""
        if inplace:
            return self.H.mul_(2.0 / max(self.count, 1))
        return self.H * (2.0 / max(self.count, 1))


def _qdq_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return (torch.round(w / s + z).clamp(0, qmax) - z) * s


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  name: str = "layer", overwrite_h: bool = False) -> QuantizedWeight:
    """GPTQ on one weight (out, in) given its input Hessian (in, in); ``overwrite_h`` lets it use H's
    memory as scratch (the caller's H is then garbage) — for wide layers H dominates peak memory."""
    W = W.detach().clone().float()
    H = H.detach().float() if overwrite_h else H.detach().clone().float()
    out, n = W.shape
    gs = spec.group_len(n, name)
    G = n // gs
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = torch.zeros(out, G, dtype=torch.float32, device=W.device)
    zero = torch.zeros(out, G, dtype=torch.int32, device=W.device)
    if spec.group_size is None or static_groups:  # qparams fixed up front from the original weight
        scale, zero = compute_qparams(W, spec, name=name)

    perm = torch.arange(n, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    # (in, in) buffers dominate memory for wide layers (8192² fp32 = 268 MB): factor in place, two alive
    torch.linalg.cholesky(H, out=H)
    H.tril_()  # L
    Hinv = torch.cholesky_inverse(H)
    del H
    torch.linalg.cholesky(Hinv, upper=True, out=Hinv)
    Hinv.triu_()  # rows of the upper Cholesky factor of H⁻¹ drive the updates

    Q = torch.zeros_like(W)
    qmax = spec.qmax
    dynamic_groups = spec.group_size is not None and not static_groups
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // gs
            if dynamic_groups and col % gs == 0:  # group starts: qparams from its updated weights
                span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                s_g, z_g = compute_qparams(span, spec.replace(group_size=None))
                scale[:, g], zero[:, g] = s_g[:, 0], z_g[:, 0]
            w = W1[:, i]
            q = _qdq_column(w, scale[:, g], zero[:, g].float(), qmax)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Q[:, col] = q
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    codes = quantize_codes(Q, scale, zero, spec)  # Q lies on the grid: recovers the codes exactly
    return QuantizedWeight(codes, scale, zero, spec)


def gptq_quantize_shared(ws: list[torch.Tensor], H: torch.Tensor, spec: WeightQuantSpec, damp: float = 0.01,
                         block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                         name: str = "layer", overwrite_h: bool = False) -> list[QuantizedWeight]:
    """GPTQ for linears sharing one input (q/k/v, gate/up): their rows are independent given H, so
    they are quantized as one stacked weight — the same result with one column loop."""
    qw = gptq_quantize(torch.cat(ws), H, spec, damp, block_size, act_order, static_groups, name, overwrite_h)
    out, i = [], 0
    for w in ws:
        r = slice(i, i + w.shape[0])
        out.append(QuantizedWeight(qw.codes[r], qw.scale[r], qw.zero[r], spec))
        i += w.shape[0]
    return out


def gptq_processor(model, cfg: GPTQConfig, pack: bool = True, log: dict | None = None):
    """A ``process(data)`` for :func:`~efficientml.llm.compress.calib.run_blockwise`."""
    from efficientml.llm.compress.mappings import scaling_groups
    from efficientml.llm.compress.qlinear import install_quantized

    sets = [g.linears for g in scaling_groups(model)]
    spec = cfg.spec

    @torch.no_grad()
    def process(data):
        block = data.block
        hess = {s[0]: HessianAccumulator(block.get_submodule(s[0]).in_features, data.device) for s in sets}
        fp_out = data.run({k: h.add for k, h in hess.items()}, keep_outputs=cfg.propagate == "fp")
        for names in sets:
            H = hess.pop(names[0]).value(inplace=True)
            ws = [block.get_submodule(n).weight.detach().float() for n in names]
            qws = gptq_quantize_shared(ws, H, spec, cfg.damp, cfg.block_size, cfg.act_order, cfg.static_groups,
                                       names[0], overwrite_h=True)
            for name, qw in zip(names, qws):
                install_quantized(block, name, qw, pack)
            del H
        return fp_out  # None: run_blockwise re-runs the quantized block

    return process
