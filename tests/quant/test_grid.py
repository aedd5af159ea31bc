"""The one integer grid (quant.grid) shared by the CNN and LLM code: exact codes on small inputs."""

import pytest
import torch

import efficientml.llm.compress.magnitude as llm_magnitude
from efficientml.core.errors import ConfigError, ShapeError
from efficientml.prune import masks
from efficientml.quant.binary import pack_signs
from efficientml.quant.grid import GridSpec, QTensor, fake_quantize, qparams, quantize, weight_grid
from efficientml.quant.packing import pack_int32, unpack_int32


def test_one_spelling_per_grid():
    assert GridSpec(4, granularity="group", group_size=None) == GridSpec(4, granularity="channel")
    assert GridSpec(4, granularity="channel", group_size=64).group_size is None
    assert weight_grid(4, None, True) == GridSpec(4, True, "channel", signed=True, scale_dtype="float16",
                                                  zero_in_range=False)
    assert weight_grid(3, 64) == GridSpec(3, False, "group", 64, signed=False, scale_dtype="float16",
                                          zero_in_range=False)
    assert llm_magnitude.nm_mask is masks.nm_mask   # one N:M mask, not a copy


def test_asymmetric_codes_exact_cnn_and_llm_agree():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    for spec in (GridSpec(2, symmetric=False, granularity="tensor", signed=False), weight_grid(2, None, False)):
        qt = quantize(w, spec)
        assert qt.scale.tolist() == [[1.0]] and qt.zero.tolist() == [[1]]   # S = 3/3, Z = round(1/1)
        assert qt.codes.tolist() == [[0, 1, 1, 3]]                             # 0.5 rounds to even
        assert qt.dequantize().tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_signed_grid_stores_offset_binary_codes():
    w = torch.tensor([[-3.5, -1.0, 0.0, 0.49, 7.0, -7.0, 2.5, 3.0]])
    qt = quantize(w, GridSpec(4, symmetric=True, granularity="channel"))        # S = 7/7 = 1
    assert qt.q.dtype == torch.int8 and qt.q.tolist() == [[-4, -1, 0, 0, 7, -7, 2, 3]]
    assert qt.codes.dtype == torch.uint8 and qt.codes.tolist() == [[4, 7, 8, 8, 15, 1, 10, 11]]
    assert qt.zero.tolist() == [[8]] and qt.zero_point.tolist() == [[0]]
    assert torch.equal(qt.dequantize(), qt.q.float())
    narrow = quantize(w, GridSpec(3, symmetric=True, granularity="tensor", narrow=True))  # q ∈ [−3, 3]
    assert int(narrow.q.min()) == -3 and int(narrow.codes.min()) == 1 and int(narrow.codes.max()) == 7


def test_weight_grid_scales_are_fp16_and_measured():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(8, 64, generator=g) + 0.5                                  # every group positive
    s, z = qparams(w, weight_grid(4, 32))
    assert torch.equal(s, s.half().float())
    lo, hi = w.reshape(8, 2, 32).amin(-1), w.reshape(8, 2, 32).amax(-1)
    assert torch.equal(s, ((hi - lo) / 15).half().float())                   # range not widened to 0
    s_cnn, z_cnn = qparams(w, GridSpec(4, symmetric=False, granularity="group", group_size=32, signed=False))
    assert torch.equal(s_cnn, hi / 15) and bool((z_cnn == 0).all())         # CNN: [0, max]


def test_codes_pack_round_trip_and_storage():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 96, generator=g)
    for spec in (weight_grid(3, 32), weight_grid(4, 32, True), GridSpec(5, granularity="group", group_size=48)):
        qt = quantize(w, spec)
        packed = pack_int32(qt.codes, spec.bits)
        back = QTensor(unpack_int32(packed, spec.bits, 96), qt.scale, qt.zero, spec)
        assert torch.equal(back.dequantize(), fake_quantize(w, spec))
    qt = quantize(w, weight_grid(4, 32))
    assert qt.storage_bits() == 6 * 96 * 4 + 6 * 3 * (32 + 4)


def test_sign_packing_is_one_bit_codes():
    x = torch.tensor([[1.0, -2.0, 0.0, -0.1] * 10])                              # K = 40 → 2 words
    p = pack_signs(x)
    assert p.dtype == torch.int32 and p.shape == (1, 2)
    assert torch.equal(unpack_int32(p, 1, 40), (x >= 0).to(torch.uint8))
    assert p[0, 0].item() == 0x55555555


def test_errors():
    with pytest.raises(ConfigError, match="weight bits must be an integer from 2 to 8"):
        weight_grid(9)
    with pytest.raises(ConfigError, match="1 to 16 bits"):
        GridSpec(17)
    with pytest.raises(ConfigError, match="group_size 48 does not divide layer's input dimension 64"):
        weight_grid(4, 48).group_len(64)
    with pytest.raises(ShapeError, match="group size 48 does not divide the 64 inputs"):
        quantize(torch.randn(4, 64), weight_grid(4, 48))


def test_qparams_mse_never_worse_than_min_max_and_shrinks_outlier_groups():
    import torch

    from efficientml.quant.grid import dequantize_codes, qparams, qparams_mse, quantize_codes, weight_grid

    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[3, 5] = 12.0                                        # one outlier stretches its group's min/max
    for spec in (weight_grid(3, 64, False), weight_grid(4, None, True)):
        errs = []
        for fn in (qparams, qparams_mse):
            s, z = fn(w, spec)
            q = dequantize_codes(quantize_codes(w, s, z, spec), s, z)
            errs.append(((q - w).abs() ** 2.4).reshape(16, -1, spec.group_size or 128).sum(-1))
        assert torch.all(errs[1] <= errs[0] + 1e-4)       # p = 1 (min/max) is one of the candidates
        assert errs[1].sum() < 0.9 * errs[0].sum()
    s0, _ = qparams(w, weight_grid(3, 64, False))
    s1, _ = qparams_mse(w, weight_grid(3, 64, False))
    assert s1[3, 0] < s0[3, 0]                             # the outlier's group got a narrower range
