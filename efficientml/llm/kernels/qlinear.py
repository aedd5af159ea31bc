"""Real quantized linears, drop-in for ``nn.Linear`` (called as ``module(x)``).

- :class:`QuantLinear` — W{2..8}A16: packed int32 codes (compressed-tensors layout), fp16 group scales
  and packed zero points. CPU, fp32/bf16/fp16 inputs: 4 bits with groups of 32/64/128/256 run on
  torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``, the one torchao's int4 weight-only path
  uses), on a copy of the weight in its tile layout built on the first such call (as many bytes as
  ``weight_packed``; scales and float zeros ``(8 − z)·s`` in the input's dtype, so fp32 inputs match
  fake quantization to fp32 rounding and bf16 ones to bf16 precision; the kernels are vectorized for
  bf16 only: the "bf16" swap of :mod:`.qlinear_kernels` computes fp32/fp16 inputs in bf16, ~15× faster;
  decoding runs :mod:`.cpu_qgemv` instead where it builds); 8 bits per channel run on
  torch's int8 weight-only kernel (``_weight_int8pack_mm``, on an int8 copy ``u − 128``: one byte per
  weight, plus a Σx correction for asymmetric zeros). Anything else, and CUDA: dequantize on the fly
  into ``x.dtype`` and run one GEMM (the dense weight lives for one call). Other kernel choices are
  module swaps (:mod:`.qlinear_kernels`: the fused Triton kernel on CUDA, or dequantize + GEMM always).
- :class:`W8A8Linear` — int8 per-channel symmetric weights, int8 activations (per-token dynamic or
  per-tensor static scales). CUDA: ``torch._int_mm`` (int32 accumulation); CPU: the integer product in
  fp32 (this torch build's CPU ``_int_mm`` runs at ~0.3 GFLOP/s, ~20–50× slower than fp32 GEMM), i.e.
  the same integers, exact up to fp32 summation for K ≤ 1024 and ≤ 1 ulp-level drift beyond.

State-dict names equal the checkpoint's (``weight_packed``, ``weight_scale``, ``weight_zero_point``,
``weight_shape``; ``weight``/``weight_scale``/``input_scale`` for W8A8), so loading is
``load_state_dict(assign=True)`` onto modules built on the meta device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efficientml.quant.grid import GridSpec, QTensor, dequantize_codes, quantize
from efficientml.quant.packing import pack_int32, packed_words, unpack_int32

_W8_CHANNEL = GridSpec(8, symmetric=True, granularity="channel", narrow=True)  # W8A8 weights

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # torch's int4/int8 CPU kernels take these


class QuantLinear(nn.Module):
    """Weight-only quantized linear; ``out = x @ dequant(W).T + b``."""

    def __init__(self, in_features: int, out_features: int, spec: GridSpec, bias: bool = False,
                 device: torch.device | str | None = None, scale_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        g = spec.group_len(in_features)
        G = in_features // g
        kw = {"device": device}
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_words(in_features, spec.bits),
                                                          dtype=torch.int32, **kw))
        self.register_buffer("weight_scale", torch.zeros(out_features, G, dtype=scale_dtype, **kw))
        if not spec.symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(packed_words(out_features, spec.bits), G,
                                                                  dtype=torch.int32, **kw))
        else:
            self.weight_zero_point = None
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64,
                                                          device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: QTensor, bias: torch.Tensor | None = None,
                       scale_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        out, n = qw.codes.shape
        m = cls(n, out, qw.spec, bias is not None, device=qw.codes.device, scale_dtype=scale_dtype)
        m.weight_packed = pack_int32(qw.codes, qw.spec.bits)
        m.weight_scale = qw.scale.to(scale_dtype)
        if not qw.spec.symmetric:
            m.weight_zero_point = pack_int32(qw.zero.to(torch.uint8), qw.spec.bits, dim=0)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def codes(self) -> torch.Tensor:
        return unpack_int32(self.weight_packed, self.spec.bits, self.in_features)  # (out, in) uint8

    def zeros(self) -> torch.Tensor:
        if self.weight_zero_point is None:
            return torch.full(self.weight_scale.shape, 1 << (self.spec.bits - 1), dtype=torch.int32,
                              device=self.weight_scale.device)
        return unpack_int32(self.weight_zero_point, self.spec.bits, self.out_features, dim=0).to(torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n = self.out_features, self.in_features
        G = self.weight_scale.shape[1]
        u = self.codes()
        if dtype == torch.float32 or u.device.type == "cpu":  # fp32 math == fake-quant exactly
            return dequantize_codes(u, self.weight_scale, self.zeros(), dtype)
        z = self.zeros()[..., None]
        s = self.weight_scale.float()[..., None]
        return ((u.view(out, G, n // G).to(dtype) - z.to(dtype)) * s.to(dtype)).view(out, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in CPU_KERNEL_DTYPES:
            if self._cpu_int4_ok():
                return self.cpu_int4_matmul(x)
            if self._cpu_int8_ok():
                return self.cpu_int8_matmul(x)
        return self.dequant_matmul(x)

    def dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: dequantize into ``x.dtype``, one GEMM."""
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def cpu_int4_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """CPU inputs (fp32/bf16/fp16) on torch's int4 kernel (W4, groups of 32/64/128/256:
        :meth:`_cpu_int4_ok`); it reads the 4-bit tile layout, never a float copy of the weight."""
        w, sz = self._cpu_int4_weight(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), w,
                                                       self.in_features // self.weight_scale.shape[1], sz)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def cpu_int8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """CPU inputs on torch's int8 weight-only kernel (W8 per channel: :meth:`_cpu_int8_ok`):
        y = x·(u − 128)ᵀ·s + Σx·(128 − z)·s, the second term only for asymmetric grids."""
        w, s, c = self._cpu_int8_weight(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(x2, w, s)  # (M, out)
        if c is not None:
            y = y + x2.sum(-1, keepdim=True) * c
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _cpu_int4_ok(self) -> bool:
        g = self.in_features // self.weight_scale.shape[1]
        return (self.spec.bits == 4 and g in (32, 64, 128, 256) and self.out_features % 16 == 0  # torch packs N in 16s
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))

    def _cpu_int8_ok(self) -> bool:
        return (self.spec.bits == 8 and self.weight_scale.shape[1] == 1
                and hasattr(torch.ops.aten, "_weight_int8pack_mm"))

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        """Changes when a buffer is replaced or written in place (``load_state_dict`` copies in place)."""
        return (dtype,) + tuple((t.data_ptr(), t._version) for t in
                                (self.weight_packed, self.weight_scale, self.weight_zero_point) if t is not None)

    def _cpu_int4_weight(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight in the int4 CPU kernel's layout: (packed codes, (G, out, 2) scale and zero in
        ``dtype``); the codes are shared by every dtype, the (small) scales are kept per dtype."""
        key = self._cache_key(dtype)
        cache = getattr(self, "_int4_cache", None)
        if cache is None or cache[0] != key[1:]:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
            cache = self._int4_cache = (key[1:], w, {})
        if dtype not in cache[2]:
            s = self.weight_scale.float()                          # (out, G)
            z = (8.0 - self.zeros().float()) * s                   # (u − z)·s = (u − 8)·s + (8 − z)·s
            cache[2][dtype] = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(dtype)  # (G, out, 2)
        return cache[1], cache[2][dtype]

    def _cpu_int8_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(out, in) int8 codes u − 128 (one byte per weight, as ``weight_packed``), scales (out,) in
        ``dtype`` and, for asymmetric grids, the zero correction (1, out) (None when z = 128)."""
        key = self._cache_key(dtype)
        cache = getattr(self, "_int8_cache", None)
        if cache is None or cache[0] != key:
            w = (self.codes().to(torch.int16) - 128).to(torch.int8).contiguous()
            s = self.weight_scale.float()[:, 0]                    # (out,)
            z = self.zeros().float()[:, 0]
            c = None if self.weight_zero_point is None else ((128.0 - z) * s).to(dtype)[None]
            cache = self._int8_cache = (key, w, s.to(dtype), c)
        return cache[1], cache[2], cache[3]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in={self.in_features}, out={self.out_features}, bits={s.bits}, "
                f"group={s.group_size or 'channel'}, {'sym' if s.symmetric else 'asym'}")


def quantize_act_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x ≈ q · s; q (…, K) int8 in [−127, 127], s (…, 1) fp32."""
    s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s


