"""The Triton matrix-vector kernel for GPU decoding equals F.linear: on CPU through Triton's
interpreter, on CUDA (tuned, and inside a CUDA graph) where present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efficientml.llm.kernels import triton_gemv
from efficientml.llm.config import LlamaConfig

pytest.importorskip("triton")


@pytest.fixture
def interpreted():
    if not triton_gemv.available("cpu"):
        pytest.skip("Triton's interpreter is off (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA)")


def _ref(x, w, b):
    """fp64 product rounded once to the input dtype."""
    y = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    return y.to(x.dtype)


@pytest.mark.parametrize("out_f,in_f", [(13, 37), (64, 1024), (5, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_matches_linear_interpreter(interpreted, out_f, in_f, dtype):
    g = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    x = torch.randn(1, 1, in_f, generator=g).to(dtype)
    y = triton_gemv.gemv(x, w, b)
    assert y.shape == (1, 1, out_f) and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, _ref(x, w, b), rtol=1e-5, atol=1e-4)
    else:  # fp32 accumulation: at most one bf16 rounding step from the exact product
        ref = _ref(x, w, b).float()
        ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp_min(1.0)
        assert ((y.float() - ref).abs() <= ulp).all()


def test_gemv_rejects_what_it_cannot_run(interpreted):
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="one row of 16 features"):
        triton_gemv.gemv(torch.randn(2, 16), w)
    with pytest.raises(ValueError, match="one dtype"):
        triton_gemv.gemv(torch.randn(1, 16, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="contiguous"):
        triton_gemv.gemv(torch.randn(1, 16), torch.randn(16, 8).t())
    assert not triton_gemv.eligible(torch.randn(3, 16), w)
    assert not triton_gemv.eligible(torch.randn(1, 16, dtype=torch.bfloat16), w)
    assert triton_gemv.eligible(torch.randn(1, 1, 16), w)


def test_model_on_triton_gemv_matches_plain_interpreter(interpreted):
    """use_gpu_gemv (here on the interpreter): one-row decoding through the kernel, same logits."""
    from efficientml.llm.kernels.decode import use_gpu_gemv
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.model import build_model

    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = pack_projections(build_model(cfg, device="cpu")).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.inference_mode():
        cache = m.new_cache(1, 8)
        m(ids[:, :6], cache)
        ref = m(ids[:, 6:], cache)[:, -1]
        assert use_gpu_gemv(m)
        cache.reset()
        m(ids[:, :6], cache)
        torch.testing.assert_close(m(ids[:, 6:], cache)[:, -1], ref, rtol=1e-5, atol=1e-5)
        assert m.lm_head.kernel == "gpu" and m.model.layers[0].self_attn.packed.kernel == "gpu"
        use_gpu_gemv(m, enable=False)
        assert type(m.lm_head) is torch.nn.Linear and m.model.layers[0].self_attn.packed.kernel is None


@pytest.mark.cuda
def test_gemv_tuned_and_in_a_cuda_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = "cuda"
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 4096, device=dev, dtype=torch.bfloat16)
    y = triton_gemv.gemv(x, w)  # tunes this shape
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-1)
    assert any(k.startswith("4096×4096 bfloat16") for k in triton_gemv.tuned())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = triton_gemv.gemv(x, w)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-1)
