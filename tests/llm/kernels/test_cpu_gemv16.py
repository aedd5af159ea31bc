"""The bf16/fp16-weight CPU matrix-vector kernel (efficientml/llm/kernels/csrc/gemv_h16.c) and a 16-bit
model decoding on it."""

from __future__ import annotations

import shutil

import pytest
import torch

from efficientml.llm.config import LlamaConfig
from efficientml.llm.kernels import cpu_gemv16

needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                              reason="the kernel is compiled at run time with the system C compiler")


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f,rows", [(4, 8, 1), (13, 37, 2), (576, 576, 1), (300, 64, 3), (33, 1536, 8)])
def test_gemv16_matches_fp64(dtype, out_f, in_f, rows):
    """fp32 sums of the exact 16-bit products: the only error left is the output's rounding to ``dtype``."""
    assert cpu_gemv16.available(), cpu_gemv16.status()
    if dtype == torch.float16 and "fp16" not in cpu_gemv16.status():
        pytest.skip(cpu_gemv16.status())
    g = torch.Generator().manual_seed(out_f + in_f + rows)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    assert cpu_gemv16.eligible(x, w, b)
    y = cpu_gemv16.gemv(x, w, b)
    ref = x.double() @ w.double().t() + b.double()
    assert y.dtype == dtype and y.shape == (rows, out_f)
    torch.testing.assert_close(y, ref.to(dtype), rtol=0, atol=float(ref.abs().max()) * (2 ** -7 if dtype == torch.bfloat16
                                                                                         else 2 ** -10))
    assert not cpu_gemv16.eligible(x.float(), w.float())  # fp32 is cpu_gemv's


@needs_cc
def test_bf16_model_decodes_on_the_kernel(monkeypatch):
    """use_cpu_gemv on a bf16 model: the one-row steps (eager and compiled) run on gemv_h16 and give
    the greedy tokens of the plain bf16 model."""
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kernels.decode import use_cpu_gemv
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.kv_cache import StaticKVCache
    from efficientml.llm.model import build_model

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(4)
    m = pack_projections(build_model(cfg, device="cpu").to(torch.bfloat16)).eval()
    prompt = [1, 5, 7, 9, 11]
    want = generate(m, prompt, SamplingConfig(max_new_tokens=10)).tokens
    calls = []
    real = cpu_gemv16.gemv
    monkeypatch.setattr(cpu_gemv16, "gemv", lambda x, w, b=None: calls.append(x.dtype) or real(x, w, b))
    assert use_cpu_gemv(m)
    assert generate(m, prompt, SamplingConfig(max_new_tokens=10)).tokens == want
    # the 5-row prefill (≤ MAX_ROWS) and 9 one-row steps: packed q/k/v, o, packed gate/up, down; lm_head
    assert len(calls) == 10 * (4 * cfg.num_hidden_layers + 1) and set(calls) == {torch.bfloat16}
    monkeypatch.setattr(cpu_gemv16, "gemv", real)  # a growing list would make the compiled step recompile
    cache = StaticKVCache.for_model(m, 1, 24, static_shapes=True)
    assert generate(m, prompt, SamplingConfig(max_new_tokens=10), cache=cache, use_compile=True).tokens == want


@needs_cc
def test_bf16_prompt_runs_as_one_fp32_gemm():
    """Many bf16 rows (a prompt) on kernel "cpu": one fp32 GEMM rounded once to bf16, where the CPU has no
    native bf16 matrix unit (torch's own bf16 GEMM otherwise); either way close to the fp64 product."""
    from torch import nn

    from efficientml.llm.kernels.gemv_linear import GemvLinear, native_bf16_matmul

    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 20, 64, generator=g).to(torch.bfloat16)
    k = GemvLinear.wrap(lin, "cpu")
    y = k(x)
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref.to(torch.bfloat16), rtol=0, atol=float(ref.abs().max()) * 2 ** -7)
    if not native_bf16_matmul():
        wide = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16)
        assert torch.equal(y, wide)


@needs_cc
@pytest.mark.parametrize("f16", [0, 1])
def test_a_row_does_not_depend_on_how_many_rows_share_the_call(f16):
    """Bit for bit: a speculative verify (k + 1 rows) must give the tokens a one-row decode gives."""
    fn = cpu_gemv16._load()
    assert fn is not None, cpu_gemv16.status()
    if f16 and "fp16" not in cpu_gemv16.status():
        pytest.skip(cpu_gemv16.status())
    g = torch.Generator().manual_seed(5)
    out_f, in_f = 67, 203  # neither a multiple of the 4-row tile nor of the vector width
    w = torch.randn(out_f, in_f, generator=g).to(torch.float16 if f16 else torch.bfloat16).view(torch.int16)
    x = torch.randn(9, in_f, generator=g)

    def run(rows: torch.Tensor) -> torch.Tensor:
        y = torch.empty(len(rows), out_f)
        assert fn(w.data_ptr(), rows.data_ptr(), None, y.data_ptr(), len(rows), out_f, in_f, 2, f16) == 0
        return y

    alone = torch.cat([run(x[i:i + 1].contiguous()) for i in range(len(x))])
    for m in range(2, len(x) + 1):
        assert torch.equal(run(x[:m].contiguous()), alone[:m]), m
