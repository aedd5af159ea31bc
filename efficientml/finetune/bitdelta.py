"""BitDelta (Liu et al. 2024): a fine-tune stored as its weight delta's sign plus one scale per matrix.

For every linear of the base (``nn.Linear``, matched by name in the fine-tuned model)::

    Δ = W_ft − W_base               (out, in)
    Δ̂ = α · sign(Δ)                 sign(0) = +1; α initialised to mean |Δ| (the L2-optimal scale for a
                                     fixed sign matrix), then distilled (bitdelta_serve.distill_scales)

Storage per matrix: the signs packed 8 to a byte (uint8, ``ceil(out·in / 8)`` bytes, bit i of byte j is
element 8j + i of the row-major flattening, 1 for +), and α in fp32. Parameters that are not linear
weights (norms, biases, an untied embedding) and differ are kept as dense fp16 deltas, counted in
the size. The size ratio against an fp16 delta is ≈ 16 for a large matrix.

    delta = compress_delta(base, finetuned)             # BitDelta
    delta.size_report()                                 # bytes, fp16 bytes, ratio
    delta.save("chat.bitdelta.safetensors"); BitDelta.load(...)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from efficientml.core.errors import CheckpointError, ConfigError, ShapeError

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """(…) float → (ceil(n/8),) uint8: 1 bit per element, 1 for ≥ 0, low bit first."""
    bits = (delta.detach().reshape(-1) >= 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)  # (n/8, 8)
    return (bits * _BITS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`pack_signs`: ±1 in ``dtype`` with ``shape``."""
    n = 1
    for s in shape:
        n *= s
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ShapeError(f"packed signs must be {(n + 7) // 8} uint8 bytes for shape {tuple(shape)}, got "
                         f"{packed.numel()} of {packed.dtype}")
    bits = (packed.unsqueeze(1) & _BITS.to(packed.device)) != 0  # (n/8, 8) bool
    return (bits.reshape(-1)[:n].to(dtype) * 2 - 1).view(shape)


@dataclass
class BitDelta:
    """One fine-tune over a base: ``signs``/``shapes``/``scales`` per linear weight name (``….weight``),
    ``dense`` fp16 deltas for other changed parameters."""

    signs: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    scales: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """α · sign(Δ) of one matrix, (out, in)."""
        return unpack_signs(self.signs[name], self.shapes[name], dtype) * self.scales[name].to(dtype)

    def size_report(self) -> dict[str, float]:
        """Bytes stored vs the same delta in fp16: the linears alone and everything."""
        packed = sum(s.numel() for s in self.signs.values()) + 4 * len(self.scales)
        fp16 = sum(2 * a * b for a, b in self.shapes.values())
        dense = sum(2 * d.numel() for d in self.dense.values())
        return {"linears": len(self.signs), "packed_bytes": packed, "fp16_delta_bytes": fp16,
                "size_ratio": fp16 / max(1, packed), "dense_bytes": dense,
                "size_ratio_total": (fp16 + dense) / max(1, packed + dense)}

    def save(self, path: str | os.PathLike) -> None:
        from efficientml.core.serialization import save_state_dict

        state = {f"signs:{k}": v for k, v in self.signs.items()}
        state.update({f"scale:{k}": v.detach().float().reshape(1) for k, v in self.scales.items()})
        state.update({f"dense:{k}": v.half() for k, v in self.dense.items()})
        save_state_dict(path, state, metadata={"format": "efficientml.bitdelta",
                                               "shapes": json.dumps({k: list(v) for k, v in self.shapes.items()})})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitDelta":
        from efficientml.core.serialization import load_state_dict, read_metadata

        meta = read_metadata(path)
        if meta.get("format") != "efficientml.bitdelta":
            raise CheckpointError(f"{str(path)!r} is not a BitDelta file (no format=efficientml.bitdelta "
                                  "metadata); expected one written by BitDelta.save")
        shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
        state = load_state_dict(path)
        part = lambda p: {k[len(p):]: v for k, v in state.items() if k.startswith(p)}  # noqa: E731
        return cls(part("signs:"), shapes, {k: v[0] for k, v in part("scale:").items()}, part("dense:"))


def _linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def compress_delta(base: nn.Module, finetuned: nn.Module) -> BitDelta:
    """The BitDelta of ``finetuned`` over ``base`` (same architecture, plain float linears: merge a LoRA
    fine-tune with ``merge_and_unload`` first)."""
    b_params, f_params = dict(base.named_parameters()), dict(finetuned.named_parameters())
    if set(b_params) != set(f_params):
        diff = sorted(set(b_params) ^ set(f_params))[:3]
        raise ConfigError(f"the fine-tuned model's parameters do not match the base's (e.g. {diff}); "
                          "BitDelta needs the same architecture (merge_and_unload a LoRA model first)")
    lin = _linear_weights(base)
    signs, shapes, scales, dense = {}, {}, {}, {}
    for k, wb in b_params.items():
        wf = f_params[k]
        if wf.shape != wb.shape:
            raise ShapeError(f"{k}: the fine-tuned weight has shape {tuple(wf.shape)}, the base's {tuple(wb.shape)}")
        d = wf.float() - wb.float()
        if k in lin and d.dim() == 2:
            signs[k], shapes[k] = pack_signs(d), tuple(d.shape)
            scales[k] = d.abs().mean()
        elif d.abs().max() > 0:
            dense[k] = d.half()
    return BitDelta(signs, shapes, scales, dense)
