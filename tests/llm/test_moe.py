"""Mixture-of-Experts blocks: parity with transformers' Mixtral and Qwen2-MoE on small random
checkpoints (their save_pretrained → our loader, and our save_hf → their loader), grouped execution
against a per-token loop, the expert-choice router, and the load-balancing loss against transformers'."""

from __future__ import annotations

import pytest
import torch

from efficientml.core.errors import CheckpointError, ConfigError, UnsupportedError
from efficientml.llm.config import LlamaConfig
from efficientml.llm.model import build_model
from efficientml.llm.moe import SparseMoeBlock, load_balancing_loss, router_logits

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
HF = {
    "mixtral": (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **BASE, num_local_experts=4, num_experts_per_tok=2))),
    "qwen2_moe": (lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **BASE, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
        shared_expert_intermediate_size=48))),
}


def _hf(kind: str):
    torch.manual_seed(0)
    m = HF[kind]().eval()
    with torch.no_grad():  # transformers initializes the router to zeros on some versions: random, larger
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if w is not None and w.dim() == 2:
                w.normal_(0, 0.1)
    return m


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", list(HF))
def test_logits_equal_transformers(kind, tmp_path):
    from efficientml.llm.io.load import load_hf, save_hf

    hf = _hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config.model_type == kind and ours.config.num_experts == (4 if kind == "mixtral" else 6)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert _rel(got, ref) < 1e-4
    save_hf(ours, None, tmp_path / "ours")  # and back: transformers reads what we write
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert _rel(back(ids).logits, ref) < 1e-5
    assert sum(p.numel() for p in ours.parameters()) == ours.config.num_parameters()


def _naive(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Each token alone: its softmax over experts, top-k, each chosen expert run on it."""
    out = []
    for h in x.reshape(-1, x.shape[-1]):
        p = torch.softmax(block.gate(h), -1)
        w, e = p.topk(block.top_k)
        if block.norm_topk_prob:
            w = w / w.sum()
        y = sum(wi * block.experts[int(ei)](h) for wi, ei in zip(w, e))
        if block.shared_expert is not None:
            y = y + torch.sigmoid(block.shared_expert_gate(h)) * block.shared_expert(h)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def _cfg(**kw) -> LlamaConfig:
    return LlamaConfig(**{**BASE, "num_experts": 8, "num_experts_per_tok": 2, **kw})


@pytest.mark.parametrize("kw", [{}, {"norm_topk_prob": False, "shared_expert_intermediate_size": 40,
                                     "moe_intermediate_size": 24}])
def test_grouped_execution_equals_per_token(kw):
    torch.manual_seed(2)
    m = build_model(_cfg(**kw), "cpu").eval()
    block = m.model.layers[0].mlp
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        assert (block(x) - _naive(block, x)).abs().max() < 1e-5
    assert int(block.tokens_per_expert.sum()) == 33 * 2


def test_expert_choice_gives_every_expert_its_capacity():
    torch.manual_seed(3)
    m = build_model(_cfg(router="expert_choice"), "cpu").eval()
    block = m.model.layers[0].mlp
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        y = block(x)
        p = torch.softmax(block.gate(x[0]), -1)  # (20, 8)
        ref = torch.zeros(20, 64)
        for e in range(8):  # capacity ceil(20 * 2 / 8) = 5: the expert's 5 best-rating tokens
            w, tok = p[:, e].topk(5)
            ref[tok] += w[:, None] * block.experts[e](x[0, tok])
    assert block.tokens_per_expert.tolist() == [5] * 8
    assert (y[0] - ref).abs().max() < 1e-5
    with pytest.raises(UnsupportedError, match="expert-choice"):
        _cfg(model_type="mixtral", router="expert_choice").to_hf_dict()


def test_load_balancing_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(4)
    m = build_model(_cfg(), "cpu").eval()
    with torch.no_grad():
        m(torch.randint(0, 128, (2, 9)))
    logits = router_logits(m)
    assert len(logits) == 2 and logits[0].shape == (18, 8)
    ref = load_balancing_loss_func(tuple(logits), 8, 2)
    assert abs(float(load_balancing_loss(logits, 2)) - float(ref)) < 1e-6
    uniform = [torch.zeros(64, 8)]  # every expert equally likely: the loss is top_k (ties → f sums to k)
    assert abs(float(load_balancing_loss(uniform, 2)) - 2.0) < 1e-6


def test_bad_moe_configs_are_refused():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        _cfg(num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="router"):
        _cfg(router="hash")
    d = {**BASE, "model_type": "qwen2_moe", "num_experts": 4, "decoder_sparse_step": 2}
    with pytest.raises(UnsupportedError, match="decoder_sparse_step"):
        LlamaConfig.from_hf_dict(d)
    with pytest.raises(UnsupportedError, match="Mixture-of-Experts"):
        _cfg(model_type="llama").to_hf_dict()
    with pytest.raises(CheckpointError):
        LlamaConfig.from_hf_dict({**BASE, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 5})


def test_compression_refuses_moe_models():
    from efficientml.llm.compress import RTNConfig
    from efficientml.core.transform import apply

    m = build_model(_cfg(model_type="mixtral"), "cpu")
    with pytest.raises(UnsupportedError, match="scaling-group"):
        apply(m, RTNConfig(w_bits=4))
