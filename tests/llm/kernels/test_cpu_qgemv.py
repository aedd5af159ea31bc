"""The quantized CPU kernel (efficientml/llm/kernels/csrc/qgemv.c: W4/W8 blocks × int8 activations)
on both of its instruction-set paths, its weight packings, and the model's use of it.

Max error against dequantize + matmul in fp32 (the activations' int8 rounding, per block of 32),
max |y − ref| ÷ max |ref| on random N(0, 1) inputs: W4 ≤ 1.5e-2, W8 ≤ 1.5e-2 (measured 0.3–0.7 %).
Against the same product with the activations rounded as the kernel rounds them (an fp64 reference),
the kernel is exact to fp32 summation: ≤ 1e-5."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from efficientml.llm.kernels import cpu_qgemv
from efficientml.llm.kernels.cpu_qgemv import QK

needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                              reason="the kernel is compiled at run time with the system C compiler")
VS_DEQUANT = {4: 1.5e-2, 8: 1.5e-2}  # max error vs dequantize + matmul (fp32), per bits


def _isas() -> list[str]:
    """portable always; avx2 and avx512vnni where this CPU runs them (so CI checks every path it can)."""
    out = ["portable"]
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return out
    if {"avx2", "fma"} <= flags:
        out.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            out.append("avx512vnni")
    return out


@pytest.fixture(params=_isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("EFFICIENTML_CPU_ISA", request.param)
    monkeypatch.setattr(cpu_qgemv, "_state", {})
    assert cpu_qgemv.available(), cpu_qgemv.status()
    assert cpu_qgemv.status().startswith(f"on ({request.param}" if request.param != "portable" else "on (portable"), \
        cpu_qgemv.status()
    return request.param


def _act_rounded(x: torch.Tensor) -> torch.Tensor:
    """x with each block of 32 rounded as the kernel rounds it: int8 codes · max|x| / 127."""
    xb = x.double().view(*x.shape[:-1], -1, QK)
    e = xb.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xb / torch.where(e > 0, e, 1)).clamp(-127, 127) * e).view(x.shape)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())


def _same_weights(w: torch.Tensor, ref: torch.Tensor) -> None:
    """The same codes and scales: d·q + m (the kernel's form) equals (q − z)·s up to one fp32 rounding."""
    torch.testing.assert_close(w, ref, rtol=0, atol=float(ref.abs().max()) * 2 ** -22)


def _grid(bits, out, K, group, symmetric, g):
    codes = torch.randint(0, 1 << bits, (out, K), generator=g)
    scale = torch.rand(out, K // group, generator=g) * 0.05 + 0.01
    zero = None if symmetric else torch.randint(0, 1 << bits, (out, K // group), generator=g)
    z = torch.full_like(scale, 1 << (bits - 1)) if zero is None else zero.float()
    w = ((codes.float().view(out, -1, group) - z[..., None]) * scale[..., None]).view(out, K)
    return codes, scale, zero, w


@needs_cc
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True), (256, False)])
@pytest.mark.parametrize("out,rows", [(7, 1), (96, 1), (33, 2), (96, 3), (50, 9)])
def test_qgemv_matches_dequantize_matmul(isa, bits, group, symmetric, out, rows):
    g = torch.Generator().manual_seed(bits * 1000 + group + out + rows)
    K = 256
    codes, scale, zero, w = _grid(bits, out, K, group, symmetric, g)
    qw = cpu_qgemv.pack_codes(codes, scale, zero, bits)
    _same_weights(qw.dequantize(), w)
    assert qw.qs.numel() * qw.qs.element_size() == out * K * bits // 8  # bits per code, no float copy
    x = torch.randn(rows, K, generator=g)
    b = torch.randn(out, generator=g)
    y = cpu_qgemv.qgemv(x, qw, b)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    exact = _act_rounded(x) @ w.double().t() + b.double()
    assert _rel(y, exact) < 1e-5  # the integer dot products are exact; fp32 sums
    assert _rel(y, x @ w.t() + b) < VS_DEQUANT[bits]  # the int8 activations' rounding
    if rows > 1:  # batch-invariant: a row's result does not depend on the rows beside it
        torch.testing.assert_close(y[-1:], cpu_qgemv.qgemv(x[-1:], qw, b), rtol=1e-6, atol=1e-6)


@needs_cc
def test_isa_paths_agree_and_bad_isa_is_refused(monkeypatch):
    g = torch.Generator().manual_seed(3)
    codes, scale, zero, _ = _grid(4, 64, 576, 64, False, g)
    qw = cpu_qgemv.pack_codes(codes, scale, zero, 4)
    odd = cpu_qgemv.pack_codes(*_grid(8, 40, 96, 32, True, g)[:3], 8)  # K/32 odd: AVX-512 hands it to AVX2
    for w, x in ((qw, torch.randn(5, 576, generator=g)), (odd, torch.randn(3, 96, generator=g))):
        ys = []
        for name in _isas():
            monkeypatch.setenv("EFFICIENTML_CPU_ISA", name)
            monkeypatch.setattr(cpu_qgemv, "_state", {})
            ys.append(cpu_qgemv.qgemv(x, w))
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("EFFICIENTML_CPU_ISA", "avx9000")
    monkeypatch.setattr(cpu_qgemv, "_state", {})
    from efficientml.core.errors import ConfigError

    with pytest.raises(ConfigError, match="EFFICIENTML_CPU_ISA must be one of"):
        cpu_qgemv.available()


@needs_cc
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_ggml_blocks_load_as_they_are(kind):
    """GGUF blocks written by our encoder, decoded by our independent reader: the kernel's layout holds
    the same weights bit for bit, and the product matches the decoded weights' within the activations'
    rounding."""
    from efficientml.llm.io import ggml_encode
    from efficientml.llm.io.ggml_quants import dequantize_blocks

    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 128, generator=g)
    raw = {"Q4_0": ggml_encode.quantize_q4_0, "Q4_1": ggml_encode.quantize_q4_1,
           "Q8_0": ggml_encode.quantize_q8_0}[kind](w)
    ref = torch.from_numpy(dequantize_blocks(np.asarray(raw), kind, w.numel()).reshape(40, 128))
    qw = cpu_qgemv.pack_ggml(kind, np.asarray(raw).tobytes(), (40, 128))
    _same_weights(qw.dequantize(), ref)
    x = torch.randn(2, 128, generator=g)
    assert _rel(cpu_qgemv.qgemv(x, qw), _act_rounded(x) @ ref.double().t()) < 1e-5


