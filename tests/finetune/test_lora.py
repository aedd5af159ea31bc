"""LoRA / DoRA: identity at init, merge and unmerge exact, the update equal to W + s·BA computed by
hand, exact trainable counts, target selection and its errors."""

import pytest
import torch
from torch import nn

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import (LoRAConfig, LoRALinear, adapters, merge, merge_and_unload, trainable_parameters,
                                  unmerge)

from ..llm.conftest import tiny_model


def _ids(seed=2):
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapters(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
            if m.dora:
                m.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(m.out_features, generator=g))


@pytest.mark.parametrize("dora", [False, True])
def test_starts_as_identity_and_merges_exactly(dora):
    base = tiny_model()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids)
        model = apply(base, LoRAConfig(rank=4, alpha=8, dora=dora)).model
        assert (model(ids) - ref).abs().max() <= 1e-6  # B = 0 (and m = ‖W‖_c): the base model
        _randomize(model)
        before = {n: m.base_layer.weight.clone() for n, m in adapters(model)}
        unmerged = model(ids)
        assert (unmerged - ref).abs().max() > 1e-3  # the adapter does change the output
        merge(model)
        merged = model(ids)
        assert (merged - unmerged).abs().max() <= 1e-5
        unmerge(model)
        assert (model(ids) - unmerged).abs().max() <= 1e-5
        for n, m in adapters(model):
            assert (m.base_layer.weight - before[n]).abs().max() <= 1e-6
        plain = merge_and_unload(model)
        assert not adapters(plain) and (plain(ids) - unmerged).abs().max() <= 1e-5


def test_update_is_w_plus_scaled_ba_by_hand():
    lin = nn.Linear(32, 16)
    m = LoRALinear(lin, rank=4, scaling=2.0)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(5, 32)
    w = lin.weight + 2.0 * m.lora_B.weight @ m.lora_A.weight
    torch.testing.assert_close(m(x), x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)


def test_dora_forward_by_hand():
    lin = nn.Linear(32, 16)
    m = LoRALinear(lin, rank=4, scaling=0.5, dora=True)
    with torch.no_grad():
        m.lora_B.weight.normal_()
        m.lora_magnitude_vector.uniform_(0.5, 2.0)
    x = torch.randn(5, 32)
    v = lin.weight + 0.5 * m.lora_B.weight @ m.lora_A.weight
    w = m.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(m(x), x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)


def test_trainable_counts_are_exact_and_only_adapters_learn():
    model = apply(tiny_model(), LoRAConfig(rank=4)).model
    # tiny: d=64, ffn=128, kv width 32; q, k, v, o, gate, up, down (in+out) per block, 2 blocks
    per_block = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) * 2 + (128 + 64)
    base_total = sum(p.numel() for p in tiny_model().parameters())
    t = trainable_parameters(model)
    assert t["trainable"] == 2 * 4 * per_block
    assert t["total"] == base_total + t["trainable"]
    loss = model(_ids()).logsumexp(-1).mean()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_rslora_scaling_and_targets():
    assert LoRAConfig(rank=16, alpha=32).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scaling == 8.0
    model = apply(tiny_model(), LoRAConfig(rank=2, target_modules=("q_proj", "mlp.down_proj"))).model
    assert [n for n, _ in adapters(model)] == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                               "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    glob = apply(tiny_model(), LoRAConfig(rank=2), filter="model.layers.1.self_attn.*").model
    assert [n.rsplit(".", 1)[1] for n, _ in adapters(glob)] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert all(n.startswith("model.layers.1.") for n, _ in adapters(glob))


def test_clear_errors():
    with pytest.raises(ConfigError, match="'qproj' matches no linear layer"):
        apply(tiny_model(), LoRAConfig(target_modules=("qproj",)))
    with pytest.raises(ConfigError, match="rank 40 is larger than layer 'model.layers.0.self_attn.k_proj'"):
        apply(tiny_model(), LoRAConfig(rank=40, target_modules=("k_proj",)))
    with pytest.raises(ConfigError, match="positive integer"):
        LoRAConfig(rank=0)
    model = apply(tiny_model(), LoRAConfig(rank=2), inplace=True).model
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply(model, LoRAConfig(rank=2))
