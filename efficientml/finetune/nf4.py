"""The QLoRA base: a linear whose frozen weight is stored as packed NF4 (Dettmers et al. 2023).

Storage, for a weight of n = out·in elements, blocks of ``block`` (64) along the flattened rows:

    codes        uint8 (n/2,)           two 4-bit indices into the 16 NF4 levels per byte, low nibble first
    absmax       one per block, double-quantized (``double_quant``):
      absmax_q       int8 (n/64,)       round((absmax − offset) / scale2), symmetric per 256 blocks
      absmax_scale   fp32 (n/64/256,)   scale2 = max |absmax − offset| / 127 per 256 blocks
      absmax_offset  fp32 ()            the mean absmax (the values are positive; centring them uses
                                        the int8 range on both sides)
    → 4 + 8/64 + 32/(64·256) ≈ 4.13 bits per weight (fp32 absmax without double quantization: 4.5)

The weight is dequantized on the fly in every forward *and again in backward* (a custom autograd
function saves only the input), so no float copy of a frozen weight outlives its matmul: training
memory holds the packed codes, not the weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ShapeError
from efficientml.quant.formats import nf4_values


def _pair_table() -> torch.Tensor:
    """(256, 2): the two NF4 levels a byte holds (low nibble, high nibble)."""
    lv = nf4_values().float()
    b = torch.arange(256)
    return torch.stack((lv[b & 15], lv[b >> 4]), dim=1)


_PAIRS = _pair_table()
_MID = (nf4_values().float()[1:] + nf4_values().float()[:-1]) / 2  # decision boundaries between levels


def quantize_absmax(absmax: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: absmax (nb,) → int8 codes (nb,), fp32 scales (ceil(nb/block),), fp32 offset."""
    offset = absmax.mean()
    c = absmax - offset
    nb = c.numel()
    pad = (-nb) % block
    cb = F.pad(c, (0, pad)).view(-1, block)  # (nb/256, 256)
    scale = (cb.abs().amax(1) / 127.0).clamp(min=1e-12)
    q = torch.round(cb / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[:nb]
    return q, scale, offset


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, block: int = 256) -> torch.Tensor:
    nb = q.numel()
    s = scale.repeat_interleave(block)[:nb]
    return q.float() * s + offset


class NF4Linear(nn.Module):
    """A frozen linear in packed NF4 (see the module docstring); ``dequantize()`` gives its weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, block: int = 64,
                 double_quant: bool = True, scale_block: int = 256) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        n = weight.numel()
        if n % block or block % 2:
            raise ShapeError(f"NF4 needs the weight's {n} elements to be a multiple of the (even) block size "
                             f"{block}; got a weight of shape {tuple(weight.shape)}")
        self.block, self.scale_block, self.double_quant = block, scale_block, double_quant
        wb = weight.detach().float().reshape(-1, block)  # (n/64, 64)
        absmax = wb.abs().amax(1)
        if double_quant:
            q, s, off = quantize_absmax(absmax, scale_block)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", s)
            self.register_buffer("absmax_offset", off)
            absmax = dequantize_absmax(q, s, off, scale_block)  # codes chosen against the stored scale
        else:
            self.register_buffer("absmax", absmax)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        idx = torch.bucketize(wb / safe[:, None], _MID).to(torch.uint8).view(-1, 2)  # nearest level
        self.register_buffer("codes", idx[:, 0] | (idx[:, 1] << 4))  # (n/2,) uint8
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "NF4Linear":
        return cls(linear.weight, linear.bias, **kw)

    def block_absmax(self) -> torch.Tensor:
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_offset, self.scale_block)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) in ``dtype``."""
        pairs = torch.index_select(_PAIRS.to(self.codes.device), 0, self.codes.int())  # (n/2, 2)
        w = pairs.view(-1, self.block) * self.block_absmax()[:, None]  # (n/64, 64)
        return w.view(self.out_features, self.in_features).to(dtype)

    def nbytes(self) -> int:
        """Bytes of the packed weight (codes + scales), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"double_quant={self.double_quant}")


class _NF4Matmul(torch.autograd.Function):
    """x @ Wᵀ with W dequantized in forward and again in backward; only x's shape is kept for backward
    (the base is frozen, so no gradient for W and no saved input is needed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g @ ctx.layer.dequantize(g.dtype), None  # (…, out) @ (out, in)
