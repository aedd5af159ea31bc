"""Quantized matrix products on CPU (``csrc/qgemv.c``): 4- or 8-bit weights in blocks of 32, int8
activations per block of 32, an integer dot product in the inner loop, OpenMP threads each streaming
a contiguous block of weight rows. Any number of input rows (one weight pass for all of them).

The weight layout is :class:`QWeight`: ``qs`` (out, K/2) bytes for 4 bits (GGUF's Q4 nibble order) or
(out, K) int8 for 8 bits, fp32 block scales ``d`` (out, K/32) and optional offsets ``m``: w = d·q + m
(without m: 4-bit codes centred on 8 as in Q4_0, 8-bit ones on 0).
:func:`pack_codes` builds it from compressed-tensors codes (our QuantLinear: any group of 32·k,
symmetric or not), :func:`pack_ggml` from GGUF Q4_0 / Q4_1 / Q8_0 blocks — integers stay integers.

The instruction set is chosen at run time from the CPU's flags: AVX-512 VNNI (``csrc/qgemv_avx512.h``:
two blocks per register, one vpdpbusd each) where the CPU has AVX512F/BW/VL + VNNI and K is a multiple
of 64, else AVX2 (+FMA), else portable C. ``EFFICIENTML_CPU_ISA=portable`` / ``=avx2`` / ``=avx512vnni``
force one (refused where the CPU lacks it); :func:`status` says which runs. (No AMX tile path yet.)
``EFFICIENTML_CPU_GEMV=0`` turns this kernel off with the fp32 one.

:func:`qgemv` is also the op ``torch.ops.efficientml.qgemv`` so a compiled decode step calls it as one
opaque extern call.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.llm.kernels import cpu_gemv, gemv_op

SOURCE = Path(__file__).with_name("csrc") / "qgemv.c"
QK = 32  # weights per block
ISAS = ("auto", "avx512vnni", "avx2", "portable")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn", "isa" (0 portable, 1 AVX2, 2 AVX-512 VNNI), "status"


def _choose_isa(has_avx2: bool, has_vnni512: bool = False) -> tuple[int, str]:
    """The instruction set from ``EFFICIENTML_CPU_ISA`` (auto: the best this CPU has) → (isa, name)."""
    want = os.environ.get("EFFICIENTML_CPU_ISA", "auto").strip().lower() or "auto"
    if want not in ISAS:
        raise ConfigError(f"EFFICIENTML_CPU_ISA must be one of {', '.join(ISAS)}, got {want!r}")
    if want == "avx512vnni" and not has_vnni512:
        raise ConfigError("EFFICIENTML_CPU_ISA=avx512vnni but this CPU has no AVX-512 VNNI; use auto, avx2 or portable")
    if want == "avx2" and not has_avx2:
        raise ConfigError("EFFICIENTML_CPU_ISA=avx2 but this CPU has no AVX2+FMA; use auto or portable")
    if want in ("auto", "avx512vnni") and has_vnni512 and has_avx2:
        return 2, "avx512vnni (K a multiple of 64; other K: avx2)"
    if want != "portable" and has_avx2:
        return 1, "avx2"
    return 0, f"portable C ({'forced' if want == 'portable' else 'no AVX2 here'})"


def _load():
    if "fn" in _state:
        return _state["fn"]
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, isa = None, 0
        dll, status = cpu_gemv.open_library(SOURCE)
        if dll is not None:
            fn = cpu_gemv.bind(dll, "efficientml_qgemv", [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3
                               + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2)
            isa, name = _choose_isa(bool(dll.efficientml_qgemv_has_avx2()), bool(dll.efficientml_qgemv_has_avx512vnni()))
            status = f"on ({name}; {status})"
        _state.update(fn=fn, isa=isa, status=status)
        return fn


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def status() -> str:
    """One line: on (instruction set, compiler, flags, library) or off (why)."""
    _load()
    return str(_state["status"])


def reset() -> None:
    """Forget the loaded kernel and the instruction-set choice (tests set EFFICIENTML_CPU_ISA, then call this)."""
    with _lock:
        _state.clear()


@dataclass
class QWeight:
    """A weight in the kernel's layout: w[o, 32b + j] = d[o, b]·q + m[o, b]; m None: codes centred on 8
    (4 bits, Q4_0's d·(q − 8)) or 0 (8 bits)."""

    qs: torch.Tensor  # (out, K/2) uint8 (4 bits) or (out, K) int8 (8 bits)
    d: torch.Tensor  # (out, K/32) float32
    m: torch.Tensor | None  # (out, K/32) float32
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * QK

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def codes(self) -> torch.Tensor:
        """(out, K) integer codes q (0…15 for 4 bits, int8 for 8) in weight order."""
        if self.bits == 8:
            return self.qs.to(torch.int16)
        out, K = self.shape
        b = self.qs.view(out, K // QK, QK // 2).to(torch.int16)
        return torch.cat([b & 0x0F, b >> 4], -1).view(out, K)

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 (out, K): for tests and reference paths only."""
        out, K = self.shape
        q = self.codes().float().view(out, K // QK, QK)
        if self.m is None:
            return ((q - 8 if self.bits == 4 else q) * self.d[..., None]).view(out, K)
        w = q * self.d[..., None] + self.m[..., None]
        return w.view(out, K)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, K) codes 0…15 → (out, K/2) bytes, byte j of a block = q[j] | q[j + 16] << 4."""
    out, K = codes.shape
    c = codes.to(torch.uint8).view(out, K // QK, 2, QK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(out, K // 2).contiguous()


def pack_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> QWeight:
    """Compressed-tensors codes u (out, K) in [0, 2^bits), group scales s (out, G) and integer zero
    points z (out, G) (None: symmetric, z = 2^(bits−1)), w = (u − z)·s, groups of 32·k → QWeight."""
    out, K = codes.shape
    G = scale.shape[1]
    if bits not in (4, 8) or K % G or (K // G) % QK:
        raise ShapeError(f"the quantized kernel takes 4 or 8 bits in groups of a multiple of {QK}; got "
                         f"{bits} bits, groups of {K // max(G, 1)} over {K} inputs")
    rep = K // G // QK
    s = scale.float().repeat_interleave(rep, 1).contiguous()  # (out, K/32)
    z = torch.full_like(s, 1 << (bits - 1)) if zero is None else zero.float().repeat_interleave(rep, 1)
    if bits == 4:
        m = None if zero is None or bool((z == 8).all()) else (-z * s).contiguous()
        return QWeight(_nibbles(codes), s, m, 4)
    q = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()  # w = (q + 128 − z)·s
    m = ((128 - z) * s).contiguous()
    return QWeight(q, s, None if bool((m == 0).all()) else m, 8)


GGML_KINDS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}  # block bytes, bits


def pack_ggml(kind: str, raw: np.ndarray | bytes, shape: tuple[int, int]) -> QWeight:
    """GGUF blocks (``raw``: the tensor's bytes, rows of K/32 blocks) of ``kind`` Q4_0 / Q4_1 / Q8_0 for an
    (out, K) matrix → QWeight, the codes copied as they are."""
    if kind not in GGML_KINDS:
        raise ShapeError(f"the quantized kernel reads GGUF Q4_0, Q4_1 or Q8_0 blocks, not {kind}")
    size, bits = GGML_KINDS[kind]
    out, K = shape
    blk = np.frombuffer(raw, dtype=np.uint8).reshape(out, K // QK, size)
    d = torch.from_numpy(blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "Q8_0":
        qs = torch.from_numpy(blk[..., 2:].copy().view(np.int8).reshape(out, K))
        return QWeight(qs, d, None, 8)
    if kind == "Q4_1":
        m = torch.from_numpy(blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        return QWeight(torch.from_numpy(blk[..., 4:].copy().reshape(out, K // 2)), d, m, 4)
    return QWeight(torch.from_numpy(blk[..., 2:].copy().reshape(out, K // 2)), d, None, 4)


def _impl(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
          bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    fn = _state.get("fn") or _load()  # no lock on the decode path once built
    if fn is None:
        raise RuntimeError(f"the quantized CPU kernel is {status()}")
    out, K = d.shape[0], d.shape[1] * QK
    if x.shape[-1] != K or x.numel() == 0:
        raise ShapeError(f"qgemv takes rows of {K} features for a ({out}, {K}) weight, got {tuple(x.shape)}")
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    b = None if bias is None else bias.data_ptr() if bias.dtype == torch.float32 else bias.float().data_ptr()
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    rows = xf.numel() // K
    if fn(qs.data_ptr(), d.data_ptr(), None if m is None else m.data_ptr(), bits, xf.data_ptr(), b, y.data_ptr(),
          rows, out, K, torch.get_num_threads(), _state["isa"]) != 0:
        raise MemoryError(f"qgemv could not allocate its workspace for {rows} rows")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _register():
    if not hasattr(torch.library, "register_fake"):
        return _impl
    lib = gemv_op.library()
    lib.define("qgemv(Tensor x, Tensor qs, Tensor d, Tensor? m, Tensor? bias, int bits) -> Tensor")
    lib.impl("qgemv", _impl, "CompositeExplicitAutograd")

    def fake(x, qs, d, m, bias, bits):
        return x.new_empty((*x.shape[:-1], d.shape[0]))

    torch.library.register_fake("efficientml::qgemv", fake, lib=lib)
    op = torch.ops.efficientml.qgemv.default

    def call(x, qs, d, m, bias, bits):
        return op(x, qs, d, m, bias, bits) if torch.compiler.is_compiling() else _impl(x, qs, d, m, bias, bits)

    return call


_op = _register()


def qgemv(x: torch.Tensor, w: QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(w).T + bias`` for CPU rows ``x`` (…, K) of any float dtype, activations
    quantized to int8 per block of 32 → (…, out) in ``x.dtype``."""
    return _op(x, w.qs, w.d, w.m, bias, w.bits)


def qgemv_parts(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """:func:`qgemv` on a QWeight's tensors (what the modules call: no QWeight built per call)."""
    return _op(x, qs, d, m, bias, bits)
