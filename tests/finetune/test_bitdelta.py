"""BitDelta: exact sign packing, the size ratio on real-size matrices, serving several deltas over one
base (switching is exact), a save/load round trip, and scale distillation lowering the logit error."""

import copy

import pytest
import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.finetune.bitdelta import BitDelta, compress_delta, pack_signs, unpack_signs
from efficientml.finetune.bitdelta_serve import DeltaServer, distill_scales, export_delta

from ..llm.conftest import tiny_model


def test_pack_unpack_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 2, (37, 29), generator=g).float() * 2 - 1  # 1073 elements: not a multiple of 8
    packed = pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.numel() == (37 * 29 + 7) // 8
    assert torch.equal(unpack_signs(packed, (37, 29)), s)
    d = torch.randn(5, 8, generator=g)
    d[0, 0] = 0.0
    assert torch.equal(unpack_signs(pack_signs(d), (5, 8)), torch.where(d >= 0, 1.0, -1.0))
    assert pack_signs(torch.tensor([1.0, -1, -1, 1, -1, -1, -1, -1])).item() == 0b1001
    with pytest.raises(ShapeError, match="must be 6 uint8 bytes for shape \\(6, 7\\), got 5"):
        unpack_signs(packed[:5], (6, 7))


def test_size_ratio_on_real_size_matrices():
    base = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576))
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 1e-3)
    rep = compress_delta(base, ft).size_report()
    assert rep["packed_bytes"] == 2 * (576 * 1536 // 8 + 4)
    assert rep["size_ratio"] >= 10 and rep["size_ratio"] == pytest.approx(16, rel=1e-3)


def _finetune(base, seed, scale=0.02):
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if p.dim() == 2 and "embed" not in n:  # a low-rank change plus noise, as a fine-tune makes
                a, b = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
                p.add_(scale * (a @ b) / 2 + 0.3 * scale * torch.randn(p.shape, generator=g))
        ft.model.norm.weight.add_(0.1)
    return ft


def _mse(a, b, ids):
    with torch.no_grad():
        return torch.nn.functional.mse_loss(a(ids), b(ids)).item()


def test_serving_several_deltas_and_distillation(tmp_path):
    base = tiny_model()
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_base = base(ids)
    fa, fb = _finetune(base, 1), _finetune(base, 2)
    da, db = compress_delta(base, fa), compress_delta(base, fb)
    assert set(da.dense) == {"model.norm.weight"} and len(da.signs) == 14
    server = DeltaServer(base).add("a", da).add("b", db)
    with torch.no_grad():
        server.use("b")
        out_b = server(ids)
        server.use("a")
        out_a = server(ids)
        server.use(None)
        assert torch.equal(server(ids), want_base)  # switching back gives the base bit for bit
    dense_a = copy.deepcopy(tiny_model())  # an independent dense model: W + mean|Δ|·sign(Δ), norm + Δ
    with torch.no_grad():
        fp = dict(fa.named_parameters())
        for n, p in dense_a.named_parameters():
            d = fp[n] - p
            p.add_(d.abs().mean() * torch.where(d >= 0, 1.0, -1.0) if n in da.signs else d)
        torch.testing.assert_close(out_a, dense_a(ids), rtol=1e-4, atol=1e-4)  # the norm Δ is fp16
    assert _mse(lambda x: out_a, fa, ids) < 0.9 * _mse(lambda x: want_base, fa, ids)
    assert _mse(lambda x: out_b, fb, ids) < 0.9 * _mse(lambda x: want_base, fb, ids)
    res = distill_scales(server, "a", fa, ids, steps=30, lr=1e-3, batch_size=8)
    assert res["mse_after"] < 0.97 * res["mse_before"], res  # the optimum over 14 scales here: −5.6%
    export_delta(server, "a").save(tmp_path / "a.safetensors")
    back = BitDelta.load(tmp_path / "a.safetensors")
    fresh = DeltaServer(tiny_model()).add("a", back).use("a")
    server.use("a", cache=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), server(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="no delta named 'c'"):
        server.use("c")
    with pytest.raises(ConfigError, match="must be new"):
        server.add("a", db)
