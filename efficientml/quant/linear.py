"""Linear (affine) quantization: r = S·(q − Z), and VS-Quant two-level scales.

The grid itself — the spec, scales and zero points per tensor / channel / group, quantize-to-codes,
dequantize and fake-quantize — lives in :mod:`efficientml.quant.grid` (``GridSpec``, ``quantize``,
``fake_quantize``), shared with the LLM code. This module adds VS-Quant: small unsigned integer
scales per vector of inputs under one float scale per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.errors import ShapeError
from efficientml.quant.grid import qrange
__all__ = ["VSQuantTensor", "vsquant"]


# ------------------------------------------------------------------------------------------------
# VS-Quant: two-level scales
# ------------------------------------------------------------------------------------------------
@dataclass
class VSQuantTensor:
    q: torch.Tensor              # (C, K) int codes, symmetric
    vector_scale: torch.Tensor   # (C, K/V) unsigned integers in [1, 2^scale_bits − 1]
    channel_scale: torch.Tensor  # (C,) float
    bits: int
    scale_bits: int
    vector_size: int
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        c = self.q.shape[0]
        qv = self.q.float().reshape(c, -1, self.vector_size)
        s = self.vector_scale.float().unsqueeze(-1) * self.channel_scale.view(c, 1, 1)
        return (qv * s).reshape(self.shape)

    def storage_bits(self) -> int:
        return self.q.numel() * self.bits + self.vector_scale.numel() * self.scale_bits + 32 * self.channel_scale.numel()


def vsquant(w: torch.Tensor, bits: int = 4, vector_size: int = 16, scale_bits: int = 4) -> VSQuantTensor:
    """Per-vector scales quantized to ``scale_bits``-bit unsigned integers under a per-channel float scale
    (Dai et al. 2021): s_v = s_int[v] · γ_c with γ_c = max_v(s_v) / (2^scale_bits − 1)."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    if flat.shape[1] % vector_size:
        raise ShapeError(f"vector size {vector_size} does not divide the {flat.shape[1]} inputs per output "
                         f"channel of a tensor of shape {tuple(w.shape)}")
    _, qmax = qrange(bits, True, narrow=True)
    v = flat.reshape(flat.shape[0], -1, vector_size)                  # (C, K/V, V)
    s_vec = v.abs().amax(-1) / qmax                                    # ideal float scale per vector
    smax = 2 ** scale_bits - 1
    gamma = torch.clamp(s_vec.amax(-1) / smax, min=1e-12)             # (C,)
    s_int = torch.clamp(torch.ceil(s_vec / gamma.unsqueeze(-1)), 1, smax)  # ceil: never clip
    s = s_int * gamma.unsqueeze(-1)
    q = torch.clamp(torch.round(v / s.unsqueeze(-1)), -qmax, qmax)
    return VSQuantTensor(q.reshape(flat.shape).to(torch.int8), s_int.to(torch.uint8), gamma, bits,
                         scale_bits, vector_size, tuple(w.shape))
