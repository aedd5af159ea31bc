"""Fused projections in compressed checkpoints (the family entry's ``fused``; Phi-3's): our model
quantizes q/k/v and gate/up as separate linears; the checkpoint holds them as one ``qkv_proj`` /
``gate_up_proj`` (as transformers, vLLM and compressed-tensors name them), so their quantized tensors
are joined by output row.

Per-row tensors (packed codes, scales, int8 weights) are concatenated; packed zero points (packed along
the output rows) are unpacked, concatenated and packed again; a static W8A8 input scale is shared, so
the parts must agree on it. :func:`split_compressed` undoes :func:`fuse_compressed` exactly.
"""

from __future__ import annotations

import torch

from efficientml.core.errors import CheckpointError, UnsupportedError
from efficientml.quant.packing import pack_int32, unpack_int32
from efficientml.llm.config import LlamaConfig


def fuse_compressed(cfg: LlamaConfig, state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Our separate-projection state → the checkpoint's fused names (families without fused projections:
    unchanged); ``bits``: the weights' bit width (zero points are packed with it)."""
    out = dict(state)
    for group in cfg.family.fused:
        fused, parts = group.name, group.parts
        for key in [k for k in state if k.endswith("." + parts[0] + ".weight_shape")
                    or k.endswith("." + parts[0] + ".weight")]:
            prefix = key[: key.index(parts[0])]
            names = [prefix + p for p in parts]
            suffixes = sorted({k[len(names[0]) + 1:] for k in state if k.startswith(names[0] + ".")})
            for n in names[1:]:
                if sorted(k[len(n) + 1:] for k in state if k.startswith(n + ".")) != suffixes:
                    raise UnsupportedError(f"{fused} of {prefix!r}: {', '.join(parts)} are not quantized alike, "
                                           "so they cannot be stored as one fused linear")
            for s in suffixes:
                ts = [out.pop(f"{n}.{s}") for n in names]
                if s == "weight_shape":
                    joined = torch.tensor([sum(int(t[0]) for t in ts), int(ts[0][1])], dtype=ts[0].dtype)
                elif s == "weight_zero_point":
                    rows = group.rows(cfg)
                    codes = [unpack_int32(t, bits, r, dim=0) for t, r in zip(ts, rows)]
                    joined = pack_int32(torch.cat(codes), bits, dim=0)
                elif s == "input_scale":
                    if not all(torch.equal(t, ts[0]) for t in ts):
                        raise UnsupportedError(f"{fused} of {prefix!r}: the static input scales of "
                                               f"{', '.join(parts)} differ; one fused linear has one")
                    joined = ts[0]
                else:
                    joined = torch.cat(ts)
                out[f"{prefix}{fused}.{s}"] = joined
    return out


def split_compressed(cfg: LlamaConfig, state: dict[str, torch.Tensor], bits: int,
                     where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's fused names → our separate projections (other families: unchanged)."""
    out = dict(state)
    for group in cfg.family.fused:
        fused, parts, rows = group.name, group.parts, group.rows(cfg)
        for key in [k for k in state if ("." + fused + ".") in k]:
            prefix, s = key.split(fused + ".")
            t = out.pop(key)
            if s == "weight_shape":
                pieces = [torch.tensor([r, int(t[1])], dtype=t.dtype) for r in rows]
            elif s == "weight_zero_point":
                codes = unpack_int32(t, bits, sum(rows), dim=0)
                pieces = [pack_int32(c, bits, dim=0) for c in codes.split(rows)]
            elif s == "input_scale":
                pieces = [t] * len(parts)
            else:
                if t.shape[0] != sum(rows):
                    raise CheckpointError(f"{where}: {key!r} has {t.shape[0]} rows; the config implies {sum(rows)}")
                pieces = list(t.split(rows))
            out.update({f"{prefix}{p}.{s}": piece.contiguous() for p, piece in zip(parts, pieces)})
    return out


def fused_module_name(cfg: LlamaConfig, name: str) -> str:
    """A module's name in the checkpoint: fused parts (Phi-3's q/k/v and gate/up) under their fused linear."""
    for group in cfg.family.fused:
        for p in group.parts:
            if name.endswith("." + p):
                return name[: -len(p)] + group.name
    return name
