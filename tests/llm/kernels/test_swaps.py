"""Kernel choice as module swaps: the model has no kernel dispatch; GemvLinear / PackedProjections /
the QuantLinear kernel classes are swapped in by dotted name, holding the same tensors."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efficientml.core.errors import ConfigError
from efficientml.llm.config import LlamaConfig
from efficientml.llm.kernels.decode import swap_kernel
from efficientml.llm.kernels.gemv_linear import GemvLinear
from efficientml.llm.kernels.packed import PackedProjections, pack_projections
from efficientml.llm.model import build_model

needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                              reason="the kernel is compiled at run time with the system C compiler")
CFG = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return pack_projections(build_model(CFG, device="cpu")).eval()


def test_model_imports_nothing_from_kernels():
    src = Path(__file__).parents[3] / "efficientml" / "llm" / "model.py"
    mods = [n.module for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if m and "kernels" in m]
    code = ("import sys, efficientml.llm.model as m; m.build_model; "
            "print(sorted(k for k in sys.modules if k.startswith('efficientml.llm.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[3]).stdout
    assert out.strip() == "[]"


def test_unpacked_model_has_no_packed_modules_and_loaders_pack_every_block():
    plain = build_model(CFG, device="cpu")
    assert all(b.packed is None for b in plain.modules() if hasattr(b, "fusable"))
    m = _model()
    packed = [(n, p) for n, p in m.named_modules() if isinstance(p, PackedProjections)]
    assert len(packed) == 2 * CFG.num_hidden_layers  # q/k/v and gate/up per block
    att = m.model.layers[0].self_attn
    assert att.packed.sizes == [64, 32, 32] and m.model.layers[0].mlp.packed.sizes == [96, 96]
    assert not list(att.packed.parameters()) and not list(att.packed.buffers())  # state stays the linears'


def test_swap_keeps_tensors_state_and_logits_and_swaps_back():
    m = _model()
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    params = {n: p for n, p in m.named_parameters(remove_duplicate=False)}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.inference_mode():
        ref = m(ids)
        n_lin = 7 * CFG.num_hidden_layers + 1  # q k v o gate up down per block, lm_head
        assert swap_kernel(m, "cpu") == n_lin + 2 * CFG.num_hidden_layers  # and the packed groups
        assert sum(type(x) is GemvLinear for x in m.modules()) == n_lin
        assert not any(type(x) is nn.Linear for x in m.modules())
        assert all(p.kernel == "cpu" for p in m.modules() if isinstance(p, PackedProjections))
        for n, p in m.named_parameters(remove_duplicate=False):
            assert p is params[n], n  # the same Parameter objects: ties and packed row views hold
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert list(m.state_dict()) == list(state) and all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
        assert m.model.layers[0].self_attn.packed.active(
            (m.model.layers[0].self_attn.q_proj, m.model.layers[0].self_attn.k_proj,
             m.model.layers[0].self_attn.v_proj))
        swap_kernel(m, "cpu")  # idempotent: nothing left to swap
        assert swap_kernel(m, "cpu") == 0
        if _cc_ok():  # swap_kernel itself does not check that the kernel builds (use_cpu_gemv does)
            torch.testing.assert_close(m(ids), ref, rtol=1e-5, atol=1e-5)
        assert swap_kernel(m, "cpu", enable=False) == n_lin + 2 * CFG.num_hidden_layers
        assert sum(type(x) is nn.Linear for x in m.modules()) == n_lin
        assert all(p.kernel is None for p in m.modules() if isinstance(p, PackedProjections))
        torch.testing.assert_close(m(ids), ref, rtol=0, atol=0)  # back on F.linear: bit for bit
    with pytest.raises(ConfigError, match="unknown matrix-vector kernel"):
        swap_kernel(m, "npu")


def _cc_ok() -> bool:
    from efficientml.llm.kernels import cpu_gemv

    return cpu_gemv.available()


def test_gemv_linear_keeps_hooks_and_runs_f_linear_off_kernel():
    lin = nn.Linear(16, 8)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    g = GemvLinear.wrap(lin, "cpu")
    assert g.weight is lin.weight and g.bias is lin.bias
    x = torch.randn(12, 16)  # 12 rows: more than the kernel takes
    assert torch.equal(g(x), F.linear(x, lin.weight, lin.bias)) and seen == [(12, 8)]  # hook moved along
    back = g.unwrap()
    assert type(back) is nn.Linear and back.weight is lin.weight and not hasattr(back, "kernel")
    back(x)
    assert len(seen) == 2


@needs_cc
def test_compiled_decode_step_is_one_graph_with_the_kernel_op():
    """The compiled CPU decode step over GemvLinear / PackedProjections: one graph, no breaks, the
    kernel op once per packed q/k/v, o, packed gate/up, down and lm_head."""
    from efficientml.llm.decode_step import _StepCache
    from efficientml.llm.kernels.decode import use_cpu_gemv
    from efficientml.llm.kv_cache import StaticKVCache

    m = _model(1)
    assert use_cpu_gemv(m)
    view = _StepCache(StaticKVCache.for_model(m, 1, 24, static_shapes=True))
    with torch.inference_mode():
        ex = torch._dynamo.explain(lambda ids, pos: m(ids, view, input_pos=pos, num_logits=1)[:, -1])(
            torch.tensor([[3]]), torch.tensor([5]))
    assert ex.graph_count == 1 and ex.graph_break_count == 0
    ops = sum("gemv_f32" in str(n.target) for n in ex.graphs[0].graph.nodes)
    assert ops == 4 * CFG.num_hidden_layers + 1


def test_quant_kernel_swaps_share_buffers_and_match_the_reference():
    from efficientml.llm.compress.rtn import quantize_weight
    from efficientml.quant.grid import weight_grid
    from efficientml.llm.kernels.qlinear import QuantLinear
    from efficientml.llm.kernels.qlinear_kernels import (QuantLinearDequant, QuantLinearTriton, as_quant_kernel,
                                                         use_quant_kernel)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    for i in range(2):
        model[i] = QuantLinear.from_quantized(quantize_weight(model[i].weight.detach(), weight_grid(4, 32)))
    q = QuantLinear.from_quantized(quantize_weight(w, weight_grid(4, 32)))
    x = torch.randn(3, 64, generator=g)
    d = as_quant_kernel(q, "dequant")
    assert type(d) is QuantLinearDequant and d.weight_packed is q.weight_packed and d.weight_scale is q.weight_scale
    assert torch.equal(d(x), F.linear(x, q.dequantize(), None))
    torch.testing.assert_close(q(x), d(x), rtol=1e-5, atol=1e-5)  # "auto" on CPU: torch's int4 kernel
    assert as_quant_kernel(q, "auto") is q
    assert use_quant_kernel(model, "triton") == 2 and all(type(m) is QuantLinearTriton for m in model)
    assert torch.equal(model[0](x), QuantLinear.forward(model[0], x))  # CPU: the fused kernel is CUDA only
    assert use_quant_kernel(model, "triton") == 0 and use_quant_kernel(model, "auto") == 2
    assert all(type(m) is QuantLinear for m in model)
    with pytest.raises(ConfigError, match="unknown QuantLinear kernel"):
        use_quant_kernel(model, "int3")
