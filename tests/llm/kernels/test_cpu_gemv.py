"""The CPU matrix-vector kernel (efficientml/llm/kernels/csrc/gemv_f32.c) and the model's use of it."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from efficientml.llm.kernels import cpu_gemv
from efficientml.llm.config import LlamaConfig

needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                              reason="the kernel is compiled at run time with the system C compiler")


def _fresh_state(monkeypatch):
    """Forget the loaded kernels for one test (monkeypatch puts the process-wide state back): every C
    kernel module, so one built under this test's broken compiler is not kept for later tests."""
    from efficientml.llm.kernels import cpu_gemv16, cpu_qgemv

    for mod in (cpu_gemv, cpu_gemv16, cpu_qgemv):
        monkeypatch.setattr(mod, "_state", {})


@needs_cc
@pytest.mark.parametrize("out_f,in_f", [(4, 8), (13, 37), (576, 576), (3, 1536), (1001, 64), (7, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])  # every tile shape: 4 weight rows × 1–2 inputs, 2 × 1–4
def test_gemv_matches_linear(out_f, in_f, bias, rows):
    assert cpu_gemv.available(), cpu_gemv.status()
    g = torch.Generator().manual_seed(out_f * 1000 + in_f + rows)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    x = torch.randn(rows, 1, in_f, generator=g)
    y = cpu_gemv.gemv(x, w, b)
    ref = (x.double() @ w.double().t() + (b.double() if bias else 0)).float()  # fp64 reference
    assert y.shape == (rows, 1, out_f)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * in_f ** 0.5)
    if rows > 1:  # a row's result does not depend on the rows beside it
        assert torch.equal(y[1], cpu_gemv.gemv(x[1], w, b))


@needs_cc
def test_gemv_is_thread_count_independent_and_takes_strided_rows():
    w = torch.randn(999, 333)
    x_big = torch.randn(3, 333)
    x = x_big[1:2, :]  # a view
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemv.gemv(x, w)
        torch.set_num_threads(2)
        two = cpu_gemv.gemv(x[:, None][:, 0], w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)  # each row's sum is computed by one thread in a fixed order
    torch.testing.assert_close(one, F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_cc
def test_gemv_rejects_what_it_cannot_run():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="1 to 8 rows of 16 features"):
        cpu_gemv.gemv(torch.randn(9, 16), w)
    with pytest.raises(ValueError, match="1 to 8 rows of 16 features"):
        cpu_gemv.gemv(torch.randn(1, 15), w)
    with pytest.raises(ValueError, match="fp32 only"):
        cpu_gemv.gemv(torch.randn(1, 16, dtype=torch.bfloat16), w.bfloat16())
    with pytest.raises(ValueError, match="contiguous"):
        cpu_gemv.gemv(torch.randn(1, 16), torch.randn(16, 8).t())
    assert not cpu_gemv.eligible(torch.randn(9, 16), w) and cpu_gemv.eligible(torch.randn(8, 16), w)
    assert not cpu_gemv.eligible(torch.randn(1, 16), torch.randn(16, 8).t())
    assert not cpu_gemv.eligible(torch.randn(1, 16, requires_grad=True), w)
    assert cpu_gemv.eligible(torch.randn(1, 1, 16), w)


