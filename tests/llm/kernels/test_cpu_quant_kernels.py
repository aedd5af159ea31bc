"""QuantLinear on CPU: fp32/bf16/fp16 inputs run torch's int4 kernel (W4, groups 32–256) and int8
weight-only kernel (W8 per channel) on the packed codes, never a float copy of the weight, in the
input's dtype (the "bf16" swap computes fp32/fp16 in bf16, the kernels' vectorized dtype); checked
against the fp32 product of the fake-quantized weight (the reference: dequantize + matmul)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efficientml.llm.kernels.qlinear import QuantLinear
from efficientml.llm.compress.rtn import quantize_weight
from efficientml.quant.grid import fake_quantize, weight_grid

from ..conftest import tiny_model

needs_int4 = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no int4 CPU kernel")
needs_int8 = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                                reason="this torch has no int8 weight-only CPU kernel")
# max |error| ÷ max |reference| per compute dtype: fp32 summation order; bf16/fp16 rounding of x, s, z, y
REL_ERR = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 1.5e-2}


def _case(spec, bias: bool = True, rows: int = 3):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    q = QuantLinear.from_quantized(quantize_weight(w, spec), b if bias else None, scale_dtype=torch.float32)
    x = torch.randn(rows, 256, generator=g)
    ref = F.linear(x, fake_quantize(w, spec), b if bias else None)  # fp32 reference
    return q, x, ref


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


@needs_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [weight_grid(4, 32, True), weight_grid(4, 64), weight_grid(4, 128, True),
                                  weight_grid(4, 256)])
def test_w4_runs_the_int4_kernel_in_every_float_dtype(spec, dtype):
    q, x, ref = _case(spec)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == ref.shape and q._int4_cache is not None
    assert _rel(y, ref) < REL_ERR[dtype]
    if dtype == torch.float32:  # the reference path: dequantize + GEMM, exact to fp32 rounding
        assert _rel(q.dequant_matmul(x), ref) < 1e-6


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w8_per_channel_runs_the_int8_kernel(symmetric, dtype):
    q, x, ref = _case(weight_grid(8, None, symmetric))
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == ref.shape and q._int8_cache is not None
    assert _rel(y, ref) < REL_ERR[dtype]
    codes = q._cpu_int8_weight(dtype)[0]
    assert codes.dtype == torch.int8 and codes.shape == (96, 256)  # one byte per weight, no float copy


@needs_int8
def test_kernel_copies_follow_a_reload():
    for spec in (weight_grid(4, 32, True), weight_grid(8, None, True)):
        q, x, _ = _case(spec)
        q(x)
        g = torch.Generator().manual_seed(1)
        other = QuantLinear.from_quantized(quantize_weight(torch.randn(96, 256, generator=g), spec),
                                           torch.zeros(96), scale_dtype=torch.float32)
        q.load_state_dict(other.state_dict())  # copies in place: the kernel's layout is rebuilt
        torch.testing.assert_close(q(x), other.dequant_matmul(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [weight_grid(8, 32, True), weight_grid(3, 32, True), weight_grid(4, 16, True)])
def test_other_grids_dequantize_as_before(spec):
    g = torch.Generator().manual_seed(0)
    q = QuantLinear.from_quantized(quantize_weight(torch.randn(64, 128, generator=g), spec))
    x = torch.randn(2, 128, generator=g)
    assert torch.equal(q(x), q.dequant_matmul(x))
    assert getattr(q, "_int4_cache", None) is None and getattr(q, "_int8_cache", None) is None


@needs_int8
@pytest.mark.parametrize("bits, group", [(4, 32), (8, None)])
def test_greedy_generation_equals_the_dequantize_path(bits, group):
    from efficientml.core.transform import apply
    from efficientml.llm.compress import RTNConfig
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kernels.qlinear_kernels import use_quant_kernel

    m = tiny_model()
    apply(m, RTNConfig(bits, group, symmetric=True), inplace=True, pack=True, progress=False)
    prompt = [1, 5, 9, 2, 7, 3]
    fast = generate(m, prompt, SamplingConfig(max_new_tokens=16)).tokens
    assert use_quant_kernel(m, "dequant") > 0
    ref = generate(m, prompt, SamplingConfig(max_new_tokens=16)).tokens
    assert fast == ref


@needs_int8
@pytest.mark.parametrize("spec", [weight_grid(4, 32, True), weight_grid(4, 128), weight_grid(8, None, True)])
def test_bf16_swap_computes_fp32_inputs_in_bf16(spec):
    from efficientml.llm.kernels.qlinear_kernels import QuantLinearBF16, as_quant_kernel

    q, x, ref = _case(spec)
    fast = as_quant_kernel(q, "bf16")
    assert type(fast) is QuantLinearBF16 and fast.weight_packed is q.weight_packed
    for dtype in (torch.float32, torch.float16):
        y = fast(x.to(dtype))
        assert y.dtype == dtype and _rel(y, ref) < REL_ERR[torch.bfloat16]
        torch.testing.assert_close(y, q(x.to(dtype).bfloat16()).to(dtype), rtol=0, atol=0)
    assert _rel(q(x), ref) < 2e-6  # QuantLinear itself keeps fp32 inputs in fp32
