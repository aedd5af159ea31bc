import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.llm.compress import RTNConfig
from efficientml.quant.packing import pack_int32, unpack_int32
from efficientml.llm.kernels.qlinear import QuantLinear
from efficientml.llm.compress.rtn import quantize_weight
from efficientml.quant.grid import fake_quantize, weight_grid

from ..conftest import tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [32, 64, 96, 40])
def test_pack_unpack_round_trip_exact(bits, cols):
    codes = torch.randint(0, 1 << bits, (7, cols), dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-cols * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, cols), codes)
    assert torch.equal(unpack_int32(pack_int32(codes, bits, dim=0), bits, 7, dim=0), codes)


def test_int4_is_nibble_pairs_low_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 4], dtype=torch.uint8)
    b = pack_int32(codes, 4).view(torch.uint8)
    assert b[0, 0].item() == 0x21 and b[0, 1].item() == 0x43


@pytest.mark.parametrize("spec", [weight_grid(4, 32), weight_grid(3, 64), weight_grid(4, None, True),
                                  weight_grid(8, 16, True)])
def test_quant_linear_equals_fake_quant(spec):
    w = torch.randn(48, 64)
    qw = quantize_weight(w, spec)
    lin = QuantLinear.from_quantized(qw)
    torch.testing.assert_close(lin.dequantize(), fake_quantize(w, spec), rtol=0, atol=0)
    assert lin.nbytes() < w.numel() * 4 * (spec.bits / 32 + 0.2)


def test_fake_quant_error_bounded_by_half_step():
    w = torch.randn(16, 128)
    spec = weight_grid(4, 32)
    qw = quantize_weight(w, spec)
    err = (qw.dequantize() - w).abs().reshape(16, 4, 32)
    assert bool((err <= qw.scale[..., None] / 2 + 1e-6).all())


@pytest.mark.parametrize("conf", [RTNConfig(4, 32), RTNConfig(3, 64), RTNConfig(4, None, True)])
def test_packed_logits_equal_fake_quant_logits(conf, ids):
    fake, real = tiny_model(), tiny_model()
    apply(fake, conf, inplace=True, pack=False)
    apply(real, conf, inplace=True, pack=True)
    assert sum(isinstance(m, QuantLinear) for m in real.modules()) == 14
    with torch.no_grad():
        d = (fake(ids) - real(ids)).abs().max().item()
    assert d <= 1e-3


def test_bad_bits_and_group_size(model):
    with pytest.raises(ConfigError, match="bits must be an integer from 2 to 8"):
        RTNConfig(w_bits=9)
    with pytest.raises(ConfigError, match="bits must be an integer from 2 to 8"):
        RTNConfig(w_bits=1)
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        apply(model, RTNConfig(4, 48), inplace=True)
    assert all(type(m).__name__ != "QuantLinear" for m in model.modules())  # nothing half done


@pytest.mark.parametrize("spec", [weight_grid(4, 64), weight_grid(4, 32, True), weight_grid(4, None, True)])
def test_cpu_int4_kernel_matches_fake_quant_in_bf16(spec):
    """bf16 inputs on CPU run torch's int4 kernel on the same codes; against the fp32 product of the
    fake-quantized weight the error is bf16 rounding (scales, zeros, inputs, output), like the bf16
    dequantize-then-GEMM path, and the kernel's weight copy follows a reload."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no int4 CPU kernel")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    q = QuantLinear.from_quantized(quantize_weight(w, spec), b.bfloat16())
    x = torch.randn(3, 5, 256, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.float(), fake_quantize(w, spec), b.bfloat16().float())
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 96) and q._int4_cache is not None
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1.5e-2
    other = QuantLinear.from_quantized(quantize_weight(-w, spec), b.bfloat16())
    q.load_state_dict(other.state_dict())  # new buffers: the kernel's copy is rebuilt
    torch.testing.assert_close(q(x), other(x), rtol=0, atol=0)
    from efficientml.llm.kernels.qlinear_kernels import as_quant_kernel

    y_deq = as_quant_kernel(q, "dequant")(x)  # the int4 kernel off: dequantize to bf16 + GEMM
    ref2 = torch.nn.functional.linear(x.float(), fake_quantize(-w, spec), b.bfloat16().float())
    assert ((y_deq.float() - ref2).abs().max() / ref2.abs().max()).item() < 1.5e-2
