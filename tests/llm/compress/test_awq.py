import pytest
import torch

from efficientml import apply
from efficientml.llm.compress import AWQConfig, RTNConfig
from efficientml.llm.compress.awq import apply_scale, search_clip
from efficientml.llm.compress.calib import run_blockwise
from efficientml.llm.compress.mappings import scaling_groups, usable
from efficientml.quant.grid import fake_quantize, weight_grid

from ..conftest import tiny_model


FAMILY_OPTIONS = {"llama": {}, "qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True},
                  "phi3": {"partial_rotary_factor": 0.5, "tie_word_embeddings": False},
                  "granite": {"embedding_multiplier": 6.0, "attention_multiplier": 0.1, "residual_multiplier": 0.3,
                              "logits_scaling": 4.0}}


@pytest.mark.parametrize("family", list(FAMILY_OPTIONS))
@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA: v→o group usable; GQA: skipped
def test_scaling_with_folded_inverse_preserves_fp_output(kv_heads, family, ids):
    """Every family's scaling groups are exact in floating point (Qwen3's q/k norms come after q_proj /
    k_proj, so scaling their inputs is still folded away)."""
    m = tiny_model(num_key_value_heads=kv_heads, model_type=family, **FAMILY_OPTIONS[family])
    with torch.no_grad():
        ref = m(ids)
        used = 0
        for block in m.model.layers:
            for g in scaling_groups(m):
                if usable(g, block):
                    s = torch.rand(block.get_submodule(g.linears[0]).in_features) * 4 + 0.25
                    apply_scale(block, g, s)
                    used += 1
        out = m(ids)
    assert used == (8 if kv_heads == 4 else 6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_awq_beats_rtn_with_outlier_channels(ids, calib):
    ref = tiny_model(outliers=True)
    with torch.no_grad():
        y = ref(ids)
    errs = {}
    for name, conf in {"rtn": RTNConfig(3, 32), "awq": AWQConfig(3, 32, n_grid=10, clip_grid=10)}.items():
        m = tiny_model(outliers=True)
        apply(m, conf, calib=calib, inplace=True, progress=False)
        with torch.no_grad():
            errs[name] = (m(ids) - y).pow(2).mean().item()
    assert errs["awq"] < 0.8 * errs["rtn"]


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[0, 0] = 8.0  # one outlier weight stretches its group's range
    x = torch.randn(256, 64)
    spec = weight_grid(3, 32)
    mx = search_clip(w, x, spec, grid=20, max_shrink=0.5)
    err_clip = (x @ (fake_quantize(w, spec, max_abs=mx) - w).t()).pow(2).mean()
    err_rtn = (x @ (fake_quantize(w, spec) - w).t()).pow(2).mean()
    assert err_clip <= err_rtn


def test_lab4_ablations_run(ids, calib):
    for mode in ("fp16", "scale"):
        m = tiny_model(outliers=True)
        apply(m, AWQConfig(4, 32, salient_mode=mode, clip=False), calib=calib, inplace=True, progress=False)
        kinds = {type(x).__name__ for x in m.modules()}
        assert ("QuantLinear" in kinds) == (mode == "scale")  # fp16-kept channels cannot be packed


def test_blockwise_capture_runs_each_block_once_per_pass(calib):
    m = tiny_model()
    calls = []
    for i, block in enumerate(m.model.layers):
        block.register_forward_hook(lambda mod, a, o, i=i: calls.append(i))
    seen = []
    run_blockwise(m, calib, lambda d: seen.append(d.index), batch_size=4, progress=False)
    assert seen == [0, 1]
    assert calls == [0, 0, 1, 1]  # only the re-run that propagates; capture ran no block