def test_gemv_off_says_why(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("EFFICIENTML_CPU_GEMV", "0")
    assert not cpu_gemv.available()
    assert "EFFICIENTML_CPU_GEMV=0" in cpu_gemv.status()
    with pytest.raises(RuntimeError, match="kernel is off"):
        cpu_gemv.gemv(torch.randn(1, 4), torch.randn(4, 4))


def test_gemv_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    """A compiler that fails every flag set: the kernel is off with the compiler's message, nothing is
    left in the cache, and prepare_cpu_decode falls back to decode_layout."""
    from efficientml.llm.kernels.decode import prepare_cpu_decode
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.model import build_model

    _fresh_state(monkeypatch)
    bad = tmp_path / "badcc"
    bad.write_text("#!/bin/sh\necho 'badcc: no such architecture' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("EFFICIENTML_CACHE", str(tmp_path / "cache"))
    assert not cpu_gemv.available()
    assert "could not build" in cpu_gemv.status() and "no such architecture" in cpu_gemv.status()
    assert not any((tmp_path / "cache" / "kernels").glob("*"))  # no half-written library
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    m = pack_projections(build_model(cfg, device="cpu"))
    how = prepare_cpu_decode(m)
    assert how.startswith("decode_layout") and "could not build" in how
    assert m.model.layers[0].mlp.down_proj.weight.stride() == (1, cfg.hidden_size)  # (in, out) layout


@needs_cc
def test_model_on_gemv_matches_plain_and_keeps_other_paths(monkeypatch):
    """use_cpu_gemv: one-row decoding goes through the kernel with the same logits; prefill (more
    rows than the kernel takes), a module with a hook and a swapped module do not; enable=False
    undoes it."""
    from efficientml.llm.kernels.decode import use_cpu_gemv
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.model import build_model

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    m = pack_projections(build_model(cfg, device="cpu")).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 13))
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda x, w, b=None: calls.append(tuple(w.shape)) or real(x, w, b))
    with torch.inference_mode():
        cache = m.new_cache(1, 16)
        m(ids[:, :12], cache)
        ref = m(ids[:, 12:], cache)[:, -1]
        assert use_cpu_gemv(m)
        cache.reset()
        m(ids[:, :12], cache)  # prefill: 12 rows (> MAX_ROWS), F.linear
        assert calls == []
        out = m(ids[:, 12:], cache)[:, -1]  # one row: the kernel
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # packed q/k/v + o + packed gate/up + down per layer, and lm_head
        assert len(calls) == 4 * cfg.num_hidden_layers + 1 and calls[-1] == (cfg.vocab_size, cfg.hidden_size)
        calls.clear()
        seen = []
        h = m.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        cache.reset()
        m(ids[:, :12], cache)
        m(ids[:, 12:], cache)
        h.remove()
        assert len(seen) == 2  # the hooked module ran as a module, the other layer's on the kernel
        assert calls.count((cfg.hidden_size, cfg.intermediate_size)) == cfg.num_hidden_layers - 1
        calls.clear()
        use_cpu_gemv(m, enable=False)
        cache.reset()
        m(ids[:, :12], cache)
        torch.testing.assert_close(m(ids[:, 12:], cache)[:, -1], ref)
        assert calls == []


@needs_cc
def test_small_batch_decoding_runs_on_the_kernel(monkeypatch):
    """A decode step of 3 sequences (3 rows, left padding in one) runs every projection on the kernel
    once for all rows, with the logits of the plain path; each row's result equals that row's
    product alone, bit for bit (the kernel is batch-invariant)."""
    from efficientml.llm.kernels.decode import use_cpu_gemv
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.model import build_model

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(2)
    m = pack_projections(build_model(cfg, device="cpu")).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, :4] = 0
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda x, w, b=None: calls.append(x.shape[0]) or real(x, w, b))
    with torch.inference_mode():
        cache = m.new_cache(3, 16)
        m(ids[:, :9], cache, attention_mask=mask)
        ref = m(ids[:, 9:], cache)[:, -1]
        assert use_cpu_gemv(m)
        cache.reset()
        m(ids[:, :9], cache, attention_mask=mask)  # 27 rows: F.linear
        assert calls == []
        out = m(ids[:, 9:], cache)[:, -1]
        assert calls == [3] * (4 * cfg.num_hidden_layers + 1)  # q/k/v, o, gate/up, down; lm_head
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    x, w = torch.randn(5, 64), torch.randn(37, 64)
    assert torch.equal(real(x, w)[3], real(x[3:4], w)[0])


@needs_cc
def test_compiled_decode_on_gemv_matches_eager():
    """The kernel as an op inside the torch.compile-d CPU decode step: same greedy tokens as the
    plain eager path."""
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kv_cache import StaticKVCache
    from efficientml.llm.kernels.decode import use_cpu_gemv
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.model import build_model

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    m = pack_projections(build_model(cfg, device="cpu")).eval()
    prompt = [1, 5, 7, 9, 11]
    eager = generate(m, prompt, SamplingConfig(max_new_tokens=10)).tokens
    assert use_cpu_gemv(m)
    cache = StaticKVCache.for_model(m, 1, 24, static_shapes=True)
    out = generate(m, prompt, SamplingConfig(max_new_tokens=10), cache=cache, use_compile=True)
    assert out.tokens == eager
