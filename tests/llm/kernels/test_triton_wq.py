"""The fused Triton W-bit matmul equals QuantLinear's dequantize-then-matmul path: on CPU through
Triton's interpreter (where Triton is installed), on CUDA where present."""

from __future__ import annotations

import pytest
import torch

from efficientml.llm.kernels.qlinear import QuantLinear
from efficientml.llm.compress.rtn import quantize_weight
from efficientml.quant.grid import weight_grid

pytest.importorskip("triton")

SETTINGS = [(4, 32, False), (3, 64, False), (4, None, True), (8, 32, False), (2, 32, True), (4, 96, False)]


def _layer(bits, group, sym, n=72, k=192, device="cpu"):
    torch.manual_seed(bits * 100 + (group or 0))
    qw = quantize_weight(torch.randn(n, k), weight_grid(bits=bits, group_size=group, symmetric=sym))
    return QuantLinear.from_quantized(qw, bias=torch.randn(n), scale_dtype=torch.float32).to(device)


@pytest.fixture
def interpreted():
    import efficientml.llm.kernels.triton_wq as T

    if not T.available("cpu"):
        pytest.skip("Triton's interpreter is off (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA)")
    return T


@pytest.mark.parametrize("bits,group,sym", SETTINGS)
def test_fused_matches_dequantized_interpreter(interpreted, bits, group, sym):
    ql = _layer(bits, group, sym)
    x = torch.randn(3, 5, ql.in_features)
    ref = ql(x)  # CPU: dequantize + F.linear
    out = interpreted.wq_matmul(x, ql.weight_packed, ql.weight_scale, ql.weight_zero_point, bits,
                                ql.in_features, ql.bias)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_fused_rejects_bad_shapes(interpreted):
    from efficientml.core.errors import ShapeError

    ql = _layer(4, 32, False)
    with pytest.raises(ShapeError, match="features"):
        interpreted.wq_matmul(torch.randn(2, 100), ql.weight_packed, ql.weight_scale, ql.weight_zero_point, 4,
                              ql.in_features)


@pytest.mark.cuda
@pytest.mark.parametrize("bits,group,sym", SETTINGS)
def test_fused_matches_dequantized_cuda(bits, group, sym):
    ql = _layer(bits, group, sym, n=256, k=384, device="cuda")
    from efficientml.llm.kernels.qlinear_kernels import as_quant_kernel

    x = torch.randn(4, ql.in_features, device="cuda", dtype=torch.float16)
    out = as_quant_kernel(ql, "triton")(x)  # fused path (fp16, 4 rows)
    ref = torch.nn.functional.linear(x.float(), ql.dequantize(torch.float32), ql.bias.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