def quantize_act_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale.float()).clamp(-127, 127).to(torch.int8)


def _int_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    M, K = x.shape
    return x.is_cuda and hasattr(torch, "_int_mm") and M > 16 and K % 8 == 0 and w.shape[0] % 8 == 0


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """xq (M, K) int8 @ wq (N, K)ᵀ int8 → (M, N) fp32 (int32-accurate on CUDA)."""
    if backend == "int_mm" or (backend == "auto" and _int_mm_ok(xq, wq)):
        return torch._int_mm(xq, wq.t()).float()
    return xq.float() @ wq.float().t()


class W8A8Linear(nn.Module):
    """int8 weights (per output channel, symmetric) × int8 activations. ``act="dynamic"``: one scale per
    token computed at run time; ``act="static"``: one calibrated per-tensor scale (``input_scale``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, act: str = "dynamic",
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features, self.act, self.backend = in_features, out_features, act, backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if act == "static":
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, act: str = "dynamic", input_scale: float | None = None,
                    backend: str = "auto") -> "W8A8Linear":
        w = lin.weight.detach().float()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, device=w.device, backend=backend)
        qt = quantize(w, _W8_CHANNEL)                 # the shared grid: per channel, symmetric [-127, 127]
        m.weight, m.weight_scale = qt.q, qt.scale     # (out, in) int8, (out, 1) fp32
        if act == "static":
            if input_scale is None:
                raise ValueError("a static W8A8 linear needs a calibrated input_scale")
            m.input_scale = torch.tensor([float(input_scale)], device=w.device)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if self.act == "static":
            xs = self.input_scale.float().view(1, 1)
            xq = quantize_act_static(x2, xs)
        else:
            xq, xs = quantize_act_per_token(x2)  # (M, K) int8, (M, 1)
        y = int8_matmul(xq, self.weight, self.backend) * xs * self.weight_scale.view(1, -1)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.act}"


@torch.no_grad()
def install_quantized(parent: nn.Module, name: str, qw: QTensor, pack: bool = True) -> nn.Module:
    """Put ``qw`` in place of the linear ``parent.<name>``: a :class:`QuantLinear` (real, packed) or,
    with ``pack=False``, the same linear holding the dequantized weights (fake quantization)."""
    from efficientml.core.modules import get_module, set_module

    lin = get_module(parent, name)
    if not pack:
        lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
        return lin
    new = QuantLinear.from_quantized(qw, None if lin.bias is None else lin.bias.detach())
    set_module(parent, name, new)
    return new
