"""Depth pruning and distillation of an LLM (efficientml.distill.llm) on a tiny random LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.distill.llm import (IGNORE, LLMDistillConfig, block_influence, correct_teacher, distill_llm,
                                     drop_layers, lowest, token_kd_loss)
from efficientml.llm.config import LlamaConfig
from efficientml.llm.generate import SamplingConfig, generate
from efficientml.llm.model import build_model


def tiny(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return build_model(cfg, "cpu").eval()


def manual_forward(model, ids, keep):
    """The trunk run by hand through the kept blocks only (an independent forward)."""
    m = model.model
    x = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])
    cos, sin = m.rope(pos, torch.float32, max_pos=ids.shape[1])
    for i in keep:
        x = m.layers[i](x, (cos, sin), None, None, pos)
    return model.logits(m.norm(x))


def test_drop_layers_is_the_model_without_those_blocks_and_decodes_with_a_cache():
    model = tiny(5)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    want = manual_forward(model, ids, [0, 2, 4])
    small = drop_layers(copy.deepcopy(model), [3, 1])
    assert len(small.model.layers) == 3 and small.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in small.model.layers] == [0, 1, 2]
    torch.testing.assert_close(small(ids), want, rtol=1e-5, atol=1e-5)
    out = generate(small, ids[0].tolist(), SamplingConfig(max_new_tokens=4))  # on the (renumbered) cache
    seq = ids[0].tolist()
    for _ in range(4):  # greedy by full forwards, no cache
        seq.append(int(small(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tokens[0] == seq[-4:]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_drop_layers_refuses_bad_indices():
    with pytest.raises(ConfigError, match="distinct indices"):
        drop_layers(tiny(3), [3])
    with pytest.raises(ConfigError, match="keeping at least"):
        drop_layers(tiny(2), [0, 1])
    with pytest.raises(ConfigError, match="can drop"):
        lowest({0: 0.1, 1: 0.2}, 2)


def test_block_influence_is_one_minus_cosine_of_each_blocks_input_and_output():
    model = tiny(3)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(2))
    got = block_influence(model, ids, batch_size=2)
    m = model.model
    pos = torch.arange(9)
    rope = m.rope(pos, torch.float32, max_pos=9)
    x = m.embed_tokens(ids)
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            y = layer(x, rope, None, None, pos)
            want = float((1 - F.cosine_similarity(x, y, dim=-1)).mean())
            assert got[i] == pytest.approx(want, rel=1e-5)
            x = y
    assert lowest(got, 1) == [min(got, key=got.get)]


def test_token_kd_loss_against_the_formula_written_out():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3] = IGNORE
    loss, parts = token_kd_loss(s, t, labels, alpha=0.3, temperature=2.0)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            y = int(labels[b, i + 1])
            if y == IGNORE:
                continue
            ps = torch.softmax(s[b, i] / 2, -1)
            pt = torch.softmax(t[b, i] / 2, -1)
            kl = float((pt * (pt.log() - ps.log())).sum()) * 4
            ce = -float(torch.log_softmax(s[b, i], -1)[y])
            total, n = total + 0.3 * kl + 0.7 * ce, n + 1
    assert float(loss) == pytest.approx(total / n, rel=1e-5)
    same, _ = token_kd_loss(s, s, labels, alpha=1.0, temperature=2.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_distillation_brings_the_pruned_student_closer_to_the_teacher_than_plain_fine_tuning():
    teacher = tiny(4, seed=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (8, 16), generator=g)

    def data():
        while True:
            yield ids, ids

    def kl_to_teacher(model):
        with torch.no_grad():
            return float(token_kd_loss(model(ids), teacher(ids), ids, 1.0, 1.0)[0])

    base = drop_layers(copy.deepcopy(teacher), lowest(block_influence(teacher, ids), 2))
    kd, ce = copy.deepcopy(base), copy.deepcopy(base)
    r_kd = distill_llm(kd, teacher, data(), LLMDistillConfig(steps=30, lr=3e-3, alpha=1.0))
    r_ce = distill_llm(ce, None, data(), LLMDistillConfig(steps=30, lr=3e-3, alpha=0.0))
    assert r_kd["curve"][-1]["loss"] < r_kd["curve"][0]["loss"]
    assert r_ce["curve"][-1]["ce"] < r_ce["curve"][0]["ce"]
    assert kl_to_teacher(kd) < kl_to_teacher(base) and kl_to_teacher(kd) < kl_to_teacher(ce)
    with pytest.raises(ConfigError, match="needs a teacher"):
        distill_llm(copy.deepcopy(base), None, data(), LLMDistillConfig(steps=1, alpha=0.5))


def test_a_frozen_student_is_refused_with_a_sentence():
    frozen = tiny(2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        distill_llm(frozen, tiny(2), iter([]), LLMDistillConfig(steps=1))


def test_teacher_correction_is_plain_fine_tuning_of_a_copy_and_leaves_the_teacher_alone():
    teacher = tiny(2, seed=6).requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(7))

    def data():
        while True:
            yield ids, ids

    cfg = LLMDistillConfig(steps=4, lr=3e-3, alpha=0.7)  # alpha is ignored: correction is cross-entropy only
    fixed, rec = correct_teacher(teacher, data(), cfg)
    ref = copy.deepcopy(teacher).requires_grad_(True)
    distill_llm(ref, None, data(), LLMDistillConfig(steps=4, lr=3e-3, alpha=0.0))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    for (k, a), b in zip(fixed.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in fixed.parameters()) and not fixed.training
    assert rec["steps"] == 4 and "kd" not in rec["curve"][0]
