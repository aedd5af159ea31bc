"""Fused projections in checkpoints: Phi-3 stores q/k/v as one ``qkv_proj`` and gate/up as one
``gate_up_proj`` (rows in that order); our model keeps them separate (same names as Llama's, so
quantization and pruning treat every family alike). Split at load, fused again on save;
:mod:`efficientml.llm.io.fused_compressed` does the same for quantized tensors.
"""

from __future__ import annotations

import torch

from efficientml.core.errors import CheckpointError
from efficientml.llm.config import LlamaConfig

# the checkpoint's fused linear → our linears, in row order
FUSED_GROUPS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_rows(cfg: LlamaConfig, fused: str) -> list[int]:
    """The output rows each part of ``fused`` (a :data:`FUSED_GROUPS` key) holds."""
    q, kv = cfg.num_attention_heads * cfg.dim_per_head, cfg.num_key_value_heads * cfg.dim_per_head
    return [q, kv, kv] if fused.startswith("self_attn") else [cfg.intermediate_size] * 2


def split_fused(cfg: LlamaConfig, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A checkpoint's fused projections (Phi-3) → the separate q/k/v and gate/up weights of our model
    (row views, no copy); other checkpoints pass unchanged."""
    if cfg.model_type != "phi3":
        return state
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        fused = next((f for f in FUSED_GROUPS if k.endswith(f".{f}.weight")), None)
        if fused is None:
            out[k] = v
            continue
        rows = fused_rows(cfg, fused)
        if v.dim() != 2 or v.shape[0] != sum(rows):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}; the config implies "
                                  f"{sum(rows)} rows ({' + '.join(map(str, rows))})")
        prefix = k[: -len(f"{fused}.weight")]
        out.update({f"{prefix}{name}.weight": part for name, part in zip(FUSED_GROUPS[fused], v.split(rows))})
    return out


def fuse_split(cfg: LlamaConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_fused`, for writing a Phi-3 checkpoint transformers reads."""
    if cfg.model_type != "phi3":
        return state
    out = dict(state)
    for fused, names in FUSED_GROUPS.items():
        for k in [k for k in state if k.endswith(f".{names[0]}.weight")]:
            prefix = k[: -len(f"{names[0]}.weight")]
            out[f"{prefix}{fused}.weight"] = torch.cat([out.pop(f"{prefix}{n}.weight") for n in names])
    return out
