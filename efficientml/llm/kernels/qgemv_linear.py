"""``QGemvLinear``: a quantized linear stored in the CPU kernel's own layout (:class:`~.cpu_qgemv.QWeight`)
and run on it for any number of input rows, and ``PackedQGemv``: q/k/v or gate/up of one block as one
kernel call (their weights become row views of one buffer: no copy kept twice).

Built from a :class:`~.qlinear.QuantLinear` (W4/W8, groups of 32·k, symmetric or not), a dynamic
:class:`~.qlinear.W8A8Linear`, GGUF Q4_0/Q4_1/Q8_0 blocks, or a float ``nn.Linear`` quantized to
Q8_0/Q4_0-style blocks (``from_linear``: for the tied output matrix, as llama.cpp's quantizer does).
The codes are re-laid, never dequantized. Activations are quantized to int8 per block of 32 inside
the kernel (W4A8 / W8A8 arithmetic; outputs differ from dequantize + matmul by that rounding).

These modules are for running: their buffers (``qs``, ``d``, ``m``) are not a checkpoint format —
save before :func:`~.decode.use_cpu_qgemv`.
"""

from __future__ import annotations

import torch
from torch import nn

from efficientml.core.errors import ShapeError
from efficientml.llm.kernels import cpu_qgemv
from efficientml.llm.kernels.cpu_qgemv import QK, QWeight
from efficientml.llm.kernels.qlinear import QuantLinear, W8A8Linear


def convertible(mod: nn.Module) -> str | None:
    """None when ``mod`` can become a QGemvLinear, else one line saying why not."""
    if isinstance(mod, W8A8Linear):
        if mod.act != "dynamic":
            return "W8A8 with a static activation scale (the kernel quantizes activations per block of 32)"
        return None if mod.in_features % QK == 0 else f"{mod.in_features} inputs are not a multiple of {QK}"
    if not isinstance(mod, QuantLinear):
        return f"{type(mod).__name__} is not a quantized linear"
    g = mod.in_features // mod.weight_scale.shape[1]
    if mod.spec.bits not in (4, 8):
        return f"{mod.spec.bits}-bit weights (the kernel takes 4 or 8 bits)"
    if g % QK:
        return f"groups of {g} (the kernel takes groups of a multiple of {QK})"
    return None


class QGemvLinear(nn.Module):
    """``y = x @ dequant(W)ᵀ + b`` on :func:`~.cpu_qgemv.qgemv` (CPU, activations int8 per block)."""

    def __init__(self, w: QWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.bits = w.bits
        self.register_buffer("qs", w.qs)
        self.register_buffer("d", w.d)
        self.register_buffer("m", w.m)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def qweight(self) -> QWeight:
        return QWeight(self.qs, self.d, self.m, self.bits)

    @classmethod
    def from_module(cls, mod: nn.Module) -> "QGemvLinear":
        """A QuantLinear / dynamic W8A8Linear (see :func:`convertible`) in the kernel's layout."""
        why = convertible(mod)
        if why is not None:
            raise ShapeError(f"cannot run {type(mod).__name__} on the quantized CPU kernel: {why}")
        if isinstance(mod, W8A8Linear):
            s = mod.weight_scale.float().view(-1, 1).expand(-1, mod.in_features // QK).contiguous()
            return cls(QWeight(mod.weight.contiguous(), s, None, 8), mod.bias)
        zero = None if mod.weight_zero_point is None else mod.zeros()
        w = cpu_qgemv.pack_codes(mod.codes(), mod.weight_scale, zero, mod.spec.bits)
        return cls(w, mod.bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, bits: int = 8) -> "QGemvLinear":
        """A float linear quantized round-to-nearest into symmetric blocks of 32 with fp16 scales: 8 bits as
        GGUF's Q8_0 (d = max|w| / 127), 4 bits as Q4_0 (d = the weight of largest magnitude / −8)."""
        w = lin.weight.detach().float()
        out, K = w.shape
        if K % QK:
            raise ShapeError(f"{K} inputs are not a multiple of {QK}")
        wb = w.view(out, K // QK, QK)
        if bits == 8:
            d = (wb.abs().amax(-1) / 127).half().float()
            q = torch.round(wb / torch.where(d > 0, d, 1)[..., None]).clamp(-127, 127)
            return cls(QWeight(q.to(torch.int8).view(out, K), d, None, 8), lin.bias)
        idx = wb.abs().argmax(-1, keepdim=True)
        d = (wb.gather(-1, idx)[..., 0] / -8).half().float()
        q = torch.round(wb / torch.where(d != 0, d, 1)[..., None] + 8).clamp(0, 15).to(torch.uint8)
        return cls(cpu_qgemv.pack_codes(q.view(out, K), d, None, 4), lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_qgemv.qgemv_parts(x, self.qs, self.d, self.m, self.bias, self.bits)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"{'offset' if self.m is not None else 'symmetric'} blocks of {QK}")


class PackedQGemv(nn.Module):
    """q/k/v (or gate/up) QGemvLinears of one block as one kernel call: :meth:`pack` concatenates their
    buffers and makes each module's a row view of the result (names and bytes unchanged). Called as
    ``packed(x, mods)`` by the block (the model's ``fused_call``); None when ``mods`` are no longer the
    packed modules (one was swapped), so they run separately."""

    def __init__(self, mods: tuple[QGemvLinear, ...]) -> None:
        super().__init__()
        self.sizes = [m.out_features for m in mods]
        self.bits = mods[0].bits
        cat = {k: None if getattr(mods[0], k) is None else torch.cat([getattr(m, k) for m in mods])
               for k in ("qs", "d", "m", "bias")}
        o = 0
        for mod, n in zip(mods, self.sizes):
            for k, t in cat.items():
                setattr(mod, k, None if t is None else t[o:o + n])
            o += n
        self.qs, self.d, self.m, self.bias = cat["qs"], cat["d"], cat["m"], cat["bias"]
        self.ptrs = tuple(m.qs.data_ptr() for m in mods)

    @staticmethod
    def packable(mods: tuple[nn.Module, ...]) -> bool:
        if not all(type(m) is QGemvLinear for m in mods):
            return False
        first = mods[0]
        return all(m.bits == first.bits and (m.m is None) == (first.m is None) and (m.bias is None) ==
                   (first.bias is None) and m.in_features == first.in_features for m in mods)

    def forward(self, x: torch.Tensor, mods: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
        if not torch.compiler.is_compiling():  # data_ptr is not traceable; checked in eager calls
            if not all(type(m) is QGemvLinear for m in mods) or tuple(m.qs.data_ptr() for m in mods) != self.ptrs:
                return None
        y = cpu_qgemv.qgemv_parts(x, self.qs, self.d, self.m, self.bias, self.bits)
        return y.split(self.sizes, dim=-1)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, bits={self.bits}"