@needs_cc
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 128, False), (8, None, True), (8, 64, False)])
def test_quant_linear_converts_without_dequantizing(bits, group, symmetric):
    from efficientml.llm.compress.rtn import quantize_weight
    from efficientml.llm.kernels.qgemv_linear import QGemvLinear
    from efficientml.llm.kernels.qlinear import QuantLinear
    from efficientml.quant.grid import weight_grid

    g = torch.Generator().manual_seed(bits + (group or 0))
    w, b = torch.randn(48, 256, generator=g), torch.randn(48, generator=g)
    q = QuantLinear.from_quantized(quantize_weight(w, weight_grid(bits, group, symmetric)), b)
    k = QGemvLinear.from_module(q)
    _same_weights(k.qweight.dequantize(), q.dequantize())
    x = torch.randn(3, 256, generator=g).bfloat16()
    y = k(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), q.dequant_matmul(x.float())) < VS_DEQUANT[bits]


def _tiny_quantized(bits: int, seed: int):
    from efficientml.core.transform import apply
    from efficientml.llm.compress import RTNConfig
    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.model import build_model

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    m = pack_projections(build_model(cfg, device="cpu")).eval()
    apply(m, RTNConfig(bits, 32, symmetric=True), inplace=True, progress=False)
    return m


@needs_cc
def test_model_runs_quantized_linears_on_the_kernel(monkeypatch):
    """prepare_cpu_decode: every QuantLinear becomes a QGemvLinear, q/k/v and gate/up one call each;
    prefill (12 rows) and decode (1 row) run on the kernel; logits close to the dequantize reference."""
    import copy

    from efficientml.llm.kernels.decode import prepare_cpu_decode
    from efficientml.llm.kernels.qgemv_linear import PackedQGemv, QGemvLinear
    from efficientml.llm.kernels.qlinear import QuantLinear

    m = _tiny_quantized(4, 0)
    ref = copy.deepcopy(m)
    calls = []
    real = cpu_qgemv.qgemv_parts
    monkeypatch.setattr(cpu_qgemv, "qgemv_parts", lambda x, qs, d, *a: calls.append(d.shape) or real(x, qs, d, *a))
    path = prepare_cpu_decode(m, lm_head_bits=8)
    assert "15 quantized linears on cpu_qgemv" in path, path  # 7 per layer and lm_head
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert isinstance(m.lm_head, QGemvLinear) and m.lm_head.bits == 8
    assert all(isinstance(layer.self_attn.packed, PackedQGemv) for layer in m.model.layers)
    ids = torch.randint(0, 300, (1, 13), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = m(ids)
        want = ref(ids)
    assert len(calls) == 4 * 2 + 1  # packed q/k/v, o, packed gate/up, down per layer; lm_head
    assert _rel(out, want) < 3e-2


@needs_cc
@pytest.mark.parametrize("bits", [4, 8])
def test_greedy_tokens_match_the_dequantize_reference(bits):
    """Same weights, greedy: the kernel path (eager, and compiled as the CPU decode step does) gives the
    tokens of dequantize + matmul in fp32 (the reference path, QuantLinearDequant)."""
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kernels.decode import prepare_cpu_decode
    from efficientml.llm.kernels.qlinear_kernels import use_quant_kernel
    from efficientml.llm.kv_cache import StaticKVCache

    m = _tiny_quantized(bits, 1)
    prompt = [1, 5, 7, 9, 11]
    import copy

    ref = copy.deepcopy(m)
    use_quant_kernel(ref, "dequant")
    want = generate(ref, prompt, SamplingConfig(max_new_tokens=12)).tokens
    prepare_cpu_decode(m)
    assert generate(m, prompt, SamplingConfig(max_new_tokens=12)).tokens == want
    if bits == 4:  # the op inside torch.compile (once: compiling takes seconds)
        cache = StaticKVCache.for_model(m, 1, 24, static_shapes=True)
        out = generate(m, prompt, SamplingConfig(max_new_tokens=12), cache=cache, use_compile=True)
        assert out.tokens == want


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_runs_quantized_weights_on_the_kernel(dtype):
    """W4 weights in a model of any float dtype: every quantized linear on the kernel (none left to
    dequantize per call), logits close to the same model's dequantize reference in fp32."""
    import copy

    from efficientml.llm.kernels.decode import prepare_cpu_decode, slow_linears
    from efficientml.llm.kernels.qgemv_linear import QGemvLinear
    from efficientml.llm.kernels.qlinear_kernels import use_quant_kernel

    m = _tiny_quantized(4, 2)
    ref = copy.deepcopy(m)
    use_quant_kernel(ref, "dequant")
    m = m.to(dtype)
    prepare_cpu_decode(m)
    assert slow_linears(m) == {}
    assert sum(isinstance(x, QGemvLinear) for x in m.modules()) == 14
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.inference_mode():
        out = m(ids)
        want = ref(ids)
    assert out.dtype == dtype and _rel(out.float(), want) < (3e-2 if dtype == torch.float32 else 8e-2)


@needs_cc
def test_slow_linears_names_what_has_no_kernel():
    """3-bit weights have no CPU kernel: prepare_cpu_decode says so, slow_linears names each with why."""
    from efficientml.llm.kernels.decode import prepare_cpu_decode, slow_linears

    m = _tiny_quantized(3, 3)
    path = prepare_cpu_decode(m)
    assert "14 not (e.g. model.layers.0.self_attn.q_proj: 3-bit weights" in path, path
    slow = slow_linears(m)
    assert len(slow) == 14 and slow["model.layers.1.mlp.down_proj"].startswith("3-bit weights")
