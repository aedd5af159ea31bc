"""Fused projections in checkpoints: a family's entry (:attr:`~efficientml.llm.arch.Family.fused`) names
the linears its checkpoint stores as one (Phi-3: q/k/v as ``qkv_proj``, gate/up as ``gate_up_proj``,
rows in that order); our model keeps them separate (same names as Llama's, so quantization and pruning
treat every family alike). Split at load, fused again on save; :func:`rename_weights` maps a family's
other weight names (``Family.weight_renames``, Mixtral's experts) the same way;
:mod:`efficientml.llm.io.fused_compressed` does the same for quantized tensors.
"""

from __future__ import annotations

import torch

from efficientml.core.errors import CheckpointError
from efficientml.llm.arch import FusedProjection
from efficientml.llm.config import LlamaConfig


def split_fused(cfg: LlamaConfig, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A checkpoint's fused projections → the separate weights of our model (row views, no copy);
    families without fused projections pass unchanged."""
    groups = cfg.family.fused
    if not groups:
        return state
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        fused = next((f for f in groups if k.endswith(f".{f.name}.weight")), None)
        if fused is None:
            out[k] = v
            continue
        rows = fused.rows(cfg)
        if v.dim() != 2 or v.shape[0] != sum(rows):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}; the config implies "
                                  f"{sum(rows)} rows ({' + '.join(map(str, rows))})")
        prefix = k[: -len(f"{fused.name}.weight")]
        out.update({f"{prefix}{name}.weight": part for name, part in zip(fused.parts, v.split(rows))})
    return out


def fuse_split(cfg: LlamaConfig, state: dict[str, torch.Tensor],
               groups: tuple[FusedProjection, ...] | None = None) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_fused`, for writing a checkpoint transformers reads (``groups``: the
    projections to fuse, by default the family's)."""
    groups = cfg.family.fused if groups is None else groups
    if not groups:
        return state
    out = dict(state)
    for fused in groups:
        first = fused.parts[0]
        for k in [k for k in state if k.endswith(f".{first}.weight")]:
            prefix = k[: -len(f"{first}.weight")]
            out[f"{prefix}{fused.name}.weight"] = torch.cat([out.pop(f"{prefix}{n}.weight") for n in fused.parts])
    return out


def rename_weights(cfg: LlamaConfig, state: dict[str, torch.Tensor], back: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's weight names → ours by the family's ``weight_renames`` fragments (Mixtral's
    ``block_sparse_moe.experts.j.w1`` → ``mlp.experts.j.gate_proj``); ``back``: ours → the checkpoint's."""
    pairs = cfg.family.weight_renames
    if not pairs:
        return state
    out = {}
    for k, v in state.items():
        for theirs, ours in pairs:
            k = k.replace(ours, theirs) if back else k.replace(theirs, ours)
        out[k] = v
    return out
